"""The time-to-accuracy bench's arithmetic: the floor it picks and how it splits a round into phases."""

from __future__ import annotations

import pytest

from bench.common import Load, cpu
from bench.time_to_accuracy import PHASES, TreeMemory, breakdown, describe_peak, floor_of, peak_breakdown


def _round(n: int, wall: float, train: float, central: float = 0.0, start: float = 0.0, end: float = 0.0) -> dict:
    ph = {k: 0.0 for k, _ in PHASES}
    ph.update(train=train, download=1.0, central_eval=central, aggregation=0.5)
    return {"round": n, "wall_s": wall, "phases_s": ph, "train_cpu_s": train / 2, "first_start": start, "last_finish": end}


def test_floor_is_the_cheaper_layout_and_keeps_the_parallel_measurement():
    # Prepare: one-thread fits summing to 30 s on 2 cores (15 s), two-thread fits summing to 18 s.
    floors = {"floor1": {"sum_fit_s": 30.0}, "floorN": {"sum_fit_s": 18.0}, "floorP": {"fits_wall_s": 17.0}}
    # Execute
    got = floor_of(floors, cores=2)
    # Assert: the smaller of Σ/cores and the all-threads sum, with the parallel wall kept beside it.
    assert got["floor_s"] == 15.0 and "/ 2 cores" in got["layout"]
    assert got["parallel_s"] == 17.0
    assert floor_of({"floor1": {"sum_fit_s": 30.0}, "floorN": {"sum_fit_s": 12.0}}, cores=2)["floor_s"] == 12.0


def test_breakdown_divides_client_work_by_slots_and_leaves_serial_phases_whole():
    # Prepare: round 1 (cold) is left out of the steady mean; rounds 2-3 have 20 s of training on 2 slots.
    res = {"slots": 2, "rounds": [_round(1, 50.0, 40.0, 2.0, 0.0, 45.0), _round(2, 12.0, 20.0, 2.0, 46.0, 57.0),
                                  _round(3, 14.0, 20.0, 2.0, 58.0, 70.0)]}
    # Execute
    fk, fl = breakdown(res, "fedkeeper", 2), breakdown(res, "flower", 2)
    # Assert: training and downloads are shared by the slots; aggregation counts whole; FedKeeper's central
    # evaluation runs on a slot, Flower's in its driver; idle is what the shares leave of the wall time.
    assert fk["rounds"] == [2, 3] and fk["wall_s"] == 13.0
    assert fk["share_s"]["train"] == 10.0 and fk["share_s"]["download"] == 0.5
    assert fk["share_s"]["aggregation"] == 0.5 and fl["share_s"]["aggregation"] == 0.5
    assert fk["share_s"]["central_eval"] == 1.0 and fl["share_s"]["central_eval"] == 2.0
    assert fk["idle_s"] == pytest.approx(13.0 - 12.0) and fl["idle_s"] == pytest.approx(13.0 - 13.0)
    assert fk["between_rounds_s"] == pytest.approx(1.0)
    assert fk["train_cpu_s"] == 10.0


def test_load_record_names_what_other_processes_used():
    # Prepare / Execute: a short measured span in which this process itself used no CPU.
    with Load() as load:
        pass
    rec = load.record(own_cpu_s=0.0)
    # Assert: steal, both load averages and a non-negative share for other processes, all in the one-line text.
    assert set(rec) >= {"steal_percent", "loadavg_start", "loadavg_end", "host_busy_cores", "others_cores"}
    assert rec["others_cores"] >= 0.0 and len(rec["loadavg_start"]) == 3
    assert "load average" in Load.describe(rec) and "other processes" in Load.describe(rec)


def test_machine_record_names_the_processor_generation(tmp_path):
    # Prepare: two processors' blocks as Linux prints them; the second differs only to show it is not read.
    info = tmp_path / "cpuinfo"
    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {fam}\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2{extra}\n\n"
    info.write_text(block.format(n=0, fam=25, extra="") + block.format(n=1, fam=26, extra=" avx512f"))
    # Execute
    got = cpu(str(info))
    # Assert: the first block's family, model and vector width; a missing file gives an empty record, not an error.
    assert got == {"name": "AMD EPYC", "family": 25, "model": 1, "avx512": False}
    assert cpu(str(tmp_path / "missing")) == {}
    info.write_text(block.format(n=0, fam=26, extra=" avx512f avx512bw"))
    assert cpu(str(info))["avx512"] is True and cpu(str(info))["family"] == 26


