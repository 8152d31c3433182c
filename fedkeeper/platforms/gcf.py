"""Google Cloud Functions adapter: HTTP requests through the shared Flask app, GCS CloudEvents to the aggregator."""

from __future__ import annotations

from typing import Any

from fedkeeper.platforms import common
from fedkeeper.platforms.http import create_app

_APPS: dict[str, Any] = {}


def http(function: str, request: Any) -> Any:
    """Serve a functions-framework (Flask) request with the function's app."""
    app = _APPS.get(function) or _APPS.setdefault(function, create_app(function, "gcf"))
    # The framework has already read the body, so the request is replayed into our app from its fields.
    status, headers, body = common.wsgi_call(app, request.method, request.path, dict(request.headers),
                                             request.get_data(), request.query_string.decode())
    return body, status, {"Content-Type": headers.get("Content-Type", "application/json")}


def cloud_event(event: Any) -> dict:
    """Handle a `google.cloud.storage.object.v1.finalized` CloudEvent; other events are ignored."""
    from fedkeeper.store import events

    url = common.store_url(None)
    attrs = {"type": event["type"]} if hasattr(event, "__getitem__") else {}
    data = event.data if isinstance(getattr(event, "data", None), dict) else {}
    bucket, prefix = events.root_of(url)
    found = events.update_keys(events.from_gcs_cloudevent(attrs, data, bucket, prefix))
    status, out = common.run_events([{"store": url, "key": k} for k in found], "gcf")
    if status >= 500:  # a raised error makes Eventarc retry the delivery, as at-least-once intends
        raise RuntimeError(out)
    return out
