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
        with open(f"/proc/{pid}/comm") as fh:
            memory["comm"] = fh.read().strip()
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
    # Both name themselves by their pool, so ps and the benchmarks tell a client worker from the fork server.
    assert fresh_mem["comm"] == forked_mem["comm"] == "fk-p"
    # The forked worker shares TensorFlow's imported heap with its fork server: a page two processes share
    # counts half in each one's proportional set, so its anonymous PSS is at least 50 MB under its anonymous
    # RSS (100 MB shared); the fresh worker's heap is its own.
    shared_anon = lambda m: m["Anonymous"] - m["Pss_Anon"]  # noqa: E731
    assert shared_anon(forked_mem) > 50 * 2**20, forked_mem
    assert shared_anon(fresh_mem) < 20 * 2**20, fresh_mem


def test_a_worker_name_is_cut_to_what_linux_keeps_and_shows_in_ps():
    # Prepare: a child process, so this one keeps its name.
    import subprocess
    import sys

    code = ("from fedkeeper.runtime.worker import name_process; import sys; "
            "ok = name_process('fk-' + sys.argv[1]); print(ok, open('/proc/self/comm').read().strip())")
    # Execute
    out = subprocess.run([sys.executable, "-c", code, "abcdefghijké-and-more"], capture_output=True,
                         text=True, check=True).stdout.split()
    # Assert: 15 bytes at most, cut at a character boundary, and the name really is the process's.
    assert out[0] == "True"
    assert out[1] == "fk-abcdefghijk"  # the é's two bytes would straddle the 15th


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


def test_workers_preload_unless_the_platform_says_and_control_follows_the_clients(tmp_path):
    # Prepare / Execute: the default, and an explicit option either way, for both models.
    from fedkeeper.store.local import LocalStore

    made = iter(range(100))

    def pools(model: str, *platforms: dict) -> dict:
        cfg = config.from_dict({"model": {"name": model}, "platforms": list(platforms)})
        rt = local.LocalRuntime(cfg, LocalStore(tmp_path / f"{model}-{next(made)}"))
        return {n: p.preload for n, p in rt.pools.items()}

    default = {"name": "d", "clients": 1}
    on = {"name": "on", "clients": 1, "options": {"preload": True}}
    off = {"name": "off", "clients": 1, "options": {"preload": False}}
    # Assert: workers fork from the server unless the platform says false, whatever the model; control functions
    # fork from it whenever a client pool does, and start fresh when none does.
    for model in ("nn", "cnn"):
        assert pools(model, default, on, off) == {"d": True, "on": True, "off": False, "control": True}
        assert pools(model, off, on) == {"off": False, "on": True, "control": True}
        assert pools(model, off) == {"off": False, "control": False}


SMAPS = """\
00400000-00401000 r-xp 00000000 08:01 1234 /usr/bin/python3.11
Rss:                   4 kB
Anonymous:             0 kB
7f0000000000-7f0000002000 r--p 00001000 08:01 1234 /usr/lib/libdemo.so
Rss:                   8 kB
Anonymous:             4 kB
7f0000002000-7f0000004000 rw-p 00003000 08:01 1234 /usr/lib/libdemo.so
Anonymous:             0 kB
7f0000004000-7f0000006000 r--p 00000000 00:00 0
Anonymous:             0 kB
7f0000006000-7f0000008000 r--p 00000000 08:01 99 /lib/with spaces (deleted)
VmFlags: rd mr mw me
Anonymous:             0 kB
7ffc00000000-7ffc00001000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
"""


def test_only_unwritable_file_mappings_without_private_pages_are_unmapped():
    # Prepare / Execute
    from fedkeeper import heap

    got = heap._clean_library_mappings(SMAPS)
    # Assert: the text segment and the file with spaces; not relocated data (private pages), writable data,
    # anonymous memory or the vdso.
    assert got == [(0x400000, 0x401000), (0x7F0000006000, 0x7F0000008000)]


UNMAP_CHILD = r"""
import json, mmap, os, sys
from fedkeeper import heap

path = sys.argv[1]
with open(path, "rb") as fh:
    view = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
expected = bytes(view)  # reads every page, so all are resident

def resident_kb() -> int:
    text = open("/proc/self/smaps").read().split("\n")
    for i, line in enumerate(text):
        if line.endswith(path):
            return next(int(l.split()[1]) for l in text[i + 1:] if l.startswith("Rss:"))
    raise SystemExit("mapping not found")

before = resident_kb()
unmapped = heap.unmap_clean_library_pages()
after = resident_kb()
print(json.dumps({"before": before, "after": after, "unmapped": unmapped, "same": bytes(view) == expected}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's /proc describes the mappings")
def test_unmapped_library_pages_leave_the_process_and_come_back_unchanged(tmp_path):
    # Prepare: a 4 MB file of distinct bytes, mapped read-only and read in full by a fresh process.
    import json
    import subprocess
    import sys

    data = tmp_path / "lib.bin"
    data.write_bytes(os.urandom(4 * 2**20))
    # Execute
    out = subprocess.run([sys.executable, "-c", UNMAP_CHILD, str(data)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    # Assert: resident before, gone after, and reading it again gives the file's bytes.
    assert got["before"] >= 4096 and got["after"] < got["before"] and got["unmapped"] >= 4 * 2**20
    assert got["same"] is True
