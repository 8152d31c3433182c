"""The client: trains the global model on its own data and writes its update; in evaluate mode, scores a model."""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np

from fedkeeper.core import blob, faults, keys, rounds
from fedkeeper.functions.context import AGGREGATOR, Context, HandlerError, parsed_record
from fedkeeper.store import NotFound

_STATE = {"invocations": 0}
# Fits running in this process now (an instance serving several invocations runs each on a thread), each
# with whether another fit ran beside it at any moment: then the process's CPU clock holds both.
_FITS: dict[object, bool] = {}
_FITS_LOCK = threading.Lock()


def _fetch_data(ctx: Context, ref: str) -> dict:
    """A client's arrays from a store key or from an http(s) URL (presigned or the owner's own server)."""
    from fedkeeper import data as datamod

    if ref.startswith(("http://", "https://")):
        return datamod.unpack(_http("GET", ref))
    try:
        return datamod.unpack(ctx.store.get(ref))
    except NotFound:
        raise HandlerError(f"data {ref} is missing from the store; re-run setup or fix the client's data URI", 404) from None


def _num_classes(ctx: Context) -> int:
    # data/meta.json lists every client's partition size: parsed once per warm worker, not per invocation.
    return int(parsed_record(ctx.store, "data/meta.json", json.loads)["num_classes"])


def handle(event: dict, ctx: Context) -> dict:
    """Event {"round", "client", "mode": "train"} or {"mode": "evaluate", "round", "model", "data", "output"}."""
    try:
        return _handle(event, ctx)
    finally:
        models = sys.modules.get("fedkeeper.models")  # only where Keras ran: other modes never import it
        if models is not None:
            try:
                models.release_freed_memory()  # a warm instance keeps what it holds between invocations
            except Exception:  # noqa: BLE001 - memory hygiene only; it must never fail a finished invocation
                pass


