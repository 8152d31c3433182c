"""The Lambda plan run by the Serverless Framework itself (serverless-offline, serverless-s3-local).

The functions come from the serverless.yml that `fedkeeper deploy lambda` writes. A federation starts with
POST /rounds through API Gateway v2, the trigger fans the clients out with Invoke(InvocationType=Event), and
the aggregator runs on S3 ObjectCreated notifications. The federation's store is SeaweedFS, because S3's
atomic and conditional writes carry the claims, and s3rver (inside serverless-s3-local) has neither; its
webhook is turned into the S3 records that S3 hands to Lambda, delivered as S3 delivers them, by an
asynchronous invoke. A second test runs serverless-s3-local's own S3 event source against the plan's rules.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote_plus
import urllib.error
import urllib.request

import pytest
import yaml

from fedkeeper.core import config, keys
from fedkeeper.federation import setup
from fedkeeper.platforms import deploy
from fedkeeper.store import open_store
from tests import servers
from tests import serverless_tools as sls

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sls.missing() is not None, reason=str(sls.missing()))]
TOKEN = "offline-token"
ROUNDS = 3


def post(url: str, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """POST an empty JSON object; bounded, because a handler that raises hangs serverless-offline."""
    req = urllib.request.Request(url, data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def plan_for(url: str, ports: dict, **platform) -> dict:
    """The serverless.yml `fedkeeper deploy lambda` writes for a 3-client federation on `url`."""
    cfg = config.from_dict({
        "rounds": ROUNDS, "seed": 3, "store": url, "events": "store",
        "model": {"epochs": 1, "jit_compile": False},
        "platforms": [{"name": "aws", "kind": "lambda", "clients": 3, "timeout_s": 120,
                       "endpoint": f"http://127.0.0.1:{ports['lambda']}", "options": {"region": "us-east-1"}, **platform}]})
    return cfg, yaml.safe_load(deploy.plan_for(cfg, "aws").files["serverless.yml"])


class S3Notifier:
    """SeaweedFS's filer webhook in, S3 ObjectCreated records out: filtered by the plan's rules, sent by Invoke(Event)."""

    def __init__(self, plan: dict, function: str, port: int) -> None:
        spec = plan["functions"][function]
        s3 = next(e["s3"] for e in spec["events"] if "s3" in e)
        self.bucket, self.function = s3["bucket"], spec["name"]
        self.prefix = next((r["prefix"] for r in s3["rules"] if "prefix" in r), "")
        self.suffix = next((r["suffix"] for r in s3["rules"] if "suffix" in r), "")
        self.port, self.lambda_url, self.sent = port, None, []
        notifier = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                self.send_response(200)
                self.end_headers()
                notifier.notify(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Hook)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notify(self, hook: dict) -> None:
        """Forward one filer event when S3 would notify for it (ObjectCreated under the prefix, with the suffix)."""
        import boto3

        parts = str(hook.get("key", "")).lstrip("/").split("/", 2)
        entry = (hook.get("message") or {}).get("new_entry") or {}
        if hook.get("event_type") not in ("create", "update") or len(parts) < 3 or entry.get("is_directory"):
            return
        bucket, key = parts[1], parts[2]
        if bucket != self.bucket or not key.startswith(self.prefix) or not key.endswith(self.suffix):
            return
        record = {"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                  "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "eventName": "ObjectCreated:Put",
                  "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                         "object": {"key": quote_plus(key), "size": (entry.get("attributes") or {}).get("file_size", 0)}}}
        lam = boto3.client("lambda", endpoint_url=self.lambda_url, region_name="us-east-1")
        resp = lam.invoke(FunctionName=self.function, InvocationType="Event", Payload=json.dumps({"Records": [record]}))
        self.sent.append((key, resp["StatusCode"]))

    def stop(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def federation(tmp_path, monkeypatch):
    """A 3-client Lambda federation on SeaweedFS, served by `serverless offline start`; yields (server, store, config, notifier)."""
    ports = sls.offline_ports()
    creds = {"AWS_ACCESS_KEY_ID": servers.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": servers.SECRET_KEY,
             "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    hook_port = servers.free_port()
    try:
        weed = servers.start_seaweedfs(bucket="fedkeeper", webhook=f"http://127.0.0.1:{hook_port}/", webhook_prefix="fed/")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    url = weed.url("fed")
    cfg, plan = plan_for(url, ports)
    notifier = srv = None
    try:
        notifier = S3Notifier(plan, "fedkeeper-aggregator", hook_port)
        service = sls.service_dir(tmp_path / "service", sls.offline_doc(plan, ports))
        srv = sls.start_offline(service, ports, dict(creds, FEDKEEPER_TOKEN=TOKEN, FEDKEEPER_TF_THREADS="1",
                                                     TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0"))
        notifier.lambda_url = srv.invoke
        store = open_store(url)
        setup(cfg, store, progress=lambda s: None)
        yield srv, store, cfg, notifier
    finally:
        for thing in (srv, notifier, weed):
            if thing is not None:
                thing.stop()


def wait_evaluated(srv: sls.Offline, store, rounds: int, timeout: float = 240) -> list[float]:
    """Test accuracies once the last round's evaluation exists."""
    end = time.time() + timeout
    while time.time() < end:
        if store.exists(keys.evaluation(rounds - 1)):
            return [store.get_json(keys.evaluation(r))["test_accuracy"] for r in range(rounds)]
        time.sleep(0.5)
    raise AssertionError(f"federation did not finish; state {store.get_json_or(keys.STATE)}\n{srv.tail()}")


