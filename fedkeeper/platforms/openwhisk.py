"""OpenWhisk adapter: web-action fields through the shared Flask app, alarm ticks and plain invocations as dicts."""

from __future__ import annotations

import base64
from typing import Any

from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app

_APPS: dict[str, Any] = {}


def main(function: str, args: dict) -> dict:
    """OpenWhisk calls main(args) -> dict; a raw web action gets __ow_* fields and returns statusCode/headers/body."""
    if "__ow_method" in args:
        app = _APPS.get(function) or _APPS.setdefault(function, create_app(function, "openwhisk"))
        headers = dict(args.get("__ow_headers") or {})
        body = args.get("__ow_body") or ""
        # The controller base64-encodes every body whose media type is not text/* (JSON included).
        binary = not headers.get("content-type", "text/plain").lower().startswith("text/")
        raw = base64.b64decode(body) if binary and body and _b64(body) else body.encode() if isinstance(body, str) else body
        status, hdrs, out = common.wsgi_call(app, args["__ow_method"], args.get("__ow_path") or "/", headers, raw,
                                             args.get("__ow_query") or "")
        ctype = hdrs.get("Content-Type", "application/json")
        # ...and base64-decodes the answer's body when its declared Content-Type is not text/*.
        text = ctype.lower().startswith("text/")
        return {"statusCode": status, "headers": {"Content-Type": ctype},
                "body": out.decode("utf-8", "replace") if text else base64.b64encode(out).decode()}
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