class _Proc:
    """A process as psutil shows one: a pid and a command line (or none readable)."""

    def __init__(self, pid: int, cmd: list[str] | None, name: str = "python", ppid: int = 1) -> None:
        self.pid, self.cmd, self.comm, self.parent = pid, cmd, name, ppid

    def cmdline(self) -> list[str]:
        if self.cmd is None:
            raise PermissionError("gone")
        return self.cmd

    def name(self) -> str:
        return self.comm

    def ppid(self) -> int:
        return self.parent


def test_peak_breakdown_groups_processes_by_kind_largest_first():
    # Prepare: the processes of one sample at the peak.
    sample = [{"kind": "driver", "rss_mb": 80.0, "anon_mb": 40.0},
              {"kind": "worker with TensorFlow", "rss_mb": 650.0, "anon_mb": 280.0},
              {"kind": "worker without TensorFlow", "rss_mb": 50.0, "anon_mb": 20.0},
              {"kind": "worker with TensorFlow", "rss_mb": 700.0, "anon_mb": 300.0}]
    # Execute
    got = peak_breakdown(sample)
    line = describe_peak({"peak_at_s": 12.5, "peak_round": 1, "peak_by_process": got})
    # Assert: one group per kind, each worker's figure kept, ordered by their sum.
    assert [g["kind"] for g in got] == ["worker with TensorFlow", "driver", "worker without TensorFlow"]
    assert got[0]["count"] == 2 and got[0]["rss_mb"] == [700.0, 650.0] and got[0]["sum_rss_mb"] == 1350.0
    assert line.startswith("at 12.5 s (round 1): 2 x worker with TensorFlow 700+650 MB; 1 x driver 80 MB")
    assert describe_peak({}).startswith("at an unknown time")


def test_tree_memory_names_processes_and_looks_again_until_a_worker_has_tensorflow(monkeypatch):
    # Prepare: a worker that has not imported TensorFlow yet, then has.
    mem = TreeMemory()
    has_tf = {"v": False}
    monkeypatch.setattr(TreeMemory, "maps_tensorflow", staticmethod(lambda pid: has_tf["v"]))
    worker = _Proc(11, ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)"])
    # Execute / Assert
    assert mem.kind_of(_Proc(1, ["python"]), me=1) == "driver"
    assert mem.kind_of(_Proc(12, ["python", "-c", "from multiprocessing.resource_tracker import main"]), me=1) == \
        "multiprocessing resource tracker"
    assert mem.kind_of(_Proc(13, None), me=1) == "other"
    assert mem.kind_of(worker, me=1) == "worker without TensorFlow"
    has_tf["v"] = True
    assert mem.kind_of(worker, me=1) == "worker with TensorFlow"  # not named yet: looked at again
    worker.comm = "fk-gcf"
    assert mem.kind_of(worker, me=1) == "client worker with TensorFlow"
    has_tf["v"] = False
    worker.comm = "python"
    assert mem.kind_of(worker, me=1) == "client worker with TensorFlow"  # final once seen


def test_tree_memory_tells_control_workers_from_client_workers_of_the_fork_server(monkeypatch):
    # Prepare: the fork server (a child of the driver) and two workers forked from it, one per pool.
    mem = TreeMemory()
    monkeypatch.setattr(TreeMemory, "maps_tensorflow", staticmethod(lambda pid: True))
    cmd = ["python", "-c", "from multiprocessing.forkserver import main; main(8, 9, ['fedkeeper.preload'])"]
    server = _Proc(20, cmd, ppid=1)
    control = _Proc(21, cmd, name="fk-control", ppid=20)
    client = _Proc(22, cmd, name="fk-local-edge", ppid=20)
    # Execute: the server is first seen before its import, as the sampler can see it while the run sets up.
    monkeypatch.setattr(TreeMemory, "maps_tensorflow", staticmethod(lambda pid: pid != 20))
    assert mem.kind_of(server, me=1) == "fork server without TensorFlow"
    monkeypatch.setattr(TreeMemory, "maps_tensorflow", staticmethod(lambda pid: True))
    kinds = [mem.kind_of(p, me=1) for p in (server, control, client)]
    # Assert
    assert kinds == ["fork server with TensorFlow", "control worker with TensorFlow", "client worker with TensorFlow"]
