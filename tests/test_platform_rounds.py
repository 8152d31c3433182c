"""Whole rounds through served platform entry points: functions-framework (GCF), the Lambda Invoke API,
OpenWhisk actions and the OpenFaaS gateway, each started as its own process on 127.0.0.1."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from fedkeeper.core import config, keys
from fedkeeper.federation import setup
from fedkeeper.store import open_store
from tests import servers
from tests.servers import free_port
from tests.extras import mark

pytestmark = [pytest.mark.slow, mark("tf")]
TOKEN = "round-token"


class Served:
    """`fedkeeper serve ...` subprocesses, stopped by PID."""

    def __init__(self, env: dict):
        self.env = dict(os.environ, **env, FEDKEEPER_TOKEN=TOKEN, TF_CPP_MIN_LOG_LEVEL="2", FEDKEEPER_TF_THREADS="1")
        self.procs = []

    def start(self, function: str, platform: str, *extra: str) -> str:
        port = free_port()
        cmd = [sys.executable, "-m", "fedkeeper.cli", "serve", function, "--platform", platform, "--port", str(port), *extra]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        end = time.time() + 60
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-3000:])
            try:
                urllib.request.urlopen(url + "/", timeout=1)
            except urllib.error.HTTPError:
                return url
            except OSError:
                time.sleep(0.2)
                continue
            return url
        raise RuntimeError(f"{cmd} did not start")

    def stop(self):
        for p in self.procs:
            servers.stop_process(p)


class Relay(threading.Thread):
    """Watches the store for new update objects and delivers each once, in the platform's event shape."""

    def __init__(self, store, deliver):
        super().__init__(daemon=True)
        self.store, self.deliver, self.seen, self.stopped = store, deliver, set(), False

    def run(self):
        while not self.stopped:
            for k in self.store.list("rounds/"):
                if keys.parse_update(k) and k not in self.seen:
                    self.seen.add(k)
                    self.deliver(k)
            time.sleep(0.2)


