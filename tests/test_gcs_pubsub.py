"""GCS notifications for real: fake-gcs-server publishes OBJECT_FINALIZE to the Pub/Sub emulator, whose push
subscription delivers them to the aggregator served by functions-framework, so `events: store` drives a
federation on a gs:// store with no watcher of our own in between.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedkeeper.core import config, keys
from fedkeeper.federation import setup
from fedkeeper.store import open_store
from tests import servers

pytestmark = pytest.mark.slow
EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
PROJECT, TOPIC, SUBSCRIPTION = "fedkeeper-test", "fedkeeper-updates", "fedkeeper-aggregator-push"
TOKEN = "pubsub-token"
ROUNDS = 2


def emulator_binary() -> str | None:
    """The Pub/Sub emulator of the Google Cloud CLI (component pubsub-emulator), if installed."""
    found = shutil.which("cloud-pubsub-emulator")
    if found:
        return found
    gcloud = shutil.which("gcloud")
    candidates = [EMULATOR] + ([Path(gcloud).resolve().parents[1] / "platform/pubsub-emulator/bin/cloud-pubsub-emulator"]
                               if gcloud else [])
    return next((str(c) for c in candidates if c.is_file()), None)


def call(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """One bounded HTTP call; HTTP errors come back as their status."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Procs:
    """Subprocesses of one test, each in its own session with a log file, stopped by PID."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fk-pubsub-"))
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        """Start cmd with env added to ours, logging to a file named after it."""
        log = self.dir / f"{name}.log"
        proc = subprocess.Popen(cmd, env=dict(os.environ, **env), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def wait_http(self, url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
        """Wait until url answers at all."""
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited: {self.logs()}")
            try:
                urllib.request.urlopen(url, timeout=1)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{url} did not answer in {timeout} s: {self.logs()}")

    def logs(self) -> str:
        """The end of every log, for failure messages."""
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for _, log in self.procs)

    def stop(self) -> None:
        """Stop everything started, then remove the logs."""
        for proc, _ in self.procs:
            servers.stop_process(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def serve(procs: Procs, function: str, env: dict) -> str:
    """`fedkeeper serve FUNCTION --platform gcf` (functions-framework) on a free loopback port."""
    port = servers.free_port()
    proc = procs.start(function, [sys.executable, "-m", "fedkeeper.cli", "serve", function, "--platform", "gcf",
                                  "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    procs.wait_http(url + "/healthz", proc)
    return url


@pytest.fixture
def pubsub():
    """The Pub/Sub emulator on a free loopback port; yields its host:port."""
    binary = emulator_binary()
    if binary is None:
        pytest.skip("the Google Cloud CLI's Pub/Sub emulator (component pubsub-emulator, Debian package "
                    "google-cloud-cli-pubsub-emulator) is not installed")
    if shutil.which("java") is None:
        pytest.skip("the Pub/Sub emulator needs a Java runtime (java not found)")
    procs = Procs()
    port = servers.free_port()
    proc = procs.start("pubsub", [binary, "--host=127.0.0.1", f"--port={port}"], {})
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/v1/projects/{PROJECT}/topics", proc, timeout=90)
        yield f"127.0.0.1:{port}"
    finally:
        procs.stop()


def test_federation_driven_by_gcs_notifications_through_pubsub(pubsub, monkeypatch):
    emulator = f"http://{pubsub}/v1/projects/{PROJECT}"
    assert call("PUT", f"{emulator}/topics/{TOPIC}", {})[0] == 200
    gcs = servers.start_fake_gcs(args=("-event.pubsub-project-id", PROJECT, "-event.pubsub-topic", TOPIC,
                                       "-event.object-prefix", "fed/rounds/"),
                                 env={"PUBSUB_EMULATOR_HOST": pubsub})
    procs = Procs()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.host)
    try:
        store = open_store(gcs.url("fed"))
        env = {"FEDKEEPER_STORE": store.url, "STORAGE_EMULATOR_HOST": gcs.host, "FEDKEEPER_TOKEN": TOKEN,
               "CALL_TOKEN": TOKEN, "TF_CPP_MIN_LOG_LEVEL": "2", "FEDKEEPER_TF_THREADS": "1"}
        urls = {fn: serve(procs, fn, env) for fn in ("trigger", "client", "aggregator")}
        # A push subscription cannot set headers: the aggregator's token rides in the endpoint URL.
        status, body = call("PUT", f"{emulator}/subscriptions/{SUBSCRIPTION}",
                            {"topic": f"projects/{PROJECT}/topics/{TOPIC}", "ackDeadlineSeconds": 60,
                             "pushConfig": {"pushEndpoint": f"{urls['aggregator']}/events?token={TOKEN}"}})
        assert status == 200, body
        cfg = config.from_dict({"rounds": ROUNDS, "seed": 3, "events": "store", "store": store.url,
                                "model": {"epochs": 1, "jit_compile": False},
                                "platforms": [{"name": "gcf", "kind": "gcf", "clients": 3, "auth_env": "CALL_TOKEN",
                                               "options": {"urls": urls, "wait_s": 0.5}}]})
        setup(cfg, store, progress=lambda s: None)
        assert call("POST", f"{urls['aggregator']}/events", {"message": {}})[0] == 401  # no token, no entry
        req = urllib.request.Request(f"{urls['trigger']}/rounds", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["status"] == "started"
        end = time.time() + 240
        while not store.exists(keys.evaluation(ROUNDS - 1)):
            assert time.time() < end, f"federation did not finish; state {store.get_json_or(keys.STATE)}\n{procs.logs()}"
            time.sleep(0.5)
        accs = [store.get_json(keys.evaluation(r))["test_accuracy"] for r in range(ROUNDS)]
        results = [store.get_json(keys.result(r)) for r in range(ROUNDS)]
        aggregations = [len(store.list(f"{keys.round_prefix(r)}aggregations/")) for r in range(ROUNDS)]
    finally:
        procs.stop()
        gcs.stop()
    assert [len(r["included"]) for r in results] == [3] * ROUNDS
    # Closed by the aggregator that a pushed notification started, once per round.
    assert all(r["timings"]["triggered_by"] == "event" for r in results)
    assert aggregations == [1] * ROUNDS
    assert accs[-1] > 0.5, accs