def test_three_rounds_on_serverless_offline(federation):
    """Every call of three rounds crosses the framework: HTTP API v2, Invoke(Event), S3 records to the aggregator."""
    srv, store, cfg, notifier = federation
    assert post(f"{srv.http}/rounds")[0] == 401  # API Gateway passes the request through; the function checks the token
    status, body = post(f"{srv.http}/rounds", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and body["status"] == "started", (body, srv.tail())
    accs = wait_evaluated(srv, store, ROUNDS)
    results = [store.get_json(keys.result(r)) for r in range(ROUNDS)]
    assert [sorted(r["included"]) for r in results] == [sorted(c.id for c in cfg.clients)] * ROUNDS
    # Each round was closed by an aggregator that an S3 notification started, exactly once.
    assert all(r["timings"]["triggered_by"] == "event" for r in results)
    assert [len(store.list(f"{keys.round_prefix(r)}aggregations/")) for r in range(ROUNDS)] == [1] * ROUNDS
    assert accs[-1] > accs[0] and accs[-1] > 0.5, accs
    # Only update blobs were notified (the plan's suffix rule), one per client and round, all accepted with 202.
    assert sorted(k for k, _ in notifier.sent) == sorted(f"fed/{keys.update(r, c.id)}" for r in range(ROUNDS) for c in cfg.clients)
    assert {code for _, code in notifier.sent} == {202}
    # The trigger started each round's clients, and the aggregator each evaluation and the next round, by Invoke.
    assert sls.invocations(srv, "fedkeeper-client") >= ROUNDS * 4
    assert sls.invocations(srv, "fedkeeper-trigger") >= ROUNDS + 2


PROBE = """
import json, os

from fedkeeper.platforms import aws, common


def handler(event, context):
    # What the aggregator's entry would make of the event: its kind and the update keys in it.
    seen = {"kind": aws.kind_of(event), "keys": [e["key"] for e in common.store_events(event)]}
    with open(os.environ["PROBE_OUT"], "a") as fh:
        fh.write(json.dumps(seen) + "\\n")
    return seen
"""


def test_s3_local_fires_the_aggregator_by_the_plan_rules(tmp_path):
    """serverless-s3-local's S3 event source fires the aggregator's event for update blobs only, as S3 records."""
    ports = sls.offline_ports()
    url = f"s3://fedkeeper/fed?endpoint=http://127.0.0.1:{ports['s3']}&region=us-east-1"
    _, plan = plan_for(url, ports)
    # The aggregator keeps the plan's S3 event and environment; a probe stands in for its handler, to record
    # what arrives (the aggregator itself would need a whole federation in the bucket).
    plan["functions"]["fedkeeper-aggregator"]["handler"] = "probe/s3_probe.handler"
    service = sls.service_dir(tmp_path / "service", sls.offline_doc(plan, ports, tmp_path / "s3"))
    (service / "probe").mkdir()
    (service / "probe" / "s3_probe.py").write_text(PROBE)
    out = tmp_path / "probe.jsonl"
    srv = sls.start_offline(service, ports, {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER",
                                             "PROBE_OUT": str(out)}, s3_local=True)
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=srv.s3, region_name="us-east-1", aws_access_key_id="S3RVER",
                          aws_secret_access_key="S3RVER")
        for key in ("fed/rounds/000000/manifest.json", "other/rounds/000000/updates/c0.safetensors",
                    "fed/models/000001.safetensors", "fed/rounds/000000/updates/c0.safetensors"):
            s3.put_object(Bucket="fedkeeper", Key=key, Body=b"not a blob")
        end = time.time() + 60
        while sls.invocations(srv, "fedkeeper-aggregator") < 1 and time.time() < end:
            time.sleep(0.3)
        time.sleep(2)  # room for a wrong extra invocation to show up
        log = srv.tail(20000)
    finally:
        srv.stop()
    seen = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert seen == [{"kind": "s3", "keys": ["rounds/000000/updates/c0.safetensors"]}], log
