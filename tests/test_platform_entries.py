"""Every entry file driven the way its platform calls it, with recorded event shapes."""

import base64
import json
from types import SimpleNamespace

import pytest

from fedkeeper.core import keys
from fedkeeper.functions.context import NullInvoker
from fedkeeper.platforms import common
from fedkeeper.platforms.serve import entry_module
from tests.extras import mark

TOKEN = "tok"
URL = "s3://fed/p"  # the federation's store as deployed functions see it (served here by a folder store)


@pytest.fixture
def deployed(federation, monkeypatch):
    """Functions configured with FEDKEEPER_STORE; their store is the fixture's folder store, invocations recorded."""
    monkeypatch.setenv("FEDKEEPER_STORE", URL)
    monkeypatch.setenv("FEDKEEPER_TOKEN", TOKEN)
    inv = NullInvoker()
    common._STORES[URL] = federation.store
    common._INVOKERS[URL] = inv
    common._INVOKERS[federation.store.url] = inv
    common._STORES[federation.store.url] = federation.store
    yield federation, inv
    for d in (common._STORES, common._INVOKERS):
        d.pop(URL, None)
        d.pop(federation.store.url, None)


def apigw_v1(method, path, body=None, headers=None):
    """API Gateway REST API (v1) proxy event."""
    return {"resource": "/{proxy+}", "path": path, "httpMethod": method, "headers": headers or {},
            "multiValueHeaders": {k: [v] for k, v in (headers or {}).items()}, "queryStringParameters": None,
            "multiValueQueryStringParameters": None, "pathParameters": {"proxy": path.lstrip("/")},
            "stageVariables": None, "requestContext": {"resourcePath": "/{proxy+}", "httpMethod": method, "path": f"/prod{path}",
                                                       "stage": "prod", "requestId": "r1", "identity": {"sourceIp": "127.0.0.1"}},
            "body": body, "isBase64Encoded": False}


def apigw_v2(method, path, body=None, headers=None, function_url=False):
    """HTTP API (v2) or Function URL event (the same payload format 2.0)."""
    ctx = {"http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "curl"},
           "requestId": "r2", "routeKey": "$default", "stage": "$default", "accountId": "123456789012", "apiId": "abc"}
    if function_url:
        ctx["domainName"] = "abcdefg.lambda-url.us-east-1.on.aws"
    return {"version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": "",
            "headers": headers or {}, "requestContext": ctx, "body": body, "isBase64Encoded": False}


@mark("aws", "serverless_wsgi")
@pytest.mark.parametrize("shape", ["v1", "v2", "function_url"])
def test_lambda_http_shapes_start_a_round(deployed, shape):
    fed, inv = deployed
    handler = entry_module("trigger", "lambda_function.py").handler
    make = {"v1": apigw_v1, "v2": apigw_v2, "function_url": lambda *a, **k: apigw_v2(*a, **k, function_url=True)}[shape]
    denied = handler(make("POST", "/rounds", "{}", {"content-type": "application/json"}), SimpleNamespace())
    assert denied["statusCode"] == 401
    ok = handler(make("POST", "/rounds", "{}", {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}),
                 SimpleNamespace())
    assert ok["statusCode"] == 200 and json.loads(ok["body"])["status"] == "started"
    assert fed.store.exists(keys.manifest(0)) and len(inv.calls) == 4


def test_lambda_s3_notification_runs_the_aggregator(deployed):
    fed, inv = deployed
    fed.open_round(0)
    fed.submit_all(0)
    record = {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "awsRegion": "us-east-1",
              "s3": {"bucket": {"name": "fed"}, "object": {"key": f"p/{keys.update(0, fed.ids[-1])}", "size": 1}}}
    other = dict(record, s3={"bucket": {"name": "fed"}, "object": {"key": "p/rounds/000000/result.json"}})
    out = entry_module("aggregator", "lambda_function.py").handler({"Records": [record, other]}, SimpleNamespace())
    assert out["events"] == 1 and out["results"][0]["status"] == "done"
    assert fed.store.exists(keys.result(0)) and fed.store.exists(keys.model(1))


def test_lambda_eventbridge_schedule_ticks(deployed):
    fed, _ = deployed
    event = {"version": "0", "id": "e1", "detail-type": "Scheduled Event", "source": "aws.events",
             "account": "123456789012", "time": "2026-11-24T00:00:00Z", "region": "us-east-1",
             "resources": ["arn:aws:events:us-east-1:123456789012:rule/fedkeeper-tick"], "detail": {}}
    out = entry_module("trigger", "lambda_function.py").handler(event, SimpleNamespace())
    assert out["status"] == "started" and fed.store.exists(keys.manifest(0))


