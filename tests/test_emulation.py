"""Heterogeneous platforms in the local runtime: per-platform speed and cold-start latency, validated in the config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedkeeper.core import config
from fedkeeper.functions import client
from fedkeeper.runtime import local


def test_emulation_env_only_for_slowed_platforms():
    assert local.emulation_env({}) == {}
    env = local.emulation_env({"speed": 0.25, "cold_start_s": 2})
    assert float(env[local.SPEED_ENV]) == 0.25 and float(env[local.COLD_START_ENV]) == 2.0


def test_slow_speed_stretches_the_measured_phase(monkeypatch):
    monkeypatch.setenv(local.SPEED_ENV, "0.5")
    timings = {"train_s": 0.05}
    t0 = time.perf_counter()
    slept = client._emulate_speed(timings, "train_s")
    assert time.perf_counter() - t0 >= 0.05 and slept == pytest.approx(0.05)
    assert timings["train_s"] == pytest.approx(0.1) and timings["emulated_slowdown_s"] == pytest.approx(0.05)
    monkeypatch.delenv(local.SPEED_ENV)
    assert client._emulate_speed({"train_s": 1.0}, "train_s") == 0.0


def test_example_emulates_the_papers_three_platforms():
    cfg = config.from_dict(config.load_file(str(Path(__file__).resolve().parents[1] / "examples" / "paper-local.yaml")))
    speeds = {p.name: p.options.get("speed", 1.0) for p in cfg.platforms}
    assert speeds["openfaas"] < speeds["gcf"] < speeds["openwhisk"]
    assert cfg.selection.name == "compute_aware" and cfg.strategy.deadline_s == "auto"


@pytest.mark.parametrize("opts", [{"speed": 0}, {"speed": 2}, {"speed": "fast"}, {"cold_start_s": -1},
                                  {"cold_start_s": True}])
def test_bad_emulation_options_name_the_field(opts):
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"platforms": [{"name": "p", "clients": 2, "options": opts}]})
    assert err.value.field == f"platforms[0].options.{next(iter(opts))}"
