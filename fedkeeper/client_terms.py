"""Client-side training terms a strategy asks for in its fit config: FedProx's proximal term, SCAFFOLD's correction.

Both are weight regularizers on the model's trainable variables, so Keras adds them to the training
loss inside its own (possibly XLA-compiled) train step:
    (mu/2)·‖w − w_global‖²   whose gradient is mu·(w − w_global)          (Li et al. 2020)
    ⟨w, c − cᵢ⟩              whose gradient is c − cᵢ, SCAFFOLD's drift correction (Karimireddy et al. 2020)
Their values live in non-trainable variables assigned per invocation, so a warm model keeps its traced
step; between trainings they are zero, so evaluations of the same model see the plain loss.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import numpy as np

from fedkeeper.core import blob

CONTROL_PREFIX = "c/"  # SCAFFOLD's server control variate in the server-state blob
PREVIOUS = "prev/"  # a client's control variate from before the round it was written in

# Kept beside the model, not on it: Keras tracks variables set as a model's attributes, and they would
# then appear among the model's weights.
_TERMS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class _Term:
    """The regularizer of one variable: (mu/2)·‖w − anchor‖² + ⟨w, correction⟩."""

    def __init__(self, mu: Any, anchor: Any, correction: Any) -> None:
        self.mu, self.anchor, self.correction = mu, anchor, correction

    def __call__(self, w: Any) -> Any:
        from keras import ops

        return self.mu * 0.5 * ops.sum(ops.square(w - self.anchor)) + ops.sum(w * self.correction)


def needed(fit: Mapping[str, Any] | None) -> bool:
    """True if the fit config asks for a term."""
    return bool(fit) and (float(fit.get("proximal_mu") or 0) > 0 or bool(fit.get("scaffold")))


def _install(model: Any) -> dict:
    import keras

    terms = _TERMS.get(model)
    if terms is not None:
        return terms
    mu = keras.Variable(0.0, trainable=False, dtype="float32", name="fedkeeper_mu")
    terms = {"mu": mu, "vars": {}}
    for v in model.trainable_weights:
        anchor = keras.Variable(np.zeros(v.shape, np.float32), trainable=False, name="fedkeeper_anchor")
        corr = keras.Variable(np.zeros(v.shape, np.float32), trainable=False, name="fedkeeper_correction")
        v.regularizer = _Term(mu, anchor, corr)
        terms["vars"][v.path] = (anchor, corr)
    _TERMS[model] = terms
    # The traced steps were built without the terms: trace them again once, with them.
    model.train_function = model.test_function = model.predict_function = None
    from fedkeeper import models

    models.forget_traces(model)
    return terms


def before_fit(model: Any, fit: Mapping[str, Any] | None, global_weights: Mapping[str, np.ndarray],
               control: Mapping[str, np.ndarray] | None = None,
               client_control: Mapping[str, np.ndarray] | None = None) -> None:
    """Set the terms for this training: mu and the anchor for FedProx, c − cᵢ for SCAFFOLD (zero when absent)."""
    if not needed(fit) and model not in _TERMS:
        return  # plain FedAvg on a model that never had terms: nothing to trace or compute
    terms = _install(model)
    fit = fit or {}
    terms["mu"].assign(float(fit.get("proximal_mu") or 0.0))
    scaffold = bool(fit.get("scaffold"))
    for path, (anchor, corr) in terms["vars"].items():
        anchor.assign(np.asarray(global_weights[path], dtype=np.float32))
        c = np.zeros(anchor.shape, np.float32)
        if scaffold:
            if control is not None and path in control:
                c += control[path]
            if client_control is not None and path in client_control:
                c -= client_control[path]
        corr.assign(c)


def after_fit(model: Any) -> None:
    """Zero the terms, so evaluating this warm model later measures the plain loss."""
    terms = _TERMS.get(model)
    if terms is None:
        return
    terms["mu"].assign(0.0)
    for _, corr in terms["vars"].values():
        corr.assign(np.zeros(corr.shape, np.float32))


def server_control(state_bytes: bytes | memoryview | None) -> dict[str, np.ndarray] | None:
    """SCAFFOLD's server control variate c from a server-state blob (None before the first aggregation)."""
    if not state_bytes:
        return None
    tensors = blob.decode(state_bytes).tensors
    return {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}


def client_control(data: bytes | memoryview | None, r: int) -> dict[str, np.ndarray] | None:
    """The cᵢ to train round r with: the stored one, or, on a retry of round r, the one from before it."""
    if not data:
        return None
    b = blob.decode(data)
    if b.meta.get("round") == r:
        out = {k[len(PREVIOUS):]: v for k, v in b.tensors.items() if k.startswith(PREVIOUS)}
    else:
        out = {k: v for k, v in b.tensors.items() if not k.startswith(PREVIOUS)}
    return out or None


def new_client_control(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], steps: int, lr: float,
                       control: Mapping[str, np.ndarray] | None,
                       client_ctl: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """SCAFFOLD option II: cᵢ⁺ = cᵢ − c + (x − y)/(K·η_l)."""
    out = {}
    scale = np.float32(1.0 / (steps * lr))
    for name, w in y.items():
        ci = (np.asarray(x[name], np.float32) - w) * scale
        if client_ctl is not None and name in client_ctl:
            ci += client_ctl[name]
        if control is not None and name in control:
            ci -= control[name]
        out[name] = ci.astype(np.float32)
    return out


def encode_client_control(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray] | None, r: int,
                          client: str) -> bytes:
    """The client's control-variate blob: cᵢ⁺ and the cᵢ it came from (so a retry of round r starts from the same)."""
    tensors = dict(new)
    for name, v in new.items():
        tensors[PREVIOUS + name] = old[name] if old is not None and name in old else np.zeros_like(v)
    return bytes(blob.encode(tensors, {"kind": "control_variate", "round": r, "client": client}))
