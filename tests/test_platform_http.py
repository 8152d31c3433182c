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
