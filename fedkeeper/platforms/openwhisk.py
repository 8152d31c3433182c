"""OpenWhisk adapter: web-action fields through the shared Flask app, alarm ticks and plain invocations as dicts."""

from __future__ import annotations

import base64
from typing import Any

from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app

_APPS: dict[str, Any] = {}


def main(function: str, args: dict) -> dict:
    """OpenWhisk calls main(args) -> dict; a web action gets __ow_* fields and returns statusCode/headers/body."""
    if "__ow_method" in args:
        app = _APPS.get(function) or _APPS.setdefault(function, create_app(function, "openwhisk"))
        body = args.get("__ow_body") or ""
        headers = dict(args.get("__ow_headers") or {})
        ctype = headers.get("content-type", "")
        # Raw web actions hand over the body base64-encoded unless it is text.
        raw = base64.b64decode(body) if body and not ctype.startswith(("application/json", "text/")) and _b64(body) else \
            body.encode() if isinstance(body, str) else body
        status, hdrs, out = common.wsgi_call(app, args["__ow_method"], args.get("__ow_path") or "/", headers, raw,
                                             args.get("__ow_query") or "")
        return {"statusCode": status, "headers": {"Content-Type": hdrs.get("Content-Type", "application/json")},
                "body": out.decode()}
    if function == "trigger" and args.get("fedkeeper_tick"):  # the alarms feed's trigger carries this param
        status, out = common.call("trigger", {k: v for k, v in args.items() if k == "store"}, "openwhisk", entry="tick")
        return out if status < 500 else {"error": out}
    status, out = common.call(function, args, "openwhisk")
    # A dict with "error" marks the activation as failed in OpenWhisk.
    return out if status < 400 else {"error": out.get("error", out), "statusCode": status}


def _b64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
        return True
    except (ValueError, TypeError):
        return False
