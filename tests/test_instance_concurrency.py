"""An instance serving several invocations at once: the config field, the local runtime's emulation, and what it records."""

from __future__ import annotations

import pytest

from fedkeeper.core import config
from fedkeeper.runtime import run as runmod
from fedkeeper.store.local import LocalStore
from tests.extras import mark


def test_default_is_one_invocation_per_instance():
    cfg = config.from_dict({"platforms": [{"name": "p", "clients": 2}]})
    assert cfg.platforms[0].instance_concurrency == 1


@pytest.mark.parametrize("value", [0, -1, 1001, "2", 1.5, True])
def test_bad_instance_concurrency_names_the_field(value):
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"platforms": [{"name": "p", "clients": 2, "instance_concurrency": value}]})
    assert err.value.field == "platforms[0].instance_concurrency"


def test_lambda_refuses_more_than_one_invocation_per_instance():
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"platforms": [{"name": "aws", "kind": "lambda", "clients": 2, "instance_concurrency": 4}]})
    assert "one invocation at a time" in err.value.problem and "concurrency" in err.value.fix


@pytest.mark.slow
@mark("tf")
def test_one_instance_serves_two_clients_at_once_and_the_rounds_are_complete(tmp_path):
    # Prepare: four clients on one platform whose single instance serves two invocations at once.
    cfg = config.from_dict({"rounds": 2, "seed": 3, "model": {"name": "nn", "epochs": 1},
                            "platforms": [{"name": "p", "clients": 4, "concurrency": 2, "instance_concurrency": 2}]})
    store = LocalStore(tmp_path / "s")

    # Execute
    results = runmod.run(cfg, store, progress=runmod.Progress(cfg, quiet=True), timeout_s=600, log=lambda s: None)

    # Assert: every client is in every round, one instance was started, and it ran two invocations at once.
    for rnd in results["rounds"]:
        assert rnd["status"] == "done" and sorted(rnd["clients"]["included"]) == [c.id for c in cfg.clients]
    pool = results["runtime"]["pools"]["p"]
    assert pool["cold_starts"] == 1 and pool["instance_concurrency"] == 2
    assert pool["peak_running"] == 2
    assert results["rounds"][-1]["test_accuracy"] > results["rounds"][0]["test_accuracy"] - 0.05

# An instance that dies fails every invocation it served: tests/test_federation.py's timeout test covers it.


@pytest.mark.parametrize("platform, threads", [
    ({"concurrency": 2}, "1"),                                     # one fit per process: one thread each
    ({"concurrency": 2, "instance_concurrency": 2}, "2"),          # one process, two fits at once: a thread each
    ({"concurrency": 2, "instance_concurrency": 4}, "2"),          # never more fits at once than the concurrency
    ({"concurrency": 4, "instance_concurrency": 2, "options": {"tf_threads": 1}}, "1"),  # an explicit setting wins
])
def test_a_local_worker_gets_a_tensorflow_thread_per_invocation_it_serves_at_once(tmp_path, platform, threads):
    # Prepare
    from fedkeeper.runtime.local import LocalRuntime

    cfg = config.from_dict({"platforms": [dict({"name": "p", "clients": 4}, **platform)]})

    # Execute
    rt = LocalRuntime(cfg, LocalStore(tmp_path / "s"))

    # Assert: the worker processes of this platform start with that many threads, the control workers with one.
    assert rt.pools["p"].env["FEDKEEPER_TF_THREADS"] == threads
    assert rt.pools["control"].env["FEDKEEPER_TF_THREADS"] == "1"


@pytest.mark.parametrize("model, platform, intra", [
    ("nn", {"concurrency": 2}, "1"),
    ("nn", {"concurrency": 2, "instance_concurrency": 2}, "1"),    # small fits: one intra-op thread per process
    ("cnn", {"concurrency": 2, "instance_concurrency": 2}, "2"),   # convolutions: one intra-op thread per fit
    ("cnn", {"concurrency": 2}, "1"),
    ("nn", {"concurrency": 2, "instance_concurrency": 2, "options": {"tf_threads": 2}}, "2"),  # tf_threads sets both
    ("cnn", {"concurrency": 2, "instance_concurrency": 2, "options": {"tf_intra_threads": 1}}, "1"),  # explicit wins
    ("nn", {"concurrency": 2, "instance_concurrency": 2, "options": {"tf_threads": 1, "tf_intra_threads": 3}}, "3"),
])
def test_a_local_worker_gets_its_intra_op_threads_by_model_unless_set(tmp_path, model, platform, intra):
    # Prepare
    from fedkeeper.runtime.local import LocalRuntime

    cfg = config.from_dict({"model": {"name": model},
                            "platforms": [dict({"name": "p", "clients": 4}, **platform)]})

    # Execute
    rt = LocalRuntime(cfg, LocalStore(tmp_path / "s"))

    # Assert: intra-op threads by the rule; inter-op threads still one per invocation served at once (or tf_threads).
    assert rt.pools["p"].env["FEDKEEPER_TF_INTRA_THREADS"] == intra
    inter = platform.get("options", {}).get("tf_threads", min(platform.get("instance_concurrency", 1), 2))
    assert rt.pools["p"].env["FEDKEEPER_TF_THREADS"] == str(inter)


@pytest.mark.parametrize("option", ["tf_threads", "tf_intra_threads"])
@pytest.mark.parametrize("value", [0, -2, 257, "2", 1.5, True])
def test_bad_tf_threads_names_the_field(option, value):
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"platforms": [{"name": "p", "clients": 2, "options": {option: value}}]})
    assert err.value.field == f"platforms[0].options.{option}" and option in err.value.fix


@pytest.mark.slow
def test_a_worker_process_applies_its_intra_and_inter_op_thread_counts():
    # Prepare: the environment the runtime gives an NN worker serving two invocations at once.
    import os
    import subprocess
    import sys

    env = dict(os.environ, FEDKEEPER_TF_THREADS="2", FEDKEEPER_TF_INTRA_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    code = ("from fedkeeper import models; models._keras(); import tensorflow as tf; "
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")

    # Execute: a fresh process, as a worker is.
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    # Assert
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "2"]
