"""AWS Lambda adapter: S3 notifications and EventBridge schedules routed first, HTTP through serverless-wsgi."""

from __future__ import annotations

from typing import Any

from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app

_APPS: dict[str, Any] = {}


def kind_of(event: Any) -> str:
    """'s3', 'schedule', 'http' or 'direct' for a Lambda event."""
    if not isinstance(event, dict):
        return "direct"
    if isinstance(event.get("Records"), list) and event["Records"] and "s3" in event["Records"][0]:
        return "s3"
    if event.get("source") == "aws.events" or event.get("detail-type") == "Scheduled Event":
        return "schedule"
    if "httpMethod" in event or ("requestContext" in event and ("http" in event["requestContext"] or "httpMethod" in event["requestContext"])):
        return "http"
    return "direct"


def handle(function: str, event: Any, context: Any) -> Any:
    """Route one Lambda event; serverless-wsgi fails on non-HTTP events, so those never reach it."""
    kind = kind_of(event)
    if kind == "s3":
        status, out = common.run_events(common.store_events(event), "lambda")
        if status >= 500:
            raise RuntimeError(out)  # Lambda retries failed asynchronous events
        return out
    if kind == "schedule":
        status, out = common.call("trigger", {}, "lambda", entry="tick")
        if status >= 500:
            raise RuntimeError(out)
        return out
    if kind == "http":
        try:
            import serverless_wsgi
        except ImportError as exc:
            raise RuntimeError("HTTP events need serverless-wsgi: pip install 'fedkeeper[aws]'") from exc
        app = _APPS.get(function) or _APPS.setdefault(function, create_app(function, "lambda"))
        return serverless_wsgi.handle_request(app, event, context)
    status, out = common.call(function, event if isinstance(event, dict) else {}, "lambda")
    if status >= 500:
        raise RuntimeError(out)
    return out