def post(url, body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read()


def wait_finished(store, rounds, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        if store.exists(keys.evaluation(rounds - 1)):
            return [store.get_json(keys.evaluation(r))["test_accuracy"] for r in range(rounds)]
        time.sleep(0.3)
    raise AssertionError(f"federation did not finish; state: {store.get_json(keys.STATE)}")


def federation(store, platform: dict, rounds: int, **extra):
    cfg = config.from_dict({"rounds": rounds, "seed": 3, "model": {"epochs": 2}, "events": "store",
                            "platforms": [platform], **extra})
    cfg.store = store.url
    setup(cfg, store, progress=lambda s: None)
    return cfg


def assert_one_full_round(store, accs):
    """Round 0 was aggregated once, from all three clients, into a model that learned something."""
    assert aggregations(store, 1) == [1]
    assert len(store.get_json(keys.result(0))["included"]) == 3 and accs[0] > 0.5


def aggregations(store, rounds):
    return [len(store.list(f"{keys.round_prefix(r)}aggregations/")) for r in range(rounds)]


def test_gcf_functions_framework_federation(fake_gcs):
    """Trigger, client and aggregator on functions-framework; the aggregator fed GCS finalize CloudEvents."""
    store = open_store(fake_gcs.url("gcf-e2e"))
    served = Served({"FEDKEEPER_STORE": store.url, "STORAGE_EMULATOR_HOST": fake_gcs.host})
    try:
        urls = {fn: served.start(fn, "gcf") for fn in ("trigger", "client", "aggregator")}
        event_url = served.start("aggregator", "gcf", "--target", "aggregator_event")
        platform = {"name": "gcf", "kind": "gcf", "clients": 3, "auth_env": "FEDKEEPER_TOKEN",
                    "options": {"urls": urls, "wait_s": 0.5}}
        federation(store, platform, rounds=3)

        def cloud_event(key):
            post(event_url, {"bucket": fake_gcs.bucket, "name": f"gcf-e2e/{key}"},
                 {"ce-specversion": "1.0", "ce-type": "google.cloud.storage.object.v1.finalized", "ce-id": key,
                  "ce-source": f"//storage.googleapis.com/projects/_/buckets/{fake_gcs.bucket}", "ce-subject": f"objects/{key}"})

        relay = Relay(store, cloud_event)
        relay.start()
        assert post(urls["trigger"] + "/rounds", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        accs = wait_finished(store, 3)
        relay.stopped = True
    finally:
        served.stop()
    assert aggregations(store, 3) == [1, 1, 1]
    assert accs[-1] >= 0.85 and accs[-1] > accs[0], accs
    assert all(store.get_json(keys.result(r))["timings"]["triggered_by"] == "event" for r in range(3))


def test_lambda_round_through_invoke_api_and_s3_notifications(moto_s3, monkeypatch):
    """The Lambda entries behind the Invoke API: boto3 invokes with InvocationType=Event, S3 records to the aggregator."""
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    store = open_store(moto_s3.url("lambda-e2e"))
    served = Served({"FEDKEEPER_STORE": store.url})
    try:
        gw = served.start("all", "lambda")
        federation(store, {"name": "aws", "kind": "lambda", "clients": 3, "endpoint": gw,
                           "options": {"region": "us-east-1"}}, rounds=1)
        lam = boto3.client("lambda", endpoint_url=gw, region_name="us-east-1")

        def s3_notification(key):
            record = {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                      "awsRegion": "us-east-1", "s3": {"bucket": {"name": moto_s3.bucket},
                                                       "object": {"key": f"lambda-e2e/{key}", "size": 1}}}
            lam.invoke(FunctionName="fedkeeper-aggregator", InvocationType="Event",
                       Payload=json.dumps({"Records": [record]}).encode())

        relay = Relay(store, s3_notification)
        relay.start()
        # Start the round through the trigger's Function URL (payload format 2.0 through serverless-wsgi).
        status, body = post(f"{gw}/url/fedkeeper-trigger/rounds", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["status"] == "started"
        accs = wait_finished(store, 1)
        relay.stopped = True
    finally:
        served.stop()
    assert_one_full_round(store, accs)


@pytest.mark.parametrize("platform", ["openwhisk", "openfaas"])
def test_round_through_openwhisk_and_openfaas_http_shapes(platform, tmp_path, monkeypatch):
    """Non-blocking action invokes and raw web actions (OpenWhisk); the python3-http gateway (OpenFaaS)."""
    monkeypatch.setenv("PLATFORM_AUTH", "user:pass")
    monkeypatch.setenv("FEDKEEPER_TOKEN", TOKEN)
    store = open_store(str(tmp_path / "store"))
    served = Served({"FEDKEEPER_STORE": store.url, "PLATFORM_AUTH": "user:pass"})
    try:
        gw = served.start("all", platform, "--auth-env", "PLATFORM_AUTH")
        # OpenWhisk authenticates invokes with the namespace key; OpenFaaS functions check their bearer token.
        cred = "PLATFORM_AUTH" if platform == "openwhisk" else "FEDKEEPER_TOKEN"
        federation(store, {"name": platform, "kind": platform, "clients": 3, "endpoint": gw, "auth_env": cred},
                   rounds=1)
        auth = {"Authorization": "Basic dXNlcjpwYXNz" if platform == "openwhisk" else f"Bearer {TOKEN}"}
        if platform == "openwhisk":
            deliver = lambda key: post(f"{gw}/api/v1/namespaces/_/actions/fedkeeper-aggregator?blocking=false",
                                       {"key": key}, auth)
            start = f"{gw}/api/v1/web/_/default/fedkeeper-trigger/rounds"
        else:
            deliver = lambda key: post(f"{gw}/async-function/fedkeeper-aggregator", {"key": key}, auth)
            start = f"{gw}/function/fedkeeper-trigger/rounds"
        relay = Relay(store, deliver)
        relay.start()
        with pytest.raises(urllib.error.HTTPError) as info:
            post(start)
        assert info.value.code == 401
        status, body = post(start, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["round"] == 0
        accs = wait_finished(store, 1)
        relay.stopped = True
    finally:
        served.stop()
    assert_one_full_round(store, accs)
