"""Each platform invoker against a loopback stand-in that checks the exact method, path, auth header and body."""

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.stub import Stubber

from fedkeeper.core import config
from fedkeeper.platforms.invokers import (GCFInvoker, InvokeError, LambdaInvoker, OpenFaaSInvoker, OpenWhiskInvoker,
                                          Router)

PAYLOAD = {"store": "s3://b/p", "round": 3, "client": "gcf-001", "mode": "train"}


@pytest.fixture
def standin():
    """A loopback HTTP server recording (method, path, headers, body) and answering with a set status."""
    seen = []
    answer = {"status": 202, "delay": 0.0}

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, dict(self.headers), body))
            time.sleep(answer["delay"])
            answer["answered"] = True
            self.send_response(answer["status"])
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            return

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen, answer
    srv.shutdown()
    srv.server_close()


def plat(kind, endpoint, **kw):
    return config.PlatformConfig(name=kind, kind=kind, endpoint=endpoint, **kw)


def test_openwhisk_posts_non_blocking_with_basic_auth(standin, monkeypatch):
    url, seen, _ = standin
    monkeypatch.setenv("OW_KEY", "uuid:secretkey")
    OpenWhiskInvoker(plat("openwhisk", url, auth_env="OW_KEY", options={"namespace": "guest"})).invoke("client", PAYLOAD)
    method, path, headers, body = seen[0]
    assert method == "POST" and path == "/api/v1/namespaces/guest/actions/fedkeeper-client?blocking=false"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"uuid:secretkey").decode()
    assert json.loads(body) == PAYLOAD and headers["Content-Type"] == "application/json"


def test_openfaas_posts_to_async_function(standin, monkeypatch):
    url, seen, _ = standin
    monkeypatch.setenv("OF_AUTH", "fn-token")
    p = plat("openfaas", url, auth_env="OF_AUTH", options={"functions": {"aggregator": "agg"}})
    OpenFaaSInvoker(p).invoke("aggregator", {"round": 1})
    method, path, headers, body = seen[0]
    assert (method, path) == ("POST", "/async-function/agg")
    assert headers["Authorization"] == "Bearer fn-token"
    assert json.loads(body) == {"round": 1}


def test_refusal_names_platform_and_status(standin):
    url, _, answer = standin
    answer["status"] = 401
    with pytest.raises(InvokeError, match="OpenFaaS openfaas client was refused with HTTP 401"):
        OpenFaaSInvoker(plat("openfaas", url)).invoke("client", PAYLOAD)


def test_gcf_posts_with_bearer_and_returns_before_the_function_finishes(standin, monkeypatch):
    url, seen, answer = standin
    answer.update(status=200, delay=3.0)
    monkeypatch.setenv("GCF_TOKEN", "id-token")
    p = plat("gcf", url, auth_env="GCF_TOKEN", options={"wait_s": 0.3})
    GCFInvoker(p).invoke("trigger", {"round": 2})
    assert not answer.get("answered")  # delivered, and the function is still running: not awaited
    method, path, headers, body = seen[0]
    assert (method, path) == ("POST", "/fedkeeper-trigger")
    assert headers["Authorization"] == "Bearer id-token" and json.loads(body) == {"round": 2}


def test_gcf_unreachable_is_an_error():
    p = plat("gcf", "http://127.0.0.1:9")
    with pytest.raises(InvokeError, match="could not be reached"):
        GCFInvoker(p).invoke("client", PAYLOAD)


def test_missing_credential_env_names_it(standin):
    url, _, _ = standin
    with pytest.raises(InvokeError, match="NOT_SET_ANYWHERE"):
        OpenWhiskInvoker(plat("openwhisk", url, auth_env="NOT_SET_ANYWHERE")).invoke("client", PAYLOAD)


def test_lambda_invokes_with_event_type():
    import boto3

    client = boto3.client("lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(client) as stub:
        stub.add_response("invoke", {"StatusCode": 202},
                          {"FunctionName": "fedkeeper-client", "InvocationType": "Event", "Payload": json.dumps(PAYLOAD).encode()})
        LambdaInvoker(plat("lambda", ""), client=client).invoke("client", PAYLOAD)
        stub.assert_no_pending_responses()


def test_router_sends_clients_to_their_platform_and_control_calls_to_the_control_platform():
    cfg = config.from_dict({"control_platform": "b", "platforms": [
        {"name": "a", "kind": "openfaas", "endpoint": "http://x", "clients": 1},
        {"name": "b", "kind": "openwhisk", "endpoint": "http://y", "clients": 1}]})
    calls = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def invoke(self, function, payload, platform=None):
            calls.append((self.name, function))

    r = Router(cfg, invokers={"a": Rec("a"), "b": Rec("b")})
    r.invoke("client", {}, "a")
    r.invoke("aggregator", {}, None)
    r.invoke("trigger", {}, None)
    assert calls == [("a", "client"), ("b", "aggregator"), ("b", "trigger")]
    local = Router(config.from_dict({}))
    with pytest.raises(InvokeError, match="fedkeeper run"):
        local.invoke("client", {}, "gcf")
