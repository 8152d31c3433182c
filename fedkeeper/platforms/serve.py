"""`fedkeeper serve`: run the deployable functions on 127.0.0.1 the way each platform calls them."""

from __future__ import annotations

import base64
import importlib.util
import json
import queue
import sys
import threading
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


def openwhisk_app(functions: list[str], auth: str | None = None) -> Flask:
    """The slice of the OpenWhisk API that FedKeeper uses: non-blocking action invokes and raw web actions."""
    app = Flask("openwhisk")
    mains = Hosted(functions, "__main__.py", "main")

    @app.post("/api/v1/namespaces/<ns>/actions/<name>")
    def invoke(ns: str, name: str):
        if name not in mains:
            return Response(json.dumps({"error": f"action {name} not found"}), 404, mimetype="application/json")
        if auth is not None:
            want = "Basic " + base64.b64encode(auth.encode()).decode()
            if request.headers.get("Authorization") != want:
                return Response(json.dumps({"error": "The supplied authentication is invalid"}), 401, mimetype="application/json")
        args = request.get_json(silent=True) or {}
        if request.args.get("blocking", "false") == "true":
            return Response(json.dumps(mains.run(name, args)), 200, mimetype="application/json")
        mains.submit(name, args)
        return Response(json.dumps({"activationId": uuid.uuid4().hex}), 202, mimetype="application/json")

    @app.route("/api/v1/web/<ns>/<pkg>/<name>", defaults={"sub": ""}, methods=["GET", "POST", "PUT", "DELETE"])
    @app.route("/api/v1/web/<ns>/<pkg>/<name>/<path:sub>", methods=["GET", "POST", "PUT", "DELETE"])
    def web(ns: str, pkg: str, name: str, sub: str):
        if name not in mains:
            return Response(json.dumps({"error": f"action {name} not found"}), 404, mimetype="application/json")
        raw = request.get_data()
        args = {"__ow_method": request.method.lower(), "__ow_headers": {k.lower(): v for k, v in request.headers.items()},
                "__ow_path": "/" + sub if sub else "", "__ow_query": request.query_string.decode(),
                "__ow_body": raw.decode() if request.mimetype.startswith(("application/json", "text/")) else base64.b64encode(raw).decode()}
        out = mains.run(name, args)
        return Response(out.get("body", ""), out.get("statusCode", 200), headers=out.get("headers") or {})

    return app


def openfaas_app(functions: list[str], auth: str | None = None) -> Flask:
    """A gateway for python3-http handlers: /function/<name> (sync) and /async-function/<name> (202, queued).

    Like OpenFaaS, invocation paths need no gateway credentials; each function checks its bearer token.
    """
    app = Flask("openfaas")
    handlers = Hosted(functions, "handler.py", "handle")

    def event(method: str, sub: str) -> SimpleNamespace:
        """The template's event object for the current request."""
        return SimpleNamespace(body=request.get_data(), headers=dict(request.headers), method=method,
                               query=dict(request.args), path="/" + sub)

    context = SimpleNamespace(hostname="localhost")

    def reply(out: dict) -> Response:
        body = out.get("body", "")
        body = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return Response(body, out.get("statusCode", 200), headers=out.get("headers") or {})

    @app.route("/function/<name>", defaults={"sub": ""}, methods=["GET", "POST", "PUT", "DELETE"])
    @app.route("/function/<name>/<path:sub>", methods=["GET", "POST", "PUT", "DELETE"])
    def sync(name: str, sub: str):
        if name not in handlers:
            return Response("function not found", 404)
        return reply(handlers.run(name, event(request.method, sub), context))

    @app.route("/async-function/<name>", defaults={"sub": ""}, methods=["POST"])
    @app.route("/async-function/<name>/<path:sub>", methods=["POST"])
    def asynchronous(name: str, sub: str):
        if name not in handlers:
            return Response("function not found", 404)
        handlers.submit(name, event("POST", sub), context)
        return Response("", 202, headers={"X-Call-Id": uuid.uuid4().hex})

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
