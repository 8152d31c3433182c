"""The HTTP API of the functions: one Flask app for every platform (trigger: /rounds, /status, /tick, /clients)."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from flask import Flask, Response, request

from fedkeeper.functions.context import AGGREGATOR, CLIENT, TRIGGER, HandlerError
from fedkeeper.platforms import common
from fedkeeper.store.base import NotFound, StoreError

TOKEN_ENV = "FEDKEEPER_TOKEN"
TOKEN_FILE_ENV = "FEDKEEPER_TOKEN_FILE"
OPENFAAS_SECRET = Path("/var/openfaas/secrets/fedkeeper-token")
MSG_NO_TOKEN = "missing or wrong bearer token: send 'Authorization: Bearer <token>' (the FEDKEEPER_TOKEN secret)"


def expected_token() -> str | None:
    """The API token: FEDKEEPER_TOKEN, else the file named by FEDKEEPER_TOKEN_FILE, else an OpenFaaS secret."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token.strip()
    for path in (os.environ.get(TOKEN_FILE_ENV), OPENFAAS_SECRET):
        if path and Path(path).is_file():
            return Path(path).read_text().strip()
    return None


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body, default=str), status=status, mimetype="application/json")


def _authorized() -> bool:
    want = expected_token()
    if want is None:
        return True  # no token configured: the platform's own auth (IAM, API keys) guards the function
    got = request.headers.get("Authorization", "")
    scheme, _, value = got.partition(" ")
    if not got and request.path.rstrip("/") == "/events" and "token" in request.args:
        # Store notifications come from push services that cannot set headers (a Pub/Sub push
        # subscription, a webhook); they carry the token in the endpoint URL instead.
        scheme, value = "bearer", request.args["token"]
    # compare_digest takes the same time wherever the strings differ, so timing leaks nothing.
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), want.encode())


def create_app(function: str = TRIGGER, platform: str = "") -> Flask:
    """A WSGI app for one function: POST / runs it on a JSON event; the trigger adds /rounds, /status, /tick."""
    if function not in (TRIGGER, CLIENT, AGGREGATOR):
        raise ValueError(f"unknown function {function!r}")
    app = Flask(f"fedkeeper-{function}")
    # Werkzeug stops reading a body past this, chunked or not; Content-Length is checked before auth below.
    app.config["MAX_CONTENT_LENGTH"] = common.MAX_BODY

    @app.before_request
    def _auth():
        length = request.content_length
        if length is not None and length > common.MAX_BODY:
            return _json(413, {"error": f"request body is {length} bytes, over the {common.MAX_BODY}-byte limit; "
                                        "send a small JSON object"})
        if request.path.rstrip("/") in ("/healthz",):
            return None
        if not _authorized():
            return _json(401, {"error": MSG_NO_TOKEN})
        return None

    def body() -> dict:
        raw = request.get_data(cache=True)
        return common.parse_json(raw)

    @app.errorhandler(HandlerError)
    def _handler_error(exc: HandlerError):
        return _json(exc.status, {"error": str(exc)})

    @app.errorhandler(404)
    def _not_found(_exc):
        return _json(404, {"error": f"no route {request.method} {request.path}; see the API in the README"})

    @app.errorhandler(405)
    def _bad_method(_exc):
        return _json(405, {"error": f"{request.method} is not allowed on {request.path}"})

    @app.errorhandler(413)
    def _too_large(_exc):
        return _json(413, {"error": f"request body is over the {common.MAX_BODY}-byte limit; send a small JSON object"})

    @app.errorhandler(400)
    def _bad_request(exc):
        return _json(400, {"error": f"bad request: {getattr(exc, 'description', exc)}"})

    @app.errorhandler(StoreError)
    def _store_error(exc: StoreError):
        return _json(503, {"error": f"the store is unavailable: {exc}"})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        return _json(500, {"error": f"{type(exc).__name__}: {exc}"})

    @app.get("/healthz")
    def healthz():
        return _json(200, {"ok": True, "function": function})

    @app.post("/")
    def invoke():
        status, out = common.call(function, body(), platform)
        return _json(status, out)

    if function == AGGREGATOR:
        @app.post("/events")
        def store_event():
            payload = body()
            return _json(*common.run_events(common.store_events(payload, dict(request.headers)), platform))

    if function == TRIGGER:
        @app.post("/rounds")
        def start_round():
            event = body()
            common.store_url(event)  # a request may repeat the function's store but never choose another
            extra = set(event) - {"store", "round"}
            if extra:
                raise HandlerError(f"unknown field(s) {sorted(extra)} in POST /rounds; it takes 'store' and 'round'")
            status, out = common.call(TRIGGER, event, platform)
            if status == 200 and out.get("status") == "exists":
                status = 409
            return _json(status, out)

        @app.get("/status")
        def status():
            from fedkeeper import report

            event = {"store": request.args["store"]} if "store" in request.args else {}
            try:
                ctx = common.context(event, platform)
                from fedkeeper.core import keys
                from fedkeeper.functions import protocol

                if not ctx.store.exists(keys.FEDERATION):
                    return _json(404, {"error": f"{ctx.store.url} holds no federation; run `fedkeeper setup` first"})
                state = protocol.read_state(ctx.store).to_dict()
                # Counted from 1, like the rounds beside it and every surface a person reads.
                state["round"] += 1
                state["next_round"] += 1
                rounds = [{k: r[k] for k in ("round", "status", "test_accuracy", "aggregations")}
                          for r in report.collect(ctx.store)["rounds"]]
            except HandlerError as exc:
                return _json(exc.status, {"error": str(exc)})
            except NotFound:
                return _json(404, {"error": "the store holds no federation; run `fedkeeper setup` first"})
            return _json(200, {"state": state, "rounds": rounds})

        @app.post("/clients")
        def add_client():
            from fedkeeper.functions import population

            event = body()
            extra = set(event) - {"store", "id", "platform", "data"}
            if extra:
                raise HandlerError(f"unknown field(s) {sorted(extra)[:10]} in POST /clients; it takes 'id', "
                                   "'platform' and optionally 'data'")
            if "id" not in event or "platform" not in event:
                raise HandlerError("POST /clients needs 'id' and 'platform' (and optionally 'data')")
            ctx = common.context(event, platform)
            return _json(201, population.add_client(ctx, event["id"], event["platform"], event.get("data", "")))

        @app.delete("/clients/<path:cid>")
        def remove_client(cid: str):
            from fedkeeper.functions import population

            event = {"store": request.args["store"]} if "store" in request.args else {}
            return _json(200, population.remove_client(common.context(event, platform), cid))

        @app.get("/clients")
        def list_clients():
            from fedkeeper import clients

            event = {"store": request.args["store"]} if "store" in request.args else {}
            return _json(200, clients.view(common.context(event, platform).store))

        @app.post("/tick")
        def tick():
            status, out = common.call(TRIGGER, body(), platform, entry="tick")
            return _json(200 if status == 409 else status, out)

    return app
