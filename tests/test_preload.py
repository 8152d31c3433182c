"""Local client workers forked from a process that imported TensorFlow once: same updates, shared pages, own environment."""

from __future__ import annotations

import os
import signal
import time

import pytest

from fedkeeper.core import config
from fedkeeper.runtime import local


def _report(conn, env) -> None:  # a forked child's own view of itself, as worker.main would set it up
    from fedkeeper.runtime import worker

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    before = {k: os.environ.get(k) for k in ("FEDKEEPER_TEST_SECRET", "FEDKEEPER_TEST_LATE")}
    if env is not None:
        worker.apply_environment(env)
    after = {k: os.environ.get(k) for k in ("FEDKEEPER_TEST_SECRET", "FEDKEEPER_TEST_LATE")}
    import sys

    conn.send({"sigint_blocked": signal.SIGINT in mask, "before": before, "after": after,
               "tensorflow_loaded": "tensorflow" in sys.modules})
    conn.close()


def _child_view(env) -> dict:
    ctx = local._context(True)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_report, args=(child, env), daemon=True)
    local.start_quietly(proc)
    child.close()
    try:
        assert parent.poll(120), "the forked child sent nothing"
        return parent.recv()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def test_a_preload_option_that_is_not_a_boolean_is_refused_with_the_fix():
    # Prepare / Execute
    with pytest.raises(config.ConfigError) as refused:
        config.from_dict({"platforms": [{"name": "p", "clients": 1, "options": {"preload": "yes"}}]})
    # Assert
    text = str(refused.value)
    assert "platforms[0].options.preload" in text and "must be true or false, got 'yes'" in text
    assert "set options.preload to true" in text


