"""The trigger's HTTP API (one Flask app for every platform): auth, status codes, and no 500 for any bad input."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedkeeper.core import keys
from fedkeeper.functions.context import NullInvoker
from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app

TOKEN = "s3cret-token"


@pytest.fixture
def api(federation, monkeypatch):
    """The trigger app over a 4-client federation, with invocations recorded instead of sent."""
    monkeypatch.setenv("FEDKEEPER_STORE", federation.store.url)
    monkeypatch.setenv("FEDKEEPER_TOKEN", TOKEN)
    inv = NullInvoker()
    common._INVOKERS[federation.store.url] = inv
    common._STORES[federation.store.url] = federation.store
    yield create_app("trigger").test_client(), inv, federation
    common._INVOKERS.pop(federation.store.url, None)
    common._STORES.pop(federation.store.url, None)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_post_rounds_starts_a_round_with_the_token(api):
    client, inv, fed = api
    resp = client.post("/rounds", headers=AUTH)
    assert resp.status_code == 200 and resp.get_json()["status"] == "started"
    assert fed.store.exists(keys.manifest(0))
    assert sorted(p["client"] for f, p, _ in inv.calls if f == "client") == sorted(fed.ids)


def test_second_post_gets_409_with_the_open_round(api):
    client, _, _ = api
    client.post("/rounds", headers=AUTH)
    resp = client.post("/rounds", headers=AUTH)
    assert resp.status_code == 409 and resp.get_json()["round"] == 0


def test_missing_or_wrong_token_is_401(api):
    client, _, fed = api
    assert client.post("/rounds").status_code == 401
    assert client.post("/rounds", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.post("/rounds", headers={"Authorization": TOKEN}).status_code == 401
    assert "Bearer" in client.post("/rounds").get_json()["error"]
    assert not fed.store.exists(keys.manifest(0))


def test_bad_json_is_400_with_a_message(api):
    client, _, _ = api
    resp = client.post("/rounds", headers=AUTH, data="{not json", content_type="application/json")
    assert resp.status_code == 400 and "not valid JSON" in resp.get_json()["error"]
    resp = client.post("/rounds", headers=AUTH, json=[1, 2])
    assert resp.status_code == 400
    resp = client.post("/rounds", headers=AUTH, json={"round": "seven"})
    assert resp.status_code == 400
    resp = client.post("/rounds", headers=AUTH, json={"bogus": 1})
    assert resp.status_code == 400 and "bogus" in resp.get_json()["error"]


def test_status_and_tick(api):
    client, inv, _ = api
    assert client.get("/status", headers=AUTH).get_json()["state"]["status"] == "ready"
    tick = client.post("/tick", headers=AUTH)
    assert tick.status_code == 200 and tick.get_json()["status"] == "started"
    again = client.post("/tick", headers=AUTH)
    assert again.status_code == 200 and again.get_json()["status"] == "busy"
    assert client.get("/status", headers=AUTH).get_json()["state"]["status"] == "open"


def test_unknown_route_and_method(api):
    client, _, _ = api
    assert client.get("/nope", headers=AUTH).status_code == 404
    assert client.get("/rounds", headers=AUTH).status_code == 405


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.one_of(st.sampled_from(["/", "/rounds", "/status", "/tick", "/healthz"]),
                      st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(lambda s: "/" + s.lstrip("/"))),
       body=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                                   lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())),
       auth=st.sampled_from([None, f"Bearer {TOKEN}", "Bearer x", "Basic abc", ""]),
       ctype=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]))
def test_fuzzed_requests_never_get_500(api, method, path, body, auth, ctype):
    client, _, _ = api
    headers = {"Authorization": auth} if auth is not None else {}
    if ctype:
        headers["Content-Type"] = ctype
    resp = client.open(path, method=method, data=body, headers=headers)
    assert resp.status_code < 500, (method, path, body, resp.get_data()[:300])
    assert resp.is_json


def test_nested_json_is_400_not_500(api):
    client, _, _ = api
    deep = b"[" * 100000 + b"]" * 100000
    for body in (deep, b'{"round":' + deep + b"}", b'{"a":' * 5000 + b"1" + b"}" * 5000, b'{"round": 1e400}',
                 b'{"round": ' + b"9" * 6000 + b"}", b'{"round": NaN}', b'{"round": 1, "round": 2}'):
        resp = client.post("/rounds", headers=AUTH, data=body, content_type="application/json")
        assert 400 <= resp.status_code < 500, (body[:40], resp.get_data()[:200])
        assert resp.get_json()["error"]


def test_oversized_body_is_refused_before_auth_and_before_it_is_read(api):
    client, _, fed = api

    class Endless:
        """A body that fails the test if more than the limit is ever read from it."""

        read_bytes = 0

        def read(self, n=-1):
            n = 65536 if n is None or n < 0 else min(n, 65536)
            Endless.read_bytes += n
            assert Endless.read_bytes <= common.MAX_BODY + 65536, "the server read past its body limit"
            return b" " * n

    from werkzeug.test import EnvironBuilder

    def send(headers: dict, length: int | None) -> int:
        env = EnvironBuilder(path="/rounds", method="POST", headers=headers, content_type="application/json").get_environ()
        env["wsgi.input"] = Endless()
        if length is None:  # chunked: no length, the server must stop reading by itself
            env.pop("CONTENT_LENGTH", None)
            env["wsgi.input_terminated"] = True
        else:
            env["CONTENT_LENGTH"] = str(length)
        got = {}
        b"".join(client.application(env, lambda status, hdrs, exc=None: got.setdefault("s", int(status.split()[0]))))
        return got["s"]

    assert send({}, 400 * 2**20) == 413
    assert send(AUTH, 400 * 2**20) == 413
    assert send(AUTH, None) in (400, 413)
    assert not fed.store.exists(keys.manifest(0))


@pytest.mark.parametrize("store", ["/etc", "/tmp/other-federation", "s3://other/bucket", "gs://x/y", "ftp://x", "", 7])
def test_a_request_can_never_choose_the_store(api, tmp_path, store):
    client, _, fed = api
    target = tmp_path / "must-not-exist"
    for resp in (client.post("/rounds", headers=AUTH, json={"store": store}),
                 client.get("/status", headers=AUTH, query_string={"store": store}),
                 client.post("/tick", headers=AUTH, json={"store": store}),
                 client.get("/status", headers=AUTH, query_string={"store": str(target)})):
        assert resp.status_code == 400, resp.get_data()[:200]
        assert "cannot name another store" in resp.get_json()["error"]
    assert not target.exists() and not fed.store.exists(keys.manifest(0))
    ok = client.post("/rounds", headers=AUTH, json={"store": fed.store.url})
    assert ok.status_code == 200


def test_invalid_federation_json_is_a_clear_4xx_or_503(api):
    client, _, fed = api
    fed.store.put(keys.FEDERATION, b'{"rounds": "many"')
    from fedkeeper.functions import context as ctxmod

    ctxmod._CONFIGS.clear()
    for resp in (client.post("/rounds", headers=AUTH), client.get("/status", headers=AUTH),
                 client.post("/tick", headers=AUTH)):
        assert resp.status_code < 500 or resp.status_code == 503, resp.get_data()[:300]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(depth=st.integers(1, 3000), store=st.one_of(st.none(), st.text(max_size=40)),
       rnd=st.one_of(st.integers(-5, 10**30), st.floats(), st.text(max_size=5), st.none()))
def test_fuzzed_nesting_stores_and_rounds_never_get_500(api, depth, store, rnd):
    client, _, _ = api
    body = {"round": rnd} if store is None else {"round": rnd, "store": store}
    raw = json.dumps(body).encode()
    nested = b'{"x":' * depth + raw + b"}" * depth
    for data in (raw, nested):
        resp = client.post("/rounds", headers=AUTH, data=data, content_type="application/json")
        assert resp.status_code < 500, (data[:80], resp.get_data()[:300])


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
                     max_leaves=12)
_SHAPES = st.sampled_from(["Records", "event_type", "key", "message", "context", "data", "specversion", "failure",
                           "requestPayload", "requestContext", "round", "store"])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(_SHAPES, _JSON, min_size=1, max_size=4), route=st.sampled_from(["/events", "/"]))
def test_fuzzed_events_to_the_aggregator_never_get_500(federation, monkeypatch, body, route):
    # Every event shape the aggregator understands, filled with arbitrary values: a reason, never a crash
    monkeypatch.setenv("FEDKEEPER_STORE", federation.store.url)
    monkeypatch.delenv("FEDKEEPER_TOKEN", raising=False)
    monkeypatch.setitem(common._STORES, federation.store.url, federation.store)
    monkeypatch.setitem(common._INVOKERS, federation.store.url, NullInvoker())
    resp = create_app("aggregator").test_client().post(route, data=json.dumps(body), content_type="application/json")
    assert resp.status_code < 500, (route, body, resp.get_data()[:300])


def test_status_counts_rounds_from_one_like_every_other_surface(api):
    client, inv, fed = api
    client.post("/rounds", headers=AUTH)
    body = client.get("/status", headers=AUTH).get_json()
    assert body["state"]["round"] == 1 and body["state"]["status"] == "open"