def _handle(event: dict, ctx: Context) -> dict:
    """Dispatch one event by mode (see handle)."""
    start = time.time()
    cold = _STATE["invocations"] == 0
    _STATE["invocations"] += 1
    mode = event.get("mode", "train")
    if mode == "evaluate":
        return evaluate(event, ctx, start, cold)
    if mode in ("advertise", "unmask"):  # secure aggregation's extra phases
        from fedkeeper.functions import secagg

        try:
            return secagg.advertise(event, ctx) if mode == "advertise" else secagg.unmask(event, ctx)
        except Exception as exc:
            # As for training: record the failure now (retry or settle) rather than wait out the phase.
            try:
                secagg.report_failure(ctx, event, f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise
    if mode != "train":
        raise HandlerError(f"unknown mode {mode!r}: use train or evaluate")
    if isinstance(event.get("access"), dict):
        return train_presigned(event, ctx, start, cold)  # no store credentials: the platform reports failures
    r, cid = _round_and_client(event)
    attempt = event.get("attempt") if isinstance(event.get("attempt"), int) and event.get("attempt") > 0 else 1
    try:
        return train(event, ctx, start, cold)
    except Exception as exc:
        # Settle the client now rather than at the deadline; the protocol retries it if the budget allows.
        from fedkeeper.functions import protocol

        try:
            protocol.client_failed(ctx, r, cid, f"{type(exc).__name__}: {exc}", attempt, str(event.get("platform", "")))
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass
        raise


def _phase(timings: dict, name: str, t0: float) -> float:
    now = time.perf_counter()
    timings[name] = now - t0
    return now


def training_spec(cfg) -> dict:
    """The training settings a client needs; a presigned invocation carries them, as the config is out of reach."""
    m = cfg.model
    return {"model": m.name, "optimizer": m.optimizer, "learning_rate": m.learning_rate, "batch_size": m.batch_size,
            "epochs": m.epochs, "seed": cfg.seed, "events": cfg.events, "jit_compile": m.jit_compile,
            "steps_per_execution": m.steps_per_execution, **_local_dp_spec(cfg)}


def _local_dp_spec(cfg) -> dict:
    """Local DP's clip norm and noise multiplier, when the federation asks each client to noise its own update."""
    privacy = getattr(cfg, "privacy", None)
    if privacy is None or privacy.dp.mode != "local":
        return {}
    return {"local_dp": {"clip_norm": privacy.dp.clip_norm, "noise_multiplier": privacy.dp.noise_multiplier}}


def _model(spec: dict, input_shape: tuple, num_classes: int) -> tuple:
    """The warm compiled model for these settings; XLA is skipped once it has failed in this worker."""
    from fedkeeper import models

    jit = bool(spec.get("jit_compile", False)) and not _STATE.get("xla_failed")
    return models.cached(spec["model"], tuple(input_shape), num_classes, spec["optimizer"], spec["learning_rate"],
                         jit_compile=jit, steps_per_execution=int(spec.get("steps_per_execution", 1)))


def _keras_call(spec: dict, input_shape: tuple, num_classes: int, run, timings: dict):
    """run(model, built) on the warm model; if XLA cannot compile it here, the same steps run uncompiled."""
    from fedkeeper import models

    model, built = _model(spec, input_shape, num_classes)
    try:
        return run(model, built)
    except Exception as exc:  # noqa: BLE001 - XLA reports unsupported ops with several error types
        # Bad input (weights of another model, wrong shapes) fails the same way uncompiled: no retry.
        if not getattr(model, "jit_compile", False) or isinstance(exc, (ValueError, KeyError, TypeError)):
            raise
        _STATE["xla_failed"] = f"{type(exc).__name__}: {exc}"[:500]
        timings["xla_fallback"] = _STATE["xla_failed"]
        models.forget(model)
        model, built = _model(spec, input_shape, num_classes)
        return run(model, built)


def _fit(spec: dict, num_classes: int, global_bytes: bytes, arrays: dict, r: int, cid: str, platform: str,
         timings: dict, t: float, selected: list[str], fit: dict | None = None, mask=None) -> tuple[bytes, dict]:
    """Train from the global model on the arrays; returns the update blob (masked if `mask`) and its metrics.

    `fit` is the strategy's fit config (proximal_mu, scaffold) plus the control variates the caller
    loaded; for SCAFFOLD the client's new control variate is left in fit["new_client_control"].
    """
    from fedkeeper import client_terms, models

    fit = fit if fit is not None else {}

    global_blob = blob.decode(global_bytes)

    def run(model, built: bool) -> dict:
        clock = t
        models.set_weights(model, global_blob.tensors)
        models.reset_optimizer(model)
        clock = _phase(timings, "init_s", clock)
        metrics: dict = {"train_examples": int(len(arrays["x_train"])),
                         "holdout_examples": int(len(arrays.get("x_val", [])))}
        if metrics["holdout_examples"]:
            scores = models.evaluate(model, arrays["x_val"], arrays["y_val"], batch_size=256)
            metrics.update(holdout_loss=scores["loss"], holdout_accuracy=scores["accuracy"])
        clock = _phase(timings, "holdout_eval_s", clock)
        clock += _emulate_speed(timings, "holdout_eval_s")
        # The shuffle's seed depends on the federation's seed, the round and the client alone, so a retry, a
        # warm worker and a cold one all train on the same batches in the same order.
        seed = models.fit_seed(spec["seed"], r, cid)
        # Reading the process's CPU time sums every thread's (TensorFlow runs dozens): about a millisecond on a
        # busy machine, so it is read only around a fit that runs.
        training = spec["epochs"] > 0
        cpu = time.process_time() if training else 0.0
        token = object()
        with _FITS_LOCK:
            if _FITS:  # this fit and every one already running now share the process
                _FITS.update(dict.fromkeys(_FITS, True))
            _FITS[token] = bool(_FITS)
        # The strategy's terms (FedProx, SCAFFOLD) join the loss for this training only.
        client_terms.before_fit(model, fit, global_blob.tensors, fit.get("control"), fit.get("client_control"))
        steps0 = int(model.optimizer.iterations.numpy())
        try:
            logs = models.train(model, arrays["x_train"], arrays["y_train"], spec["batch_size"], spec["epochs"], seed)
        finally:
            client_terms.after_fit(model)
            with _FITS_LOCK:
                shared = _FITS.pop(token)
        metrics["local_steps"] = int(model.optimizer.iterations.numpy()) - steps0  # FedNova and SCAFFOLD read it
        metrics.update({name: logs[key] for name, key in (("train_loss", "loss"), ("train_accuracy", "accuracy"))
                        if key in logs})
        _phase(timings, "train_s", clock)
        # CPU seconds of every thread of this worker while it trained: beside train_s it tells slow training
        # from a worker that waited for a core.
        timings["train_cpu_s"] = time.process_time() - cpu if training else 0.0
        if shared and training:
            # Another invocation of this instance trained meanwhile: the process's CPU time holds both fits.
            timings["train_cpu_shared"] = True
        _emulate_speed(timings, "train_s")
        timings["model_built"] = built
        return {"metrics": metrics, "weights": models.get_weights(model)}

    if spec["epochs"] <= 0 and not len(arrays.get("x_val", [])):
        out = _untrained(global_blob, arrays, timings, t)
    else:
        out = _keras_call(spec, arrays["x_train"].shape[1:], num_classes, run, timings)
    metrics = out["metrics"]
    if fit.get("scaffold") and metrics["local_steps"] > 0:
        fit["new_client_control"] = client_terms.new_client_control(
            global_blob.tensors, out["weights"], metrics["local_steps"], float(spec["learning_rate"]),
            fit.get("control"), fit.get("client_control"))
    if isinstance(spec.get("local_dp"), dict):  # local DP: only the clipped, noised update leaves the client
        from fedkeeper.core.privacy import dp

        out["weights"], _ = dp.local_dp(out["weights"], global_blob.tensors, float(spec["local_dp"]["clip_norm"]),
                                        float(spec["local_dp"]["noise_multiplier"]))
    meta = {"kind": "update", "round": r, "client": cid, "num_examples": metrics["train_examples"],
            "metrics": metrics, "timings": timings, "platform": platform}
    payload = mask(out["weights"], meta) if mask is not None else blob.encode(out["weights"], meta)
    if faults.hostile_kind(cid):
        payload = faults.hostile_update(faults.hostile_kind(cid), out["weights"], meta)
    if faults.corrupt_target(r, selected) == cid:
        payload = payload[: len(payload) // 2]
    return payload, metrics


def _untrained(global_blob: blob.Blob, arrays: dict, timings: dict, t: float) -> dict:
    """An invocation with nothing to train or score (zero epochs, no holdout): its update is the global model, as
    loading that into Keras and reading it back out would give bit for bit, so Keras is not loaded at all."""
    clock = _phase(timings, "init_s", t)
    _phase(timings, "holdout_eval_s", clock)
    timings.update(train_s=0.0, train_cpu_s=0.0, model_built=False)
    metrics = {"train_examples": int(len(arrays["x_train"])), "holdout_examples": 0, "local_steps": 0}
    return {"metrics": metrics, "weights": {k: np.asarray(v, dtype=np.float32) for k, v in global_blob.tensors.items()}}


def _fit_config(raw) -> dict:
    """The strategy's fit config for this client (only the keys training understands, checked)."""
    raw = raw if isinstance(raw, dict) else {}
    fit: dict = {}
    mu = raw.get("proximal_mu")
    if isinstance(mu, (int, float)) and not isinstance(mu, bool) and mu > 0:
        fit["proximal_mu"] = float(mu)
    if raw.get("scaffold") is True:
        fit["scaffold"] = True
    return fit


def _controls_from_store(store, r: int, cid: str) -> dict:
    """SCAFFOLD's server control variate c (from round r's server state) and this client's own cᵢ."""
    from fedkeeper import client_terms

    out = {}
    try:
        out["control"] = client_terms.server_control(store.get(keys.server_state(r)))
    except NotFound:
        out["control"] = None  # before the first aggregation c is zero
    try:
        out["client_control"] = client_terms.client_control(store.get(keys.control_variate(cid)), r)
    except NotFound:
        out["client_control"] = None  # a client's first round: cᵢ is zero
    return out


def _controls_presigned(access: dict, r: int) -> dict:
    """As _controls_from_store, through the presigned GETs the trigger handed out (absent objects have none)."""
    from fedkeeper import client_terms

    state = _http("GET", access["server_state"]) if isinstance(access.get("server_state"), str) else None
    own = _http("GET", access["control"]) if isinstance(access.get("control"), str) else None
    return {"control": client_terms.server_control(state), "client_control": client_terms.client_control(own, r)}


def _control_blob(fit: dict, r: int, cid: str) -> bytes:
    from fedkeeper import client_terms

    return client_terms.encode_client_control(fit["new_client_control"], fit.get("client_control"), r, cid)


def _emulate_speed(timings: dict, phase: str) -> float:
    """On a local platform emulating a slower device (set only by the local runtime), stretch a compute phase:
    sleep (1/speed - 1) times its measured length and count the sleep in it; returns the seconds slept."""
    import os

    raw = os.environ.get("FEDKEEPER_EMULATE_SPEED")
    if not raw:
        return 0.0
    speed = float(raw)
    extra = timings[phase] * (1.0 / speed - 1.0) if 0 < speed < 1 else 0.0
    if extra > 0:
        time.sleep(extra)
        timings[phase] += extra
        timings["emulated_slowdown_s"] = timings.get("emulated_slowdown_s", 0.0) + extra
    return extra


def _start_timings(event: dict, start: float, cold: bool) -> dict:
    timings: dict = {"cold_start": cold, "started_at": start}
    if event.get("invoked_at"):
        timings["invoke_s"] = max(0.0, start - float(event["invoked_at"]))
    return timings


def _round_and_client(event: dict) -> tuple[int, str]:
    try:
        return int(event["round"]), str(event["client"])
    except (KeyError, TypeError, ValueError):
        raise HandlerError("train event needs integer 'round' and string 'client'") from None


def train(event: dict, ctx: Context, start: float, cold: bool) -> dict:
    """Train on the client's partition from round r's global model and write the update blob."""
    from fedkeeper.functions import protocol

    store = ctx.store
    r, cid = _round_and_client(event)
    if event.get("async") is True:
        # Asynchronous mode: the dispatch record, not a manifest, says this client trains from version r.
        entry = protocol.read_json(store, keys.dispatch(r, cid))
        if not isinstance(entry, dict) or not isinstance(entry.get("platform"), str):
            raise HandlerError(f"client {cid} was not invoked on model version {r}", 403)
        model_key, selected = keys.model(r), []
    else:
        manifest = protocol.read_manifest(store, r)
        if manifest is None:
            raise HandlerError(f"round {r} has no manifest; the trigger has not opened it", 404)
        entry = manifest.entry(cid)
        if entry is None:
            raise HandlerError(f"client {cid} was not selected for round {r}", 403)
        if store.exists(keys.result(r)):
            return {"status": "closed", "round": r, "client": cid}
        model_key, selected = manifest.model, manifest.ids
    attempt = event.get("attempt") if isinstance(event.get("attempt"), int) and event.get("attempt") > 0 else 1
    protocol.client_started(ctx, r, cid, attempt)
    cfg = ctx.config()
    timings = _start_timings(event, start, cold)
    t = time.perf_counter()
    from fedkeeper.functions import shards

    global_bytes = shards.model_bytes(store, model_key)  # a sharded model is joined
    arrays = _fetch_data(ctx, event.get("data") or entry.get("data") or keys.client_data(cid))
    t = _phase(timings, "download_s", t)
    mask = None
    if cfg.privacy.secure_aggregation and not event.get("async"):  # only the masked update leaves the client
        from fedkeeper.functions import secagg

        mask = secagg.masker(ctx, cfg, manifest, cid, blob.decode(global_bytes).tensors)
    fit = _fit_config(entry.get("config"))
    if fit.get("scaffold"):
        fit.update(_controls_from_store(store, r, cid))
    payload, metrics = _fit(training_spec(cfg), _num_classes(ctx), global_bytes, arrays, r, cid,
                            entry["platform"], timings, t, selected, fit=fit, mask=mask)
    if "new_client_control" in fit:  # before the update: once the update lands, this client is not retried
        store.put(keys.control_variate(cid), _control_blob(fit, r, cid))
    # Timings up to here are in the blob; the upload's own duration goes in the reply.
    t_up = time.perf_counter()
    if mask is None:
        store.put(keys.update(r, cid), payload)
    elif not store.put_if_absent(keys.update(r, cid), payload):
        # Masks are fixed for the round: a second, different upload under them would reveal the difference of
        # the two updates, so a masked update is written once and a retry keeps the first.
        return {"status": "delivered", "round": r, "client": cid}
    upload_s = time.perf_counter() - t_up
    # A small sidecar keeps the upload time in the store, so reports can be rebuilt from the store alone.
    store.put_json(keys.client_timings(r, cid), {"upload_s": upload_s, "bytes": len(payload), "finished_at": time.time()})
    if cfg.events == "client":  # the store sends no events: tell the aggregator ourselves
        ctx.invoker.invoke(AGGREGATOR, {"store": store.url, "key": keys.update(r, cid), "event_time": time.time()}, None)
    return {"status": "trained", "round": r, "client": cid, "num_examples": metrics["train_examples"],
            "metrics": metrics, "timings": dict(timings, upload_s=upload_s), "bytes": len(payload)}


def _http(method: str, url: str, data: bytes | None = None, timeout: float = 120.0,
          headers: dict | None = None) -> bytes:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/octet-stream")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URLs come from the trigger
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise HandlerError(f"{method} of a presigned URL was refused with HTTP {exc.code}; it may have expired "
                           f"(the round's deadline) or not cover this object", 403) from None


def _http_post_form(post: dict, payload: bytes, timeout: float = 120.0) -> None:
    """Upload through a presigned POST policy (multipart form, file last), which bounds the object's size."""
    import uuid

    url, fields = post.get("url"), post.get("fields")
    if not isinstance(url, str) or not isinstance(fields, dict):
        raise HandlerError("presigned POST lacks 'url' or 'fields'")
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="update"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode())
    body = b"".join(parts) + bytes(payload) + f"\r\n--{boundary}--\r\n".encode()
    _http("POST", url, body, timeout=timeout, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def train_presigned(event: dict, ctx: Context, start: float, cold: bool) -> dict:
    """Train with only the presigned URLs in the event: GET model, GET data, PUT own update; no store credentials."""
    from fedkeeper import data as datamod

    r, cid = _round_and_client(event)
    access, spec = event["access"], event.get("spec") or {}
    for name in ("model", "data", "update"):
        if not isinstance(access.get(name), str):
            raise HandlerError(f"presigned invocation lacks the '{name}' URL")
    timings = _start_timings(event, start, cold)
    t = time.perf_counter()
    global_bytes = _http("GET", access["model"])
    arrays = datamod.unpack(_http("GET", access["data"]))
    t = _phase(timings, "download_s", t)
    fit = _fit_config(spec.get("fit"))
    if fit.get("scaffold"):
        fit.update(_controls_presigned(access, r))
    payload, metrics = _fit(spec, int(spec["num_classes"]), global_bytes, arrays, r, cid, event.get("platform", ""),
                            timings, t, spec.get("selected", []), fit=fit)
    if "new_client_control" in fit:
        if not isinstance(access.get("control_put"), str):
            raise HandlerError("presigned SCAFFOLD invocation lacks the 'control_put' URL")
        _http("PUT", access["control_put"], _control_blob(fit, r, cid), headers=access.get("control_headers"))
    t_up = time.perf_counter()
    if isinstance(access.get("update_post"), dict):
        _http_post_form(access["update_post"], payload)
    else:
        _http("PUT", access["update"], payload, headers=access.get("update_headers"))
    upload_s = time.perf_counter() - t_up
    if spec.get("events") == "client":
        ctx.invoker.invoke(AGGREGATOR, {"store": event.get("store"), "key": keys.update(r, cid),
                                        "event_time": time.time()}, None)
    return {"status": "trained", "round": r, "client": cid, "num_examples": metrics["train_examples"],
            "metrics": metrics, "timings": dict(timings, upload_s=upload_s), "bytes": len(payload), "presigned": True}


def evaluate(event: dict, ctx: Context, start: float, cold: bool) -> dict:
    """Evaluate a model blob on a data key and write the evaluation record (central test accuracy)."""
    for field in ("model", "data", "output"):
        if not isinstance(event.get(field), str):
            raise HandlerError(f"evaluate event needs string '{field}'")
    access = event.get("access") if isinstance(event.get("access"), dict) else None
    t = time.perf_counter()
    timings: dict = {"cold_start": cold, "started_at": start}
    from fedkeeper import data as datamod

    if access:  # presigned: no store credentials, as for training
        spec = event.get("spec") or {}
        weights = blob.decode(_http("GET", access["model"])).tensors
        arrays = datamod.unpack(_http("GET", access["data"]))
        num_classes = int(spec["num_classes"])
    else:
        spec = training_spec(ctx.config())
        try:
            from fedkeeper.functions import shards

            weights = shards.load_model(ctx.store, event["model"]).tensors
        except NotFound:
            raise HandlerError(f"model {event['model']} is missing", 404) from None
        arrays = _fetch_data(ctx, event["data"])
        num_classes = _num_classes(ctx)
    x, y = arrays.get("x", arrays.get("x_test")), arrays.get("y", arrays.get("y_test"))
    t = _phase(timings, "download_s", t)
    from fedkeeper import models

    def run(model, _built: bool) -> tuple[float, float]:
        models.set_weights(model, weights)
        # Keras's test step over the batches in graph calls, scored as Keras's evaluate scores them.
        scores = models.evaluate(model, x, y, batch_size=256)
        return scores["loss"], scores["accuracy"]

    loss, acc = _keras_call(spec, x.shape[1:], num_classes, run, timings)
    _phase(timings, "evaluate_s", t)
    record = {"round": event.get("round"), "model": event["model"], "data": event["data"],
              "test_accuracy": float(acc), "test_loss": float(loss), "examples": int(len(x)),
              "timings": timings, "finished_at": time.time(), "platform": ctx.platform}
    if access:
        _http("PUT", access["output"], rounds.dumps(record), headers=access.get("output_headers"))
    else:
        ctx.store.put_json(event["output"], record)
    return {"status": "evaluated", **record}
