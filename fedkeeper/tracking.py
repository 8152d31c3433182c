"""Experiment tracking from results: TensorBoard event files and MLflow runs, written by the process reading results."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

from fedkeeper.store import MissingExtra


def _num(v: Any) -> float | None:
    """A finite float, or None for anything a client or an old record left that is not one."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _count(v: Any) -> int:
    return len(v) if isinstance(v, (list, tuple, dict)) else 0


def round_metrics(rec: dict) -> dict[str, float]:
    """The per-round scalars both trackers log: accuracy, loss, phase times and client counts."""
    out: dict[str, float] = {}
    for name, key in (("accuracy/test", "test_accuracy"), ("accuracy/federated", "federated_accuracy"),
                      ("loss/test", "test_loss"), ("loss/federated", "federated_loss"), ("loss/train", "train_loss")):
        v = _num(rec.get(key))
        if v is not None:
            out[name] = v
    timings = rec.get("timings") if isinstance(rec.get("timings"), dict) else {}
    v = _num(timings.get("round_s"))
    if v is not None:
        out["time/round_s"] = v
    phases = timings.get("phases_s") if isinstance(timings.get("phases_s"), dict) else {}
    for ph, secs in phases.items():
        v = _num(secs)
        if v is not None:
            out[f"time/{ph}_s"] = v
    clients = rec.get("clients") if isinstance(rec.get("clients"), dict) else {}
    for k in ("selected", "included", "rejected", "failed", "stragglers", "late"):
        out[f"clients/{k}"] = float(_count(clients.get(k)))
    return out


def client_train_losses(rec: dict) -> list[float]:
    """Each client's last-epoch train loss in a round, from its update's metrics."""
    per = rec.get("per_client") if isinstance(rec.get("per_client"), dict) else {}
    out = []
    for c in per.values():
        m = c.get("metrics") if isinstance(c, dict) and isinstance(c.get("metrics"), dict) else {}
        v = _num(m.get("train_loss"))
        if v is not None:
            out.append(v)
    return out


def _rounds(results: dict) -> Iterator[tuple[int, dict]]:
    for rec in results.get("rounds") or []:
        if isinstance(rec, dict) and isinstance(rec.get("round"), int):
            yield rec["round"], rec


def tensorboard(results: dict, logdir: str | os.PathLike) -> Path:
    """Write every round's scalars and the per-client train-loss histogram as TensorBoard events; returns the folder."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise MissingExtra(f"--tensorboard uses TensorFlow's summary writer ({exc}); install it with: "
                           "pip install 'fedkeeper[tf]'") from None
    path = Path(logdir)
    path.mkdir(parents=True, exist_ok=True)
    writer = tf.summary.create_file_writer(str(path))
    with writer.as_default():
        for step, rec in _rounds(results):
            # Steps are round numbers as printed everywhere else: the first round is step 1.
            for name, value in round_metrics(rec).items():
                tf.summary.scalar(name, value, step=step)
            losses = client_train_losses(rec)
            if losses:
                tf.summary.histogram("clients/train_loss", losses, step=step)
    writer.flush()
    writer.close()
    return path


def params(results: dict) -> dict[str, str]:
    """Flat run parameters for MLflow: the config's settings, platforms and the data split."""
    fed = results.get("federation") if isinstance(results.get("federation"), dict) else {}
    out: dict[str, str] = {}
    for key in ("name", "seed", "rounds", "events", "client_access"):
        if key in fed:
            out[key] = str(fed[key])
    for section in ("model", "data", "strategy"):
        sec = fed.get(section) if isinstance(fed.get(section), dict) else {}
        for k, v in sec.items():
            out[f"{section}.{k}"] = str(v)[:500]  # MLflow bounds parameter values
    plats = [p for p in fed.get("platforms") or [] if isinstance(p, dict)]
    out["platforms"] = ", ".join(f"{p.get('name')}:{p.get('kind')}x{p.get('clients')}" for p in plats)[:500]
    out["clients"] = str(_count(fed.get("clients")))
    out["store"] = str(results.get("store", ""))[:500]
    return out


def mlflow(results: dict, uri: str, artifacts: list[Path] | None = None, run_name: str | None = None,
           artifact_location: str | None = None) -> str:
    """Log params, per-round metrics (step = round) and the given files to the MLflow store at uri; returns the run id.

    A new experiment keeps its artifacts at artifact_location, else where MLflow puts them by default
    (beside a file: store; ./mlruns under the working folder for a database store).
    """
    try:
        import mlflow as mlf
    except ImportError as exc:
        raise MissingExtra(f"--mlflow needs MLflow ({exc}); install it with: pip install 'fedkeeper[mlflow]'") from None
    import logging

    for noisy in ("mlflow", "alembic"):  # their INFO lines (schema migrations) would bury the command's output
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow keeps folder stores in maintenance mode behind this switch; naming one is the opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    fed = results.get("federation") if isinstance(results.get("federation"), dict) else {}
    client = mlf.MlflowClient(tracking_uri=uri)
    name = str(fed.get("name") or "fedkeeper")
    exp = client.get_experiment_by_name(name)
    location = artifact_location
    if location is None and uri.startswith("sqlite:///"):
        # With a database store MLflow would put artifacts in ./mlruns of whatever folder the command runs in;
        # keep them beside the database unless told otherwise.
        location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(name, artifact_location=location)
    store = str(results.get("store", ""))
    run = client.create_run(exp_id, run_name=run_name or (Path(store).name if store else None),
                            tags={"fedkeeper.store": store})
    run_id = run.info.run_id
    from mlflow.entities import Metric, Param

    metrics = []
    for step, rec in _rounds(results):
        stamp = rec.get("timings", {}).get("finished_at") if isinstance(rec.get("timings"), dict) else None
        ms = int(1000 * stamp) if _num(stamp) is not None else 0
        for key, value in round_metrics(rec).items():
            metrics.append(Metric(key.replace("/", "_"), value, ms, step))
    final = results.get("final") if isinstance(results.get("final"), dict) else {}
    for key in ("test_accuracy", "test_loss", "wall_s"):
        v = _num(final.get(key))
        if v is not None:
            metrics.append(Metric(f"final_{key}", v, 0, 0))
    ps = [Param(k, v) for k, v in params(results).items()]
    # log_batch takes at most 1000 metrics and 100 params per call.
    for i in range(0, max(len(ps), 1), 100):
        client.log_batch(run_id, params=ps[i:i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for f in artifacts or []:
        if Path(f).is_file():
            client.log_artifact(run_id, str(f))
    client.set_terminated(run_id)
    return run_id
