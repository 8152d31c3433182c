"""`fedkeeper serve`: run the deployable functions on 127.0.0.1 the way each platform calls them."""

from __future__ import annotations

import base64
import importlib.util
import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from flask import Flask, Response, request

FUNCTIONS_DIR = Path(__file__).resolve().parents[2] / "functions"
NAMES = {"trigger": "fedkeeper-trigger", "client": "fedkeeper-client", "aggregator": "fedkeeper-aggregator"}


def entry_module(function: str, filename: str) -> Any:
    """Import functions/<function>/<filename> as its platform would (by path, as an isolated module)."""
    path = FUNCTIONS_DIR / function / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the functions/ folder must sit beside the fedkeeper package")
    spec = importlib.util.spec_from_file_location(f"fedkeeper_entry_{function}_{path.stem.strip('_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Background:
    """One worker thread per function, like one warm instance: asynchronous calls queue behind each other."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.done = 0
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> None:
        """Queue a call."""
        self.q.put(fn)

    def _run(self) -> None:
        while True:
            fn = self.q.get()
            try:
                fn()
            except Exception as exc:  # an async invocation's failure is logged, as the platform would
                print(f"fedkeeper serve: asynchronous invocation failed: {exc}", file=sys.stderr, flush=True)
            self.done += 1


class Hosted:
    """The served functions by deployed name; each runs one call at a time, like one warm instance."""

    def __init__(self, functions: list[str], filename: str, attr: str) -> None:
        self.entries = {NAMES[f]: getattr(entry_module(f, filename), attr) for f in functions}
        self._locks = {name: threading.Lock() for name in self.entries}
        self._queues = {name: Background() for name in self.entries}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def run(self, name: str, *args: Any) -> Any:
        """Call the entry now, after any call already running in its instance."""
        with self._locks[name]:
            return self.entries[name](*args)

    def submit(self, name: str, *args: Any) -> None:
        """Queue an asynchronous call behind the entry's earlier ones."""
        self._queues[name].submit(lambda: self.run(name, *args))


class Container:
    """A function's container: a server process on a free loopback port, stopped with this process."""

    def __init__(self, module: str, *args: str) -> None:
        import atexit
        import os
        import subprocess

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = str(FUNCTIONS_DIR.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args, "--port", str(self.port)], env=env)
        atexit.register(self.proc.terminate)
        self.lock = threading.Lock()
        deadline = time.time() + 60
        while not _listening(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{module} did not start on port {self.port}")
            time.sleep(0.1)

    def post(self, path: str, body: bytes, headers: dict | None = None, timeout: float = 900,
             method: str = "POST") -> tuple[int, dict, bytes]:
        """One HTTP request to the container; (status, headers, body), HTTP errors included."""
        req = urllib.request.Request(self.url + path, data=body if method != "GET" else None, method=method,
                                     headers=headers or {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# Spray (which OpenWhisk's controller uses) treats text/* as text and every other media type, JSON
# included, as binary: binary request bodies reach a raw web action base64-encoded, and a binary
# Content-Type in the answer means its body is base64 to decode.
def _binary(content_type: str) -> bool:
    return bool(content_type) and not content_type.lower().startswith("text/")


def openwhisk_app(functions: list[str], auth: str | None = None, timeout_s: float = 900) -> Flask:
    """OpenWhisk's controller API for FedKeeper's actions, each running in an action-proxy container.

    Action invokes (POST /api/v1/namespaces/<ns>/actions/<name>, blocking or not, Basic auth) and raw
    web actions (/api/v1/web/<ns>/<pkg>/<name>[.http][/path]) become /run calls on the action's
    container (fedkeeper.platforms.owproxy), which was initialized once with the action's zip.
    """
    from fedkeeper.platforms import owproxy

    app = Flask("openwhisk")
    containers: dict[str, Container] = {}
    for fn in functions:
        box = containers[NAMES[fn]] = Container("fedkeeper.platforms.owproxy")
        code = base64.b64encode(owproxy.action_zip(str(FUNCTIONS_DIR.parent), fn)).decode()
        status, _, out = box.post("/init", json.dumps({"value": {"name": NAMES[fn], "main": "main", "code": code,
                                                                 "binary": True}}).encode())
        if status != 200:
            raise RuntimeError(f"action {NAMES[fn]} failed to initialize: {out[:500]!r}")
    queues = {name: Background() for name in containers}

    def activate(ns: str, name: str, params: dict, activation_id: str) -> dict:
        """One activation: /run on the action's container, then the activation record the API reports."""
        start = time.time()
        run = {"value": params, "namespace": ns, "action_name": f"/{ns}/{name}", "activation_id": activation_id,
               "transaction_id": uuid.uuid4().hex, "deadline": str(int((start + timeout_s) * 1000)),
               "api_key": auth or ""}
        box = containers[name]
        with box.lock:  # one activation at a time per container, as the platform guarantees
            status, _, out = box.post("/run", json.dumps(run).encode(), timeout=timeout_s)
        try:
            result = json.loads(out)
        except ValueError:
            result = {"error": "The action did not produce a valid JSON response."}
        if status == 200 and isinstance(result, dict) and "error" not in result:
            outcome = "success"
        elif status == 200 or isinstance(result, dict) and "error" in result:
            outcome = "application error"
        else:
            outcome = "action developer error"
        end = time.time()
        return {"activationId": activation_id, "namespace": ns, "name": name, "start": int(start * 1000),
                "end": int(end * 1000), "duration": int((end - start) * 1000),
                "response": {"status": outcome, "statusCode": 0 if outcome == "success" else 1,
                             "success": outcome == "success", "result": result}}

    def not_found(name: str) -> Response:
        return Response(json.dumps({"error": f"The requested resource does not exist. ({name})"}), 404,
                        mimetype="application/json")

    @app.post("/api/v1/namespaces/<ns>/actions/<name>")
    def invoke(ns: str, name: str):
        if auth is not None:
            want = "Basic " + base64.b64encode(auth.encode()).decode()
            if request.headers.get("Authorization") != want:
                return Response(json.dumps({"error": "The supplied authentication is invalid"}), 401,
                                mimetype="application/json")
        if name not in containers:
            return not_found(name)
        params = request.get_json(silent=True)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return Response(json.dumps({"error": "The request content was malformed: parameters must be an object"}),
                            400, mimetype="application/json")
        activation_id = uuid.uuid4().hex
        if request.args.get("blocking", "false") != "true":
            queues[name].submit(lambda: activate(ns, name, params, activation_id))
            return Response(json.dumps({"activationId": activation_id}), 202, mimetype="application/json")
        record = activate(ns, name, params, activation_id)
        body = record["response"]["result"] if request.args.get("result") == "true" else record
        return Response(json.dumps(body), 200 if record["response"]["success"] else 502, mimetype="application/json")

    @app.route("/api/v1/web/<ns>/<pkg>/<action>", defaults={"sub": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/api/v1/web/<ns>/<pkg>/<action>/<path:sub>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def web(ns: str, pkg: str, action: str, sub: str):
        name = action[: -len(".http")] if action.endswith(".http") else action
        if name not in containers:
            return not_found(name)
        raw = request.get_data()
        ctype = request.headers.get("Content-Type", "")
        params = {"__ow_method": request.method.lower(),
                  "__ow_headers": {k.lower(): v for k, v in request.headers.items()},
                  "__ow_path": "/" + sub if sub else "", "__ow_query": request.query_string.decode(),
                  "__ow_body": base64.b64encode(raw).decode() if _binary(ctype) else raw.decode("utf-8", "replace")}
        record = activate(ns, name, params, uuid.uuid4().hex)
        result = record["response"]["result"]
        if not record["response"]["success"] and "statusCode" not in result:
            return Response(json.dumps({"error": "The action did not produce a valid response.",
                                        "code": record["activationId"]}), 502, mimetype="application/json")
        headers = {str(k): str(v) for k, v in (result.get("headers") or {}).items()}
        body = result.get("body", "")
        declared = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        if declared and _binary(declared) and isinstance(body, str):
            try:
                body = base64.b64decode(body, validate=True)
            except ValueError:
                return Response(json.dumps({"error": f"Response is not valid '{declared}'."}), 400,
                                mimetype="application/json")
        elif not isinstance(body, (str, bytes)):
            return Response(json.dumps({"error": "The action did not produce a valid response."}), 502,
                            mimetype="application/json")
        return Response(body, int(result.get("statusCode", 200)), headers=headers)

    return app


def openfaas_app(functions: list[str], auth: str | None = None, exec_timeout_s: float = 900) -> Flask:
    """OpenFaaS's gateway for python3-http functions, each in its own template container.

    /function/<name>[/path] forwards the request (method, path, query, headers, body) to the function's
    container (fedkeeper.platforms.oftemplate) and returns its answer. /async-function/<name>[/path]
    answers 202 with an X-Call-Id and queues the request; the queue worker invokes the function one
    call at a time and, when the request carried X-Callback-Url, posts the function's answer there with
    X-Call-Id, X-Function-Status, X-Function-Name and X-Duration-Seconds. Like OpenFaaS, invocation
    needs no gateway credentials; each function checks its bearer token.
    """
    app = Flask("openfaas")
    containers = {NAMES[fn]: Container("fedkeeper.platforms.oftemplate", str(FUNCTIONS_DIR / fn / "handler.py"))
                  for fn in functions}
    worker = Background()
    hop = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-authorization", "host",
           "content-length"}

    def forward(name: str, method: str, sub: str, query: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        path = "/" + sub + (f"?{query}" if query else "")
        kept = {k: v for k, v in headers.items() if k.lower() not in hop}
        try:
            return containers[name].post(path, body, kept, timeout=exec_timeout_s, method=method)
        except TimeoutError:
            return 502, {}, b"Can't reach service for: " + name.encode()

    def callback(url: str, call_id: str, name: str, status: int, headers: dict, body: bytes, took: float) -> None:
        out = {k: v for k, v in headers.items() if k.lower() not in hop}
        out.update({"X-Call-Id": call_id, "X-Function-Status": str(status), "X-Function-Name": name,
                    "X-Duration-Seconds": f"{took:f}"})
        req = urllib.request.Request(url, data=body, method="POST", headers=out)
        try:
            urllib.request.urlopen(req, timeout=30).read()  # noqa: S310 - the caller named it
        except OSError as exc:
            print(f"openfaas queue worker: callback to {url} failed: {exc}", file=sys.stderr, flush=True)

    @app.route("/function/<name>", defaults={"sub": ""}, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    @app.route("/function/<name>/<path:sub>", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    def sync(name: str, sub: str):
        if name not in containers:
            return Response(f"error finding function {name}: not found", 404)
        status, headers, body = forward(name, request.method, sub, request.query_string.decode(),
                                        dict(request.headers), request.get_data())
        return Response(body, status, headers={k: v for k, v in headers.items() if k.lower() not in hop})

    @app.route("/async-function/<name>", defaults={"sub": ""}, methods=["POST", "PUT", "PATCH", "DELETE"])
    @app.route("/async-function/<name>/<path:sub>", methods=["POST", "PUT", "PATCH", "DELETE"])
    def asynchronous(name: str, sub: str):
        if name not in containers:
            return Response(f"error finding function {name}: not found", 404)
        call_id = request.headers.get("X-Call-Id") or str(uuid.uuid4())
        method, query, headers, body = request.method, request.query_string.decode(), dict(request.headers), request.get_data()
        headers["X-Call-Id"] = call_id
        target = headers.get("X-Callback-Url")

        def run() -> None:
            start = time.time()
            status, out_headers, out = forward(name, method, sub, query, headers, body)
            if target:
                callback(target, call_id, name, status, out_headers, out, time.time() - start)

        worker.submit(run)
        return Response("", 202, headers={"X-Call-Id": call_id})

    return app


def lambda_app(functions: list[str]) -> Flask:
    """The Lambda Invoke API (/2015-03-31/functions/<name>/invocations) and a Function URL front per function."""
    app = Flask("lambda")
    handlers = Hosted(functions, "lambda_function.py", "handler")

    def context(name: str) -> SimpleNamespace:
        return SimpleNamespace(function_name=name, aws_request_id=uuid.uuid4().hex)

    @app.post("/2015-03-31/functions/<name>/invocations")
    def invoke(name: str):
        if name not in handlers:
            return Response(json.dumps({"Message": f"Function not found: {name}"}), 404,
                            headers={"x-amzn-ErrorType": "ResourceNotFoundException"}, mimetype="application/json")
        event = json.loads(request.get_data() or b"{}")
        if request.headers.get("X-Amz-Invocation-Type") == "Event":
            handlers.submit(name, event, context(name))
            return Response("", 202)
        return Response(json.dumps(handlers.run(name, event, context(name))), 200, mimetype="application/json")

    @app.route("/url/<name>", defaults={"sub": ""}, methods=["GET", "POST"])
    @app.route("/url/<name>/<path:sub>", methods=["GET", "POST"])
    def function_url(name: str, sub: str):
        if name not in handlers:
            return Response("function not found", 404)
        body = request.get_data()
        event = {"version": "2.0", "routeKey": "$default", "rawPath": "/" + sub, "rawQueryString": request.query_string.decode(),
                 "headers": {k.lower(): v for k, v in request.headers.items()},
                 "requestContext": {"http": {"method": request.method, "path": "/" + sub, "protocol": "HTTP/1.1",
                                             "sourceIp": "127.0.0.1", "userAgent": request.headers.get("User-Agent", "")},
                                    "requestId": uuid.uuid4().hex, "stage": "$default"},
                 "body": base64.b64encode(body).decode(), "isBase64Encoded": True}
        out = handlers.run(name, event, context(name))
        raw = base64.b64decode(out["body"]) if out.get("isBase64Encoded") else out.get("body", "")
        return Response(raw, out.get("statusCode", 200), headers=out.get("headers") or {})

    return app


def gcf_app(function: str, target: str | None = None) -> Any:
    """functions-framework's own app for functions/<function>/main.py (signature from the decorator)."""
    import functions_framework

    return functions_framework.create_app(target=target or function, source=str(FUNCTIONS_DIR / function / "main.py"))


def build(function: str, platform: str, target: str | None = None, auth: str | None = None) -> Any:
    """The WSGI app serving `function` ('all' for a gateway with every function) as `platform` calls it."""
    functions = ["trigger", "client", "aggregator"] if function == "all" else [function]
    if platform == "gcf":
        if function == "all":
            raise ValueError("GCF serves one function per server: serve trigger, client and aggregator separately")
        return gcf_app(function, target)
    if platform == "openwhisk":
        return openwhisk_app(functions, auth)
    if platform == "openfaas":
        return openfaas_app(functions, auth)
    if platform == "lambda":
        return lambda_app(functions)
    raise ValueError(f"unknown platform {platform!r}: use gcf, lambda, openwhisk or openfaas")


def serve(function: str, platform: str, port: int, target: str | None = None, auth: str | None = None) -> None:
    """Serve on 127.0.0.1:port until interrupted."""
    from werkzeug.serving import run_simple

    app = build(function, platform, target, auth)
    print(f"serving {function} as {platform} on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    run_simple("127.0.0.1", port, app, threaded=True, use_reloader=False)