def test_lambda_direct_invoke_of_the_aggregator(deployed):
    fed, _ = deployed
    fed.open_round(0)
    out = entry_module("aggregator", "lambda_function.py").handler({"round": 0}, SimpleNamespace())
    assert out["status"] == "waiting"


def test_openwhisk_web_action_alarm_and_direct(deployed):
    fed, _ = deployed
    main = entry_module("trigger", "__main__.py").main
    web = {"__ow_method": "post", "__ow_path": "/rounds", "__ow_headers": {"authorization": f"Bearer {TOKEN}",
                                                                          "content-type": "application/json"},
           "__ow_body": base64.b64encode(b"{}").decode(), "__ow_query": ""}
    out = main(web)
    # JSON is binary to the controller: the body comes and goes base64-encoded.
    assert out["statusCode"] == 200 and json.loads(base64.b64decode(out["body"]))["round"] == 0
    assert main(dict(web, __ow_headers={}))["statusCode"] == 401
    tick = main({"fedkeeper_tick": True, "triggerName": "/guest/fedkeeper-tick"})
    assert tick["status"] == "busy"
    agg = entry_module("aggregator", "__main__.py").main({"round": 0})
    assert agg["status"] == "waiting"
    bad = entry_module("aggregator", "__main__.py").main({"round": "x"})
    assert "error" in bad  # OpenWhisk marks the activation failed


def test_openwhisk_raw_body_base64(deployed):
    main = entry_module("trigger", "__main__.py").main
    web = {"__ow_method": "post", "__ow_path": "/rounds", "__ow_query": "",
           "__ow_headers": {"authorization": f"Bearer {TOKEN}", "content-type": "application/octet-stream"},
           "__ow_body": base64.b64encode(b"{}").decode()}
    assert main(web)["statusCode"] == 200


def test_openfaas_python3_http_event_and_cron(deployed):
    fed, _ = deployed
    handle = entry_module("trigger", "handler.py").handle
    event = SimpleNamespace(body=b"{}", headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
                            method="POST", query={}, path="/rounds")
    out = handle(event, SimpleNamespace())
    assert out["statusCode"] == 200 and json.loads(out["body"])["status"] == "started"
    cron = SimpleNamespace(body=b"", headers={"X-Connector": "cron-connector"}, method="POST", query={}, path="/")
    assert handle(cron, SimpleNamespace())["body"]["status"] == "busy"
    status = handle(SimpleNamespace(body=b"", headers={"Authorization": f"Bearer {TOKEN}"}, method="GET", query={},
                                    path="/status"), SimpleNamespace())
    assert json.loads(status["body"])["state"]["status"] == "open"


@mark("gcp", "functions_framework")
def test_gcf_http_and_cloudevent_entries(deployed):
    import functions_framework

    from fedkeeper.platforms.serve import FUNCTIONS_DIR

    fed, _ = deployed
    trig = functions_framework.create_app(target="trigger", source=str(FUNCTIONS_DIR / "trigger" / "main.py")).test_client()
    assert trig.post("/rounds").status_code == 401
    resp = trig.post("/rounds", headers={"Authorization": f"Bearer {TOKEN}"}, json={})
    assert resp.status_code == 200 and resp.get_json()["status"] == "started"
    fed.submit_all(0)
    agg = functions_framework.create_app(target="aggregator_event", source=str(FUNCTIONS_DIR / "aggregator" / "main.py")).test_client()
    headers = {"ce-specversion": "1.0", "ce-type": "google.cloud.storage.object.v1.finalized", "ce-id": "1",
               "ce-source": "//storage.googleapis.com/projects/_/buckets/fed", "ce-subject": "objects/x",
               "Content-Type": "application/json"}
    # FEDKEEPER_STORE is s3://fed/p here; a GCS-deployed aggregator would have gs://fed/p. Same translation.
    resp = agg.post("/", headers=headers, json={"bucket": "fed", "name": f"p/{keys.update(0, fed.ids[0])}"})
    assert resp.status_code == 200
    assert fed.store.exists(keys.result(0))


@pytest.mark.parametrize("event", [{"mode": "evaluate", "model": "../x", "data": "d", "output": "o"},
                                   {"mode": "evaluate", "model": "/etc/passwd", "data": "data/test.npz", "output": "o"},
                                   {"mode": "evaluate", "model": "", "data": "", "output": ""},
                                   {"mode": "evaluate", "model": ".fedkeeper/events/x", "data": "d", "output": "o"}])
def test_a_client_event_naming_no_store_key_is_400(deployed, event):
    from fedkeeper.platforms import common

    status, body = common.call("client", event)
    assert status == 400 and "invalid store key" in body["error"]