def test_worker_environment_is_this_process_now_with_the_pools_overrides(monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDKEEPER_TEST_SECRET", "s3cret")
    monkeypatch.setenv("FEDKEEPER_TEST_KEEP", "kept")
    # Execute
    env = local.worker_environment({"FEDKEEPER_TEST_SECRET": None, "FEDKEEPER_TF_THREADS": "3"})
    # Assert
    assert "FEDKEEPER_TEST_SECRET" not in env
    assert env["FEDKEEPER_TEST_KEEP"] == "kept" and env["FEDKEEPER_TF_THREADS"] == "3"
    assert env["PATH"] == os.environ["PATH"]


@pytest.mark.slow
def test_a_forked_worker_takes_the_environment_it_is_sent_not_its_fork_servers(monkeypatch):
    # Prepare: the fork server is running (started here, or by an earlier test of this process); a variable
    # is set after it started, and a secret is set that the worker must not get.
    first = _child_view(None)
    monkeypatch.setenv("FEDKEEPER_TEST_SECRET", "s3cret")
    monkeypatch.setenv("FEDKEEPER_TEST_LATE", "late")
    # Execute: a second child, given its environment as the runtime sends it, withholding the secret.
    second = _child_view(local.worker_environment({"FEDKEEPER_TEST_SECRET": None}))
    # Assert: a forked child starts with the server's environment from before (the fork really came from it,
    # with TensorFlow imported, and lacks what was set since); once it applied its own it holds no secret
    # and sees the later variable.
    assert first["tensorflow_loaded"] and second["tensorflow_loaded"]
    assert second["before"] == {"FEDKEEPER_TEST_SECRET": None, "FEDKEEPER_TEST_LATE": None}
    assert second["after"] == {"FEDKEEPER_TEST_SECRET": None, "FEDKEEPER_TEST_LATE": "late"}


@pytest.mark.slow
def test_a_forked_worker_starts_with_ctrl_c_held_back():
    # Prepare / Execute
    view = _child_view(None)
    # Assert: as a spawned worker does (interrupts_held), so Ctrl-C during its start waits for quiet_interrupts.
    assert view["sigint_blocked"] is True


def _train_one(tmp_path, name: str, preload: bool) -> tuple[dict, dict, dict]:
    """One client invocation in a fresh LocalRuntime; the update's tensors, the reply, and the worker's memory."""
    from fedkeeper.core import blob, keys
    from fedkeeper.store.local import LocalStore
    from tests.test_client_warm import make_federation

    root = str(tmp_path / name)
    cids = make_federation(root, 5)
    store = LocalStore(root)
    cfg = config.from_dict({"seed": 5, "model": {"name": "nn", "epochs": 2},
                            "platforms": [{"name": "p", "clients": 3, "options": {"preload": preload}}]})
    rt = local.LocalRuntime(cfg, store)
    memory: dict = {}
    try:
        inv_id = rt.invoke("client", {"round": 0, "client": cids[0], "mode": "train"}, platform="p")

        def done() -> bool:
            inv = rt.invocations[inv_id]
            if inv.finished is None and rt.pools["p"].workers and not memory:
                pid = rt.pools["p"].workers[0].proc.pid
                try:
                    memory.update(_smaps(pid))
                except OSError:
                    pass
            return inv.finished is not None

        assert rt.run_until(done, timeout_s=300)
        inv = rt.invocations[inv_id]
        assert inv.ok, inv.reply
        pid = rt.pools["p"].workers[0].proc.pid
        memory.update(_smaps(pid))
    finally:
        rt.stop()
    update = blob.decode(bytes(store.get(keys.update(0, cids[0]))))
    return {k: v.tobytes() for k, v in update.tensors.items()}, inv.reply, memory


def _smaps(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


@pytest.mark.slow
def test_an_update_from_a_forked_worker_is_bit_identical_to_one_from_a_fresh_interpreter(tmp_path):
    # Prepare / Execute: the same client of the same federation, trained by a spawned worker and a forked one.
    fresh, fresh_reply, fresh_mem = _train_one(tmp_path, "fresh", preload=False)
    forked, forked_reply, forked_mem = _train_one(tmp_path, "forked", preload=True)
    # Assert: the same update bit for bit and the same metrics, and both compiled their model themselves.
    assert fresh.keys() == forked.keys() and fresh
    for name in fresh:
        assert forked[name] == fresh[name], name
    assert forked_reply["metrics"] == fresh_reply["metrics"]
    assert forked_reply["timings"]["model_built"] is True and fresh_reply["timings"]["model_built"] is True
    # The forked worker shares TensorFlow's imported heap with its fork server: a page two processes share
    # counts half in each one's proportional set, so its anonymous PSS is at least 50 MB under its anonymous
    # RSS (100 MB shared); the fresh worker's heap is its own.
    shared_anon = lambda m: m["Anonymous"] - m["Pss_Anon"]  # noqa: E731
    assert shared_anon(forked_mem) > 50 * 2**20, forked_mem
    assert shared_anon(fresh_mem) < 20 * 2**20, fresh_mem


class _FakeWorker:
    """Stands in for a worker process: records which context it would have started in."""

    made: list = []

    def __init__(self, pool, ctx) -> None:
        self.slots, self.tasks, self.started_at, self.sent, self.kill_at = 1, {}, {}, 0, None
        self.conn = self
        _FakeWorker.made.append((pool.name, ctx.get_start_method()))

    def free(self) -> bool:
        return not self.tasks

    def send(self, msg) -> None:
        pass


def test_new_preloading_workers_wait_for_the_fork_server_while_other_pools_go_on(tmp_path, monkeypatch):
    # Prepare: a fork server still importing; one preloading platform and one that starts fresh interpreters.
    from fedkeeper.store.local import LocalStore

    monkeypatch.setattr(local, "_Worker", _FakeWorker)
    monkeypatch.setattr(_FakeWorker, "made", [])
    server = local.PreloadServer()
    server.marker, server.started_at = str(tmp_path / "ready"), time.time()
    monkeypatch.setattr(local, "PRELOAD", server)
    cfg = config.from_dict({"platforms": [{"name": "pre", "clients": 1},
                                          {"name": "fresh", "clients": 1, "options": {"preload": False}}]})
    rt = local.LocalRuntime(cfg, LocalStore(tmp_path / "s"))
    rt.invoke("client", {"round": 0, "client": "pre-000"}, platform="pre")
    rt.invoke("client", {"round": 0, "client": "fresh-000"}, platform="fresh")
    # Execute: dispatch before the server is ready, then after it marked itself ready.
    rt._dispatch()
    before = list(_FakeWorker.made)
    (tmp_path / "ready").write_text("")
    rt._dispatch()
    # Assert: the fresh platform started at once; the preloading one was held (its invocation still queued),
    # then forked from the server once it was ready.
    assert before == [("fresh", "spawn")]
    assert _FakeWorker.made == [("fresh", "spawn"), ("pre", "forkserver")]
    assert not rt.pools["pre"].pending


def test_a_fork_server_that_never_says_ready_holds_workers_back_only_for_the_wait_limit(tmp_path, monkeypatch):
    # Prepare: a server whose marker never appears, started longer ago than the wait limit.
    server = local.PreloadServer()
    server.marker = str(tmp_path / "never")
    server.started_at = time.time() - 1.0
    # Execute / Assert
    assert server.ready() is False
    monkeypatch.setattr(local, "PRELOAD_WAIT_S", 0.5)
    assert server.ready() is True


def test_workers_preload_by_model_unless_the_platform_says(tmp_path):
    # Prepare / Execute: the default by model, and an explicit option either way.
    from fedkeeper.store.local import LocalStore

    def pools(model: str) -> dict:
        cfg = config.from_dict({"model": {"name": model},
                                "platforms": [{"name": "d", "clients": 1},
                                              {"name": "on", "clients": 1, "options": {"preload": True}},
                                              {"name": "off", "clients": 1, "options": {"preload": False}}]})
        rt = local.LocalRuntime(cfg, LocalStore(tmp_path / model))
        return {n: p.preload for n, p in rt.pools.items()}

    # Assert: the NN forks from the server by default, the CNN starts fresh; control functions always start fresh.
    assert pools("nn") == {"d": True, "on": True, "off": False, "control": False}
    assert pools("cnn") == {"d": False, "on": True, "off": False, "control": False}
