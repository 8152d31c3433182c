"""Shared fixtures: small federations written straight into a folder store, without TensorFlow."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedkeeper.core import blob, config, keys, rounds
from fedkeeper.store.local import LocalStore

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

SHAPES = {"hidden/kernel": (6, 5), "hidden/bias": (5,), "output/kernel": (5, 3), "output/bias": (3,)}


def make_weights(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """Random float32 tensors with the fixture model's names and shapes."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def update_bytes(r: int, client: str, weights: dict, n: int, **meta) -> bytes:
    """An update blob as a client would write it."""
    m = {"kind": "update", "round": r, "client": client, "num_examples": n, "metrics": {}, "timings": {}}
    m.update(meta)
    return blob.encode(weights, m)


class Federation:
    """A federation written into a folder store by hand: config, model 0 and round r's manifest."""

    def __init__(self, root, n_clients: int = 4, rounds_total: int = 3, **strategy) -> None:
        self.store = LocalStore(root)
        self.cfg = config.from_dict({"rounds": rounds_total, "strategy": strategy,
                                     "platforms": [{"name": "p", "clients": n_clients}]})
        self.store.put_json(keys.FEDERATION, self.cfg.to_dict())
        self.store.put_json(keys.STATE, rounds.new_state())
        self.global_weights = make_weights(0)
        self.store.put(keys.model(0), blob.encode(self.global_weights, {"kind": "model", "round": 0}))
        self.ids = [c.id for c in self.cfg.clients]

    def open_round(self, r: int = 0, deadline_s: float = 600.0, quorum: int | None = None) -> rounds.Manifest:
        """Write round r's manifest selecting every client."""
        import time

        m = rounds.Manifest(round=r, clients=[{"id": c, "platform": "p", "data": keys.client_data(c)} for c in self.ids],
                            model=keys.model(r), deadline=time.time() + deadline_s,
                            quorum=quorum if quorum is not None else len(self.ids))
        self.store.put(keys.manifest(r), rounds.dumps(m))
        self.store.put_json(keys.STATE, dict(rounds.new_state(), round=r, status=rounds.OPEN))
        return m

    def submit_all(self, r: int = 0) -> dict[str, tuple[dict, int]]:
        """Write one valid update per client; returns {client: (weights, n)}."""
        out = {}
        for i, c in enumerate(self.ids):
            w, n = make_weights(100 + i), 10 * (i + 1)
            self.store.put(keys.update(r, c), update_bytes(r, c, w, n))
            out[c] = (w, n)
        return out


@pytest.fixture
def federation(tmp_path):
    """A 4-client federation in a temp folder store."""
    return Federation(tmp_path / "store")


# -- real servers, started once per session on loopback and stopped by PID ---------------------------
import contextlib  # noqa: E402
import uuid  # noqa: E402

from tests import servers  # noqa: E402


@contextlib.contextmanager
def _env(updates: dict):
    """Set environment variables for a session-scoped server, restoring the old values afterwards."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _serve(start, env_of):
    try:
        srv = start()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with _env(env_of(srv)):
        yield srv
    srv.stop()


@pytest.fixture(scope="session")
def seaweedfs():
    """A real SeaweedFS S3 server with SigV4 credentials exported to the environment."""
    yield from _serve(servers.start_seaweedfs, lambda srv: srv.env)


@pytest.fixture(scope="session")
def fake_gcs():
    """A real fake-gcs-server with STORAGE_EMULATOR_HOST pointing at it."""
    from tests.extras import needs

    needs("gcp")
    yield from _serve(servers.start_fake_gcs, lambda srv: {"STORAGE_EMULATOR_HOST": srv.host})


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on loopback."""
    srv = servers.start_moto()
    yield srv
    srv.stop()


@pytest.fixture(params=["folder"] + [pytest.param(k, marks=pytest.mark.slow) for k in ("seaweedfs", "moto", "gcs")])
def any_store(request, tmp_path):
    """The same store tests against each backend, each in a fresh prefix."""
    from fedkeeper.store import open_store

    kind = request.param
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    if kind == "folder":
        yield open_store(str(tmp_path / prefix))
        return
    if kind == "seaweedfs":
        srv = request.getfixturevalue("seaweedfs")
    elif kind == "moto":
        srv = request.getfixturevalue("moto_s3")
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto")
    else:
        srv = request.getfixturevalue("fake_gcs")
    store = open_store(srv.url(prefix))
    yield store
    store.close()


# -- the suite never changes tracked files --------------------------------------------------------------
import hashlib  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]


def _tracked_changes() -> dict[str, str] | None:
    """Content hash of every file that differs from the commit or is new and not ignored; None outside git."""
    try:
        out = subprocess.run(["git", "ls-files", "-m", "-d", "-o", "--exclude-standard"], cwd=_ROOT,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    changed = {}
    for name in sorted(set(out.stdout.split("\n")) - {""}):
        path = _ROOT / name
        changed[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "deleted"
    return changed


def pytest_configure(config):
    # Seeded initial models are cached between federations (fedkeeper.federation); the suite keeps its
    # own cache, shared by every test and child process, so it neither reads nor fills the user's.
    if "FEDKEEPER_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["FEDKEEPER_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedkeeper-test-cache-")
        config._own_cache = os.environ["FEDKEEPER_CACHE_DIR"]


def pytest_unconfigure(config):
    own = getattr(config, "_own_cache", None)
    if own:
        import shutil

        shutil.rmtree(own, ignore_errors=True)


def pytest_sessionstart(session):
    session.config._tracked_before = _tracked_changes()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_tracked_before", None)
    if before is None:
        return
    after = _tracked_changes() or {}
    touched = sorted(name for name, digest in after.items() if before.get(name) != digest)
    if touched:
        print(f"\nERROR: the test run changed or created files in the checkout: {', '.join(touched)}; "
              "tests must write under tmp_path")
        session.exitstatus = 1
