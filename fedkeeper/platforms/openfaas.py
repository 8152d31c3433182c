"""OpenFaaS adapter for the python3-http template: handle(event, context) -> statusCode/body/headers."""

from __future__ import annotations

from typing import Any

from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app

_APPS: dict[str, Any] = {}


def handle(function: str, event: Any, context: Any) -> dict:
    """Run the template's event (method, path, headers, body, query) through the function's app; cron ticks the trigger."""
    headers = {k: v for k, v in dict(getattr(event, "headers", {}) or {}).items()}
    if function == "trigger" and headers.get("X-Connector", headers.get("x-connector", "")).startswith("cron-connector"):
        status, out = common.call("trigger", {}, "openfaas", entry="tick")
        return {"statusCode": 200 if status < 500 else status, "body": out, "headers": {"Content-Type": "application/json"}}
    app = _APPS.get(function) or _APPS.setdefault(function, create_app(function, "openfaas"))
    body = getattr(event, "body", b"") or b""
    query = getattr(event, "query", None) or {}
    qs = "&".join(f"{k}={v}" for k, v in dict(query).items())
    status, hdrs, out = common.wsgi_call(app, getattr(event, "method", "POST"), getattr(event, "path", "/") or "/",
                                         headers, body if isinstance(body, bytes) else str(body).encode(), qs)
    return {"statusCode": status, "body": out.decode(), "headers": {"Content-Type": hdrs.get("Content-Type", "application/json")}}
