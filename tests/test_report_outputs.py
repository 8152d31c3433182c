"""What a finished run leaves for people: plots that say which run they show, the HTML page, TensorBoard and MLflow."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedkeeper import report, tracking
from fedkeeper.cli import main
from tests.extras import mark, needs

PHASES = {"invoke": 0.004, "cold_start": 2.5, "download": 0.002, "training": 1.2, "upload": 0.001,
          "aggregation": 0.003, "evaluation": 0.4}
HOSTILE = "<script>alert('x')</script>"


def fake_results(n_rounds: int = 2) -> dict:
    """results.json content for a small run: two platforms, one rejected client with a hostile reason."""
    rounds = []
    for r in range(1, n_rounds + 1):
        per = {}
        for i, cid in enumerate(("a-000", "a-001", "b-000")):
            per[cid] = {"platform": cid[0], "num_examples": 10 + i, "cold": r == 1, "invoke_s": 0.01,
                        "cold_start_s": 2.0 if r == 1 else 0.0, "warm_init_s": 0.0, "download_s": 0.002,
                        "holdout_eval_s": 0.1, "train_s": 1.0 + i, "upload_s": 0.001,
                        "metrics": {"train_loss": 1.0 / r + 0.1 * i}}
        rounds.append({
            "round": r, "status": "done", "test_accuracy": 0.5 + 0.1 * r, "test_loss": 1.5 - 0.2 * r,
            "federated_accuracy": 0.4 + 0.1 * r, "federated_loss": 1.6 - 0.2 * r, "train_loss": 1.2 - 0.1 * r,
            "clients": {"selected": ["a-000", "a-001", "b-000"], "included": ["a-000", "a-001"],
                        "rejected": [{"client": "b-000", "reason": f"update norm too large {HOSTILE}"}],
                        "failed": [], "stragglers": [], "late": []},
            "aggregations": 1, "aggregated_by": "x", "num_examples": 21,
            "timings": {"round_s": 3.0 + r, "phases_s": dict(PHASES), "manifest_created": 1_760_000_000.0 + 10 * r,
                        "finished_at": 1_760_000_004.0 + 10 * r, "resumed_at": None},
            "platforms": {"a": {"clients": 2, "cold_starts": 0, "mean_client_s": 1.5, "max_client_s": 2.0},
                          "b": {"clients": 1, "cold_starts": 0, "mean_client_s": 2.5, "max_client_s": 2.5}},
            "per_client": per})
    fed = {"name": "demo", "rounds": n_rounds, "seed": 0, "model": {"name": "nn", "epochs": 2},
           "data": {"dataset": "digits", "partition": "iid"}, "strategy": {"name": "fedavg", "quorum": 1.0},
           "platforms": [{"name": "a", "kind": "local", "clients": 2}, {"name": "b", "kind": "local", "clients": 1}],
           "clients": [{"id": "a-000", "platform": "a"}, {"id": "a-001", "platform": "a"},
                       {"id": "b-000", "platform": "b"}]}
    return {"federation": fed, "data": {}, "store": "/tmp/fed", "rounds": rounds,
            "final": {"test_accuracy": rounds[-1]["test_accuracy"], "test_loss": rounds[-1]["test_loss"],
                      "rounds": n_rounds, "status": "finished", "wall_s": 12.0}}


@pytest.fixture
def figures(monkeypatch):
    """Every figure report.plot saves, kept open for inspection."""
    needs("tf", "matplotlib")
    from matplotlib.figure import Figure

    saved = {}
    real = Figure.savefig

    def keep(fig, path, *a, **k):
        saved[Path(path).name] = fig
        return real(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def test_plots_tick_whole_rounds_and_name_the_run(tmp_path, figures):
    files = report.plot(fake_results(2), tmp_path)
    assert sorted(f.name for f in files) == ["accuracy.png", "accuracy_time.png", "loss.png", "phases.png", "platforms.png"]
    for name, fig in figures.items():
        if name == "accuracy_time.png":  # against wall time; its points are labelled with their rounds
            assert "wall time" in fig.axes[0].get_xlabel()
            assert sorted(t.get_text() for t in fig.axes[0].texts) == ["1", "2"]
            continue
        ticks = [t for ax in fig.axes for t in ax.get_xticks() if ax.get_xlabel() == "round"]
        assert ticks and all(float(t).is_integer() for t in ticks), (name, ticks)
        texts = " ".join(t.get_text() for t in fig.texts)
        assert "digits" in texts and "nn" in texts and "iid" in texts and "fedavg" in texts and "2025-10-09" in texts


def test_platform_bars_are_centred_on_their_round(tmp_path, figures):
    report.plot(fake_results(3), tmp_path)
    ax = figures["platforms.png"].axes[0]
    centres = sorted(p.get_x() + p.get_width() / 2 for p in ax.patches)
    # Two platforms per round: their mean centre is the round's tick.
    pairs = [(centres[i] + centres[i + 1]) / 2 for i in range(0, len(centres), 2)]
    assert pairs == pytest.approx([1, 2, 3])


def test_small_phases_get_a_log_scale_panel(tmp_path, figures):
    report.plot(fake_results(2), tmp_path)
    axes = figures["phases.png"].axes
    assert len(axes) == 2 and axes[1].get_yscale() == "log"
    labels = {line.get_label() for line in axes[1].get_lines()}
    assert {"download", "upload", "aggregation"} <= labels


def _html(tmp_path) -> tuple[Path, str]:
    results = fake_results(2)
    report.write(results, tmp_path)
    page = report.write_html(results, tmp_path)
    return page, page.read_text()


def test_html_report_holds_summary_plots_clients_and_config(tmp_path):
    needs("tf", "matplotlib")
    page, text = _html(tmp_path)
    assert page.name == "report.html"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 5 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "0.7000" in text and "2/3" in text  # round 2's accuracy and included/selected
    assert "rejected: update norm too large" in text
    assert HOSTILE not in text and html_escaped(HOSTILE) in text  # client-written text never becomes markup
    assert '&quot;dataset&quot;: &quot;digits&quot;' in text
    assert "src=\"http" not in text and "href=\"http" not in text  # nothing loads from the network


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


def test_report_command_writes_html_from_the_store(federation, tmp_path, capsys):
    federation.open_round(0)
    assert main(["report", "--store", federation.store.url, "--out", str(tmp_path / "o"), "--html"]) == 0
    assert (tmp_path / "o" / "report.html").read_text().startswith("<!doctype html>")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs headless Chromium (Debian package: chromium)")
def test_html_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    needs("tf", "matplotlib")
    page, _ = _html(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert dom.stdout.count("<img") == 5 and "Clients per round" in dom.stdout and "<table>" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_chromium_check_sees_console_errors(tmp_path):
    """The console check above can fail: a page with a script error is reported."""
    if not Path(CHROMIUM).exists():
        pytest.skip("needs headless Chromium (Debian package: chromium)")
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><body><script>missing();</script></body>")
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'p'}", "--enable-logging=stderr", "--v=0", "--dump-dom",
                          bad.as_uri()], capture_output=True, text=True, timeout=120)
    assert any(":CONSOLE" in line and "missing" in line for line in out.stderr.splitlines())


def test_round_metrics_skip_what_is_not_a_number():
    rec = fake_results(1)["rounds"][0]
    rec["test_loss"] = "NaN from a client"
    rec["federated_accuracy"] = float("nan")
    m = tracking.round_metrics(rec)
    assert m["accuracy/test"] == pytest.approx(0.6) and "loss/test" not in m and "accuracy/federated" not in m
    assert m["clients/included"] == 2 and m["clients/rejected"] == 1 and m["time/aggregation_s"] == 0.003
    assert tracking.client_train_losses(rec) == pytest.approx([1.0, 1.1, 1.2])


@pytest.mark.slow
def test_tensorboard_events_hold_per_round_scalars_and_the_loss_histogram(tmp_path):
    needs("tf", "tensorflow")
    needs("tf", "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tracking.tensorboard(fake_results(3), tmp_path / "tb")
    acc = EventAccumulator(str(out), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert {"accuracy/test", "loss/federated", "time/round_s", "time/upload_s", "clients/rejected",
            "clients/train_loss"} <= set(tags)
    import tensorflow as tf

    test_acc = [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors("accuracy/test")]
    assert test_acc == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7)), (3, pytest.approx(0.8))]
    hist = tf.make_ndarray(acc.Tensors("clients/train_loss")[0].tensor_proto)
    assert hist[:, 2].sum() == 3  # three clients' losses in round 1's histogram


@mark("mlflow")
@pytest.mark.parametrize("scheme", ["file", pytest.param("sqlite", marks=pytest.mark.slow)])
def test_mlflow_run_has_params_metrics_per_round_and_plots(tmp_path, scheme):
    needs("tf", "matplotlib")
    import mlflow

    results = fake_results(2)
    files = report.write(results, tmp_path / "out")
    uri = (tmp_path / "mlruns").as_uri() if scheme == "file" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.mlflow(results, uri, artifacts=files, artifact_location=(tmp_path / "artifacts").as_uri())
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["model.name"] == "nn" and run.data.params["data.dataset"] == "digits"
    history = client.get_metric_history(run_id, "accuracy_test")
    assert [(m.step, round(m.value, 4)) for m in history] == [(1, 0.6), (2, 0.7)]
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(0.7)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"accuracy.png", "loss.png", "phases.png", "platforms.png", "results.json"} <= names


def test_mlflow_without_the_extra_names_it(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    from fedkeeper.store import MissingExtra

    with pytest.raises(MissingExtra, match=r"fedkeeper\[mlflow\]"):
        tracking.mlflow(fake_results(1), (tmp_path / "m").as_uri())


def test_results_json_is_plain_json(tmp_path):
    report.write(fake_results(2), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["rounds"][0]["round"] == 1
