"""The Serverless Framework v3 for tests: `serverless offline` and `serverless package` on a deploy plan.

The framework and its plugins come from deploy/aws/node_modules (pinned by deploy/aws/package-lock.json,
installed by `npm ci`); a test service folder links to them and to the repository's code, so nothing
tracked is written.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.servers import free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "deploy" / "aws"
SLS = TOOLS / "node_modules" / "serverless" / "bin" / "serverless.js"
# The framework must neither phone home nor print upgrade notices into the logs the tests read.
QUIET = {"SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off", "SLS_DEPRECATION_DISABLE": "*",
         "SLS_INTERACTIVE_SETUP_DISABLE": "1", "SLS_NO_UPDATE_CHECK": "1"}


def missing() -> str | None:
    """Why the Serverless Framework cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (the Serverless Framework v3 runs on Node.js)"
    if not SLS.exists():
        return "deploy/aws/node_modules is missing: run `npm ci` in deploy/aws (as .ci/run does)"
    return None


def service_dir(where: Path, doc: dict) -> Path:
    """A service folder holding `doc` as serverless.yml, with the code and the pinned node_modules linked in."""
    where.mkdir(parents=True, exist_ok=True)
    for name in ("fedkeeper", "functions", "deploy"):
        (where / name).symlink_to(ROOT / name)
    (where / "node_modules").symlink_to(TOOLS / "node_modules")
    (where / "serverless.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return where


def sls(args: list[str], cwd: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the pinned `serverless` CLI in a service folder, with dummy credentials and no network chatter."""
    full = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAFEDKEEPERTEST", AWS_SECRET_ACCESS_KEY="fedkeeper-test-secret",
                **QUIET, **(env or {}))
    return subprocess.run(["node", str(SLS), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Offline:
    """A running `serverless offline start` with serverless-s3-local, on loopback ports only."""

    proc: subprocess.Popen
    http: str
    invoke: str
    s3: str
    log: Path

    def tail(self, n: int = 4000) -> str:
        """The end of the framework's log, for assertion messages."""
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        """Stop the framework and every handler process it spawned (they share its process group)."""
        stop_process(self.proc)


def offline_doc(doc: dict, ports: dict[str, int], s3_dir: Path | None = None) -> dict:
    """The plan plus only what runs it here: the local plugins and ports, and the client as a zip handler.

    The client ships as a container image on AWS; serverless-offline runs images only through Docker,
    so here it runs the same entry file as a plain handler. serverless-python-requirements is left out:
    it bundles the requirements at packaging time, and the handlers here run in the test's own venv.
    With `s3_dir`, serverless-s3-local serves S3 from that folder and fires the plan's S3 events.
    """
    doc = copy.deepcopy(doc)
    doc["plugins"] = [p for p in doc.get("plugins", []) if p != "serverless-python-requirements"]
    doc["plugins"] += (["serverless-s3-local"] if s3_dir else []) + ["serverless-offline"]
    doc["provider"].pop("ecr", None)
    for spec in doc["functions"].values():
        if "image" in spec:
            spec.pop("image")
            spec["handler"] = "functions/client/lambda_function.handler"
    doc.setdefault("custom", {}).update({
        "serverless-offline": {"host": "127.0.0.1", "httpPort": ports["http"], "lambdaPort": ports["lambda"],
                               "websocketPort": ports["websocket"], "albPort": ports["alb"], "useDocker": False,
                               "terminateIdleLambdaTime": 600}})
    if s3_dir:
        doc["custom"]["s3"] = {"host": "127.0.0.1", "address": "127.0.0.1", "port": ports["s3"], "directory": str(s3_dir),
                               "allowMismatchedSignatures": True, "silent": True}
    return doc


def offline_ports() -> dict[str, int]:
    """Free loopback ports for every listener serverless-offline and serverless-s3-local open."""
    return {name: free_port() for name in ("http", "lambda", "websocket", "alb", "s3")}


def start_offline(service: Path, ports: dict[str, int], env: dict, timeout: float = 90, s3_local: bool = False) -> Offline:
    """Start `serverless offline start` in `service`; handlers run with this interpreter's venv first on PATH."""
    log = service / "offline.log"
    full = dict(os.environ, **QUIET, **env, VIRTUAL_ENV=sys.prefix,
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(["node", str(SLS), "offline", "start", "--stage", "dev"], cwd=service, env=full,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    srv = Offline(proc=proc, http=f"http://127.0.0.1:{ports['http']}", invoke=f"http://127.0.0.1:{ports['lambda']}",
                  s3=f"http://127.0.0.1:{ports['s3']}", log=log)
    end = time.time() + timeout
    try:
        for url in ([srv.s3] if s3_local else []) + [srv.invoke, srv.http]:
            while not _answers(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"serverless offline exited with {proc.returncode}: {srv.tail()}")
                if time.time() > end:
                    raise RuntimeError(f"serverless offline did not listen on {url} within {timeout} s: {srv.tail()}")
                time.sleep(0.3)
    except Exception:
        srv.stop()
        raise
    return srv


def invocations(srv: Offline, function: str) -> int:
    """How many invocations of `function` serverless-offline has reported finished in its log."""
    return srv.log.read_text(errors="replace").count(f"(\u03bb: {function}) RequestId")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True
