"""Event translators: S3 records, MinIO webhooks, SeaweedFS filer webhooks and GCS CloudEvents to store keys."""

import json
from pathlib import Path

from fedkeeper.store import events

DATA = Path(__file__).parent / "data"
UPDATE = "rounds/000000/updates/a.safetensors"


def s3_record(bucket, key, name="ObjectCreated:Put"):
    """The documented shape of one AWS S3 notification record (keys URL-encoded)."""
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventName": name,
            "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": key, "size": 10, "eTag": "abc", "sequencer": "0A1B"}}}


def test_s3_records_decode_keys_and_drop_foreign_ones():
    payload = {"Records": [
        s3_record("fed", "p/rounds/000000/updates/a.safetensors"),
        s3_record("fed", "p/rounds/000000/updates/client+one%2Bx.safetensors"),
        s3_record("other", "p/rounds/000000/updates/b.safetensors"),
        s3_record("fed", "elsewhere/rounds/000000/updates/c.safetensors"),
        s3_record("fed", "p/rounds/000000/updates/d.safetensors", name="ObjectRemoved:Delete"),
    ]}
    assert events.translate(payload, "s3://fed/p") == [UPDATE, "rounds/000000/updates/client one+x.safetensors"]


def test_minio_webhook_uses_the_same_records():
    payload = {"EventName": "s3:ObjectCreated:Put", "Key": "fed/p/rounds/000000/updates/a.safetensors",
               "Records": [dict(s3_record("fed", "p/rounds/000000/updates/a.safetensors"),
                                eventName="s3:ObjectCreated:Put", eventSource="minio:s3")]}
    assert events.translate(payload, "s3://fed/p?endpoint=http://127.0.0.1:9000") == [UPDATE]


def test_seaweedfs_captured_body():
    payload = json.loads((DATA / "seaweedfs_create.json").read_text())
    assert events.translate(payload, "s3://fed/p") == [UPDATE]
    assert events.translate(payload, "s3://fed/q") == []
    assert events.translate(payload, "s3://other/p") == []
    directory = json.loads((DATA / "seaweedfs_directory.json").read_text())
    assert events.translate(directory, "s3://fed") == []
    deleted = dict(payload, event_type="delete")
    assert events.translate(deleted, "s3://fed/p") == []


def test_gcs_cloudevents_structured_and_binary():
    data = {"bucket": "fed", "name": "p/rounds/000000/updates/a.safetensors", "generation": "1700000000000",
            "contentType": "application/octet-stream", "size": "10"}
    structured = {"specversion": "1.0", "type": events.GCS_FINALIZED, "source": "//storage.googleapis.com/projects/_/buckets/fed",
                  "id": "1", "subject": "objects/p/rounds/000000/updates/a.safetensors", "data": data}
    assert events.translate(structured, "gs://fed/p") == [UPDATE]
    assert events.translate(data, "gs://fed/p", headers={"Ce-Type": events.GCS_FINALIZED, "ce-id": "1"}) == [UPDATE]
    deleted = dict(structured, type="google.cloud.storage.object.v1.deleted")
    assert events.translate(deleted, "gs://fed/p") == []


def test_pubsub_push_notification():
    payload = {"message": {"attributes": {"bucketId": "fed", "objectId": "p/rounds/000000/updates/a.safetensors",
                                          "eventType": "OBJECT_FINALIZE"}, "data": ""}, "subscription": "s"}
    assert events.translate(payload, "gs://fed/p") == [UPDATE]


def test_unknown_shapes_and_non_update_keys_are_ignored():
    assert events.translate({"hello": "world"}, "s3://fed/p") == []
    keys = ["rounds/000000/result.json", UPDATE, "models/000001.safetensors", "rounds/000000/updates/x.tmp"]
    assert events.update_keys(keys) == [UPDATE]


def test_legacy_gcf_background_events():
    data = {"bucket": "fed", "name": "p/rounds/000000/updates/a.safetensors", "metageneration": "1",
            "resourceState": "exists", "size": "10"}
    context = {"eventId": "1", "timestamp": "2026-01-01T00:00:00Z", "eventType": "google.storage.object.finalize",
               "resource": {"service": "storage.googleapis.com", "name": "projects/_/buckets/fed/objects/x",
                            "type": "storage#object"}}
    assert events.translate({"context": context, "data": data}, "gs://fed/p") == [UPDATE]
    old = {"eventType": "providers/cloud.storage/eventTypes/object.change", "resource": "projects/_/buckets/fed",
           "data": data}
    assert events.translate(old, "gs://fed/p") == [UPDATE]
    assert events.translate({"eventType": "providers/cloud.storage/eventTypes/object.change", "resource": "x",
                             "data": dict(data, resourceState="not_exists")}, "gs://fed/p") == []
    deleted = {"context": dict(context, eventType="google.storage.object.delete"), "data": data}
    assert events.translate(deleted, "gs://fed/p") == []
    assert events.translate({"context": context, "data": dict(data, bucket="other")}, "gs://fed/p") == []


def test_legacy_event_reaches_the_aggregator_through_events_route(federation, monkeypatch):
    from fedkeeper.core import keys
    from fedkeeper.functions.context import NullInvoker
    from fedkeeper.platforms import common
    from fedkeeper.platforms.http import create_app

    monkeypatch.setenv("FEDKEEPER_STORE", "gs://fed/p")
    monkeypatch.setitem(common._STORES, "gs://fed/p", federation.store)
    monkeypatch.setitem(common._INVOKERS, "gs://fed/p", NullInvoker())
    federation.open_round(0)
    federation.submit_all(0)
    body = {"context": {"eventType": "google.storage.object.finalize", "eventId": "9"},
            "data": {"bucket": "fed", "name": "p/" + keys.update(0, federation.ids[0])}}
    resp = create_app("aggregator").test_client().post("/events", json=body)
    assert resp.status_code == 200 and resp.get_json()["events"] == 1
    assert resp.get_json()["results"][0]["status"] == "done"
