"""A stand-in for an OpenFaaS python3-http function container: the template's HTTP server around handler.handle.

The python3-http template (openfaas/python-flask-template) runs a Flask app behind of-watchdog in HTTP
mode. Every method and path reaches handle(event, context), where event has body (bytes), headers,
method, query (the request's args) and path, and context has hostname. A dict answer gives statusCode
(default 200), body (a dict or list is sent as JSON, anything else as text) and headers; None gives an
empty 200.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Any

from flask import Flask, Response, request


class Event:
    """The template's view of the request."""

    def __init__(self) -> None:
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    """The template's context: the container's hostname."""

    def __init__(self) -> None:
        self.hostname = os.getenv("HOSTNAME", "localhost")


def reply(resp: Any) -> Response:
    """The template's mapping from handle()'s answer to an HTTP response."""
    if resp is None:
        return Response("", 200)
    body = resp.get("body", "")
    if isinstance(body, (dict, list)):
        body, mimetype = json.dumps(body), "application/json"
    else:
        body, mimetype = str(body), None
    return Response(body, resp.get("statusCode", 200), headers=list((resp.get("headers") or {}).items()),
                    mimetype=mimetype)


def create_app(handler_path: str) -> Flask:
    """The function's server for the handler file (functions/<fn>/handler.py)."""
    spec = importlib.util.spec_from_file_location("function_handler", handler_path)
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    app = Flask("openfaas-python3-http")

    @app.before_request
    def _chunked():
        # Chunked bodies arrive without a length; the template marks the input terminated so they stream.
        if request.headers.get("Transfer-Encoding") == "chunked":
            request.environ["wsgi.input_terminated"] = True

    @app.route("/", defaults={"path": ""}, methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "PUT", "POST", "PATCH", "DELETE"])
    def call(path: str) -> Response:
        return reply(handler.handle(Event(), Context()))

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve one handler on 127.0.0.1 (the template's upstream port is 5000)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("handler", help="path of the function's handler.py")
    ap.add_argument("--port", type=int, default=5000)
    args = ap.parse_args(argv)
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", args.port, create_app(args.handler), threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
