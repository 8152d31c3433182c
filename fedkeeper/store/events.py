"""Translators from stores' object-created notifications to store keys (no SDK imports, pure dict work)."""

from __future__ import annotations

from typing import Iterable, Mapping
from urllib.parse import unquote_plus, urlsplit

from fedkeeper.core import keys as keymod

GCS_FINALIZED = "google.cloud.storage.object.v1.finalized"


def _relative(bucket: str, key: str, want_bucket: str, prefix: str) -> str | None:
    """key relative to the store root, or None if it belongs to another bucket or lies outside the prefix."""
    if bucket != want_bucket or not key.startswith(prefix):
        return None
    rel = key[len(prefix):]
    return rel or None


def from_s3_records(payload: Mapping, bucket: str, prefix: str) -> list[str]:
    """AWS S3 notifications (and MinIO webhooks, which use the same records): ObjectCreated keys."""
    out = []
    for rec in payload.get("Records") or []:
        if not str(rec.get("eventName", "ObjectCreated")).startswith(("ObjectCreated", "s3:ObjectCreated")):
            continue
        s3 = rec.get("s3") or {}
        b = (s3.get("bucket") or {}).get("name", "")
        k = (s3.get("object") or {}).get("key")
        if k is None:
            continue
        # S3 URL-encodes keys in notifications, spaces as '+'.
        rel = _relative(b, unquote_plus(k), bucket, prefix)
        if rel:
            out.append(rel)
    return out


def from_seaweedfs(payload: Mapping, bucket: str, prefix: str) -> list[str]:
    """SeaweedFS filer webhook: {"event_type": "create"|"update", "key": "/buckets/BUCKET/KEY", "message": {...}}."""
    if payload.get("event_type") not in ("create", "update"):
        return []
    entry = ((payload.get("message") or {}).get("new_entry") or {})
    if entry.get("is_directory"):
        return []
    path = str(payload.get("key", ""))
    parts = path.lstrip("/").split("/", 2)
    if len(parts) < 3 or parts[0] != "buckets":
        return []
    rel = _relative(parts[1], parts[2], bucket, prefix)
    return [rel] if rel else []


def from_gcs_cloudevent(attributes: Mapping, data: Mapping, bucket: str, prefix: str) -> list[str]:
    """A `google.cloud.storage.object.v1.finalized` CloudEvent (attributes: type, ...; data: bucket, name)."""
    if attributes.get("type") != GCS_FINALIZED:
        return []
    rel = _relative(str(data.get("bucket", "")), str(data.get("name", "")), bucket, prefix)
    return [rel] if rel else []


GCS_LEGACY = ("google.storage.object.finalize", "providers/cloud.storage/eventTypes/object.change")


def from_gcs_legacy(payload: Mapping, bucket: str, prefix: str) -> list[str]:
    """A legacy GCF background event: {"context": {"eventType": ...}, "data": {bucket, name}} (or eventType on top)."""
    context = payload.get("context") if isinstance(payload.get("context"), Mapping) else {}
    etype = context.get("eventType") or context.get("event_type") or payload.get("eventType")
    data = payload.get("data") if isinstance(payload.get("data"), Mapping) else {}
    if etype not in GCS_LEGACY or data.get("resourceState") == "not_exists":
        return []
    rel = _relative(str(data.get("bucket", "")), str(data.get("name", "")), bucket, prefix)
    return [rel] if rel else []


def from_pubsub_push(payload: Mapping, bucket: str, prefix: str) -> list[str]:
    """A GCS notification delivered by a Pub/Sub push subscription (attributes bucketId, objectId, eventType)."""
    attrs = ((payload.get("message") or {}).get("attributes") or {})
    if attrs.get("eventType") != "OBJECT_FINALIZE":
        return []
    rel = _relative(str(attrs.get("bucketId", "")), str(attrs.get("objectId", "")), bucket, prefix)
    return [rel] if rel else []


def root_of(store_url: str) -> tuple[str, str]:
    """(bucket, prefix-with-trailing-slash) of an s3:// or gs:// store URL."""
    parts = urlsplit(store_url)
    path = parts.path.strip("/")
    return parts.netloc, (path + "/" if path else "")


class EventError(ValueError):
    """A store notification has a known shape but malformed fields; the message says which."""


def translate(payload: Mapping, store_url: str, headers: Mapping | None = None) -> list[str]:
    """Detect the event's shape and return the store keys it reports as created; raises EventError if malformed."""
    try:
        keys = _translate(payload, store_url, headers)
    except (TypeError, AttributeError, ValueError, KeyError) as exc:
        raise EventError(f"the store notification is malformed ({type(exc).__name__}: {str(exc)[:200]}); send the "
                         "store's own event body (S3 records, a SeaweedFS or MinIO webhook, a CloudEvent, a Pub/Sub push)") from None
    return [k for k in keys if isinstance(k, str)]


def _translate(payload: Mapping, store_url: str, headers: Mapping | None = None) -> list[str]:
    bucket, prefix = root_of(store_url)
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    if "Records" in payload:
        return from_s3_records(payload, bucket, prefix)
    if "event_type" in payload and "key" in payload:
        return from_seaweedfs(payload, bucket, prefix)
    if headers.get("ce-type"):  # binary-mode CloudEvent: attributes in headers, data in the body
        return from_gcs_cloudevent({"type": headers["ce-type"]}, payload, bucket, prefix)
    if payload.get("specversion") and "data" in payload:  # structured-mode CloudEvent
        return from_gcs_cloudevent(payload, payload.get("data") or {}, bucket, prefix)
    if "message" in payload:
        return from_pubsub_push(payload, bucket, prefix)
    if "data" in payload and ("context" in payload or "eventType" in payload):
        return from_gcs_legacy(payload, bucket, prefix)
    return []


def update_keys(found: Iterable[str]) -> list[str]:
    """Only the keys that can complete a round (rounds/<r>/updates/<client>.safetensors)."""
    return [k for k in found if keymod.parse_update(k) is not None]
