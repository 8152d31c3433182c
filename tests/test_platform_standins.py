"""The OpenWhisk and OpenFaaS stand-ins keep the platforms' documented contracts (see docs/platforms.md).

OpenWhisk's action proxy: /init once with the action's zip, /run with {"value", context...}, context in
__OW_* variables, a dict answer or an {"error"} object, end-of-activation log markers; web actions get
base64 bodies for binary media types and must answer base64 for them. OpenFaaS: the python3-http
template's event and answer shapes, and the async queue's X-Callback-Url with its X-* headers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedkeeper.platforms import oftemplate, owproxy
from tests.servers import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
ACTION = '''
import os

def main(args):
    if args.get("kind") == "list":
        return ["not", "a", "dict"]
    if args.get("kind") == "raise":
        raise RuntimeError("boom")
    print("log line")
    return {"got": args, "activation": os.environ.get("__OW_ACTIVATION_ID"),
            "action": os.environ.get("__OW_ACTION_NAME"), "deadline": os.environ.get("__OW_DEADLINE")}
'''


def zipped(files: dict[str, str]) -> str:
    """A base64 action zip holding the given files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return base64.b64encode(buf.getvalue()).decode()


def test_action_proxy_init_once_then_run_with_context(capfd):
    proxy = owproxy.create_app().test_client()
    assert proxy.post("/run", json={"value": {}}).status_code == 403  # not initialized yet
    init = {"value": {"name": "probe", "main": "main", "binary": True, "code": zipped({"__main__.py": ACTION})}}
    assert proxy.post("/init", json=init).status_code == 200
    again = proxy.post("/init", json=init)
    assert again.status_code == 403 and "error" in again.get_json()
    run = proxy.post("/run", json={"value": {"x": 1}, "activation_id": "a1", "action_name": "/ns/probe",
                                   "namespace": "ns", "deadline": "1700000000000", "api_key": "k"})
    assert run.status_code == 200
    assert run.get_json() == {"got": {"x": 1}, "activation": "a1", "action": "/ns/probe", "deadline": "1700000000000"}
    out, err = capfd.readouterr()
    assert out.rstrip().endswith(owproxy.END_MARKER) and "log line" in out
    assert err.rstrip().endswith(owproxy.END_MARKER)
    bad = proxy.post("/run", json={"value": {"kind": "list"}})
    assert bad.status_code == 502 and bad.get_json() == {"error": "The action did not return a dictionary."}
    boom = proxy.post("/run", json={"value": {"kind": "raise"}})
    assert boom.status_code == 502 and "boom" in boom.get_json()["error"]


def test_action_zip_is_what_a_python_action_needs():
    with zipfile.ZipFile(io.BytesIO(owproxy.action_zip(str(ROOT), "trigger"))) as zf:
        names = set(zf.namelist())
    assert "__main__.py" in names and "fedkeeper/platforms/openwhisk.py" in names
    assert not any("__pycache__" in n for n in names)


def test_python3_http_template_answers():
    handler = ROOT / "functions" / "trigger" / "handler.py"
    app = oftemplate.create_app(str(handler))
    with app.test_request_context("/x?a=1", method="POST", data=b"raw", headers={"X-Test": "y"}):
        event = oftemplate.Event()
        assert (event.body, event.method, event.path, event.query["a"], event.headers["X-Test"]) == \
            (b"raw", "POST", "/x", "1", "y")
        assert oftemplate.Context().hostname
        assert oftemplate.reply(None).status_code == 200
        js = oftemplate.reply({"statusCode": 201, "body": {"k": [1]}, "headers": {"X-A": "b"}})
        assert (js.status_code, js.mimetype, json.loads(js.get_data()), js.headers["X-A"]) == \
            (201, "application/json", {"k": [1]}, "b")
        assert oftemplate.reply({"body": 5}).get_data() == b"5"  # anything else as text


class Catcher:
    """A local HTTP endpoint that records what is posted to it."""

    def __init__(self) -> None:
        self.got: list[tuple[dict, bytes]] = []
        catcher = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                catcher.got.append((dict(self.headers), self.rfile.read(int(self.headers.get("Content-Length") or 0))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/done"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["openwhisk", "openfaas"])
def test_served_gateways_keep_the_contract(platform, tmp_path):
    """Through `fedkeeper serve`: containers behind the gateway; OpenFaaS async callbacks; OpenWhisk web bodies."""
    port = free_port()
    env = dict(os.environ, FEDKEEPER_STORE=str(tmp_path / "empty"), FEDKEEPER_TOKEN="tok", OW_KEY="u:p")
    proc = subprocess.Popen([sys.executable, "-m", "fedkeeper.cli", "serve", "trigger", "--platform", platform,
                             "--port", str(port), "--auth-env", "OW_KEY"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    gw = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(gw + "/", timeout=2)
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.time() < end and proc.poll() is None, "gateway did not start"
                time.sleep(0.3)
        if platform == "openfaas":
            catcher = Catcher()
            auth = {"Authorization": "Bearer tok", "Content-Type": "application/json"}
            sync = urllib.request.Request(f"{gw}/function/fedkeeper-trigger/rounds", data=b"{}", method="POST", headers=auth)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(sync, timeout=30)
            sync_status, sync_body = info.value.code, json.loads(info.value.read())
            assert sync_status == 404 and "holds no federation" in sync_body["error"]
            req = urllib.request.Request(f"{gw}/async-function/fedkeeper-trigger/rounds", data=b"{}", method="POST",
                                         headers=dict(auth, **{"X-Callback-Url": catcher.url}))
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 202
                call_id = resp.headers["X-Call-Id"]
            end = time.time() + 30
            while not catcher.got and time.time() < end:
                time.sleep(0.2)
            headers, body = catcher.got[0]
            assert headers["X-Call-Id"] == call_id and headers["X-Function-Name"] == "fedkeeper-trigger"
            # The queued call reached the function as the synchronous one did, and the callback carries its answer.
            assert headers["X-Function-Status"] == str(sync_status) and float(headers["X-Duration-Seconds"]) >= 0
            assert json.loads(body) == sync_body
            catcher.server.shutdown()
        else:
            req = urllib.request.Request(f"{gw}/api/v1/web/_/default/fedkeeper-trigger.http/status",
                                         headers={"Authorization": "Bearer tok"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=30)
            # The action's base64 JSON answer was decoded by the controller into the HTTP body.
            assert info.value.code == 404 and "holds no federation" in json.loads(info.value.read())["error"]
            blocking = urllib.request.Request(f"{gw}/api/v1/namespaces/_/actions/fedkeeper-trigger?blocking=true",
                                              data=json.dumps({"round": "x"}).encode(), method="POST",
                                              headers={"Content-Type": "application/json",
                                                       "Authorization": "Basic " + base64.b64encode(b"u:p").decode()})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(blocking, timeout=30)
            record = json.loads(info.value.read())
            assert info.value.code == 502 and record["response"]["status"] == "application error"
            assert "error" in record["response"]["result"] and record["activationId"]
    finally:
        stop_process(proc)
