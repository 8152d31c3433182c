"""The paper's two networks in Keras 3, and the weight conversion between Keras models and named tensors."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _keras():
    import keras  # deferred: only the client and setup pay TensorFlow's import cost

    threads = os.environ.get("FEDKEEPER_TF_THREADS")
    if threads and not _CACHE:
        configure_threads(int(threads))
    return keras


def build(name: str, input_shape: tuple[int, ...], num_classes: int, optimizer: str = "adam",
          learning_rate: float = 1e-3, seed: int = 0, jit_compile: bool = False, steps_per_execution: int = 1) -> Any:
    """Compile `nn` (Dense 500 -> classes) or `cnn` (Conv32-Pool-Conv64-Pool-Dense512-classes).

    jit_compile and steps_per_execution change how Keras runs the training steps, not which steps
    it runs: the batches, their order and the updates are the same (XLA rounds floats differently).
    """
    keras = _keras()
    from keras import layers

    init = keras.initializers.GlorotUniform(seed=seed)
    inputs = keras.Input(shape=tuple(input_shape), name="input")
    if name == "nn":
        x = layers.Flatten(name="flatten")(inputs)
        x = layers.Dense(500, activation="relu", kernel_initializer=init, name="hidden")(x)
    elif name == "cnn":
        x = layers.Conv2D(32, 5, padding="same", activation="relu", kernel_initializer=init, name="conv1")(inputs)
        x = layers.MaxPooling2D(2, name="pool1")(x)
        x = layers.Conv2D(64, 5, padding="same", activation="relu", kernel_initializer=init, name="conv2")(x)
        x = layers.MaxPooling2D(2, name="pool2")(x)
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(512, activation="relu", kernel_initializer=init, name="dense")(x)
    else:
        raise ValueError(f"unknown model {name!r}: use nn or cnn")
    outputs = layers.Dense(num_classes, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1), name="output")(x)
    model = keras.Model(inputs, outputs, name=name)
    opt = keras.optimizers.Adam(learning_rate) if optimizer == "adam" else keras.optimizers.SGD(learning_rate)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=jit_compile, steps_per_execution=steps_per_execution)
    return model


def cached(name: str, input_shape: tuple[int, ...], num_classes: int, optimizer: str, learning_rate: float,
           jit_compile: bool = False, steps_per_execution: int = 1) -> tuple[Any, bool]:
    """A compiled model reused across warm invocations (its traced train step survives); True if newly built.

    Each thread has its own: an instance serving several invocations at once runs each on its own thread,
    and two fits must never share one model's weights or optimizer.
    """
    key = (threading.get_ident(), name, tuple(input_shape), num_classes, optimizer, float(learning_rate),
           bool(jit_compile), int(steps_per_execution))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key], False
        model = build(name, input_shape, num_classes, optimizer, learning_rate, jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        _CACHE[key] = model
        return model, True


def forget(model: Any) -> None:
    """Drop a model from the warm cache (e.g. after its compiled step failed), so the next call builds afresh."""
    with _LOCK:
        for key in [k for k, v in _CACHE.items() if v is model]:
            del _CACHE[key]


def shuffled(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Any:
    """Batches of (x, y) in an order reshuffled every epoch, the same for the same seed in any process.

    The seed goes to the shuffle itself. Seeding TensorFlow globally instead (keras.utils.set_random_seed)
    clears TensorFlow's kernel caches, so every fit re-instantiated its compiled training step: 30% more CPU
    per fit for the NN, 3-5% for the CNN. The order depends on TensorFlow's global seed too, which the client
    never sets, so it is the same in every worker. Pass shuffle=False to fit: the pipeline shuffles itself.
    """
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(max(1, len(x)), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size))


def get_weights(model: Any) -> dict[str, np.ndarray]:
    """Named float32 tensors, keyed by each variable's stable layer path."""
    return {v.path: np.asarray(v.numpy(), dtype=np.float32) for v in model.weights}


def set_weights(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Load named tensors into the model; raises ValueError naming any missing or misshaped tensor."""
    for v in model.weights:
        if v.path not in weights:
            raise ValueError(f"weights lack tensor {v.path}; the blob is for another model")
        w = weights[v.path]
        if tuple(w.shape) != tuple(v.shape):
            raise ValueError(f"tensor {v.path} has shape {tuple(w.shape)}, the model needs {tuple(v.shape)}")
        v.assign(w)


def reset_optimizer(model: Any) -> None:
    """Zero the optimizer's slots and step count, so each invocation trains from a fresh optimizer as in the paper."""
    opt = model.optimizer
    if not opt.built:
        return
    for v in opt.variables:
        if "learning_rate" in v.path:
            continue
        v.assign(np.zeros(v.shape, dtype=v.dtype))


def initial_weights(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded initial global model."""
    keras = _keras()
    keras.utils.set_random_seed(seed)
    return get_weights(build(name, input_shape, num_classes, seed=seed))


def configure_threads(threads: int = 1) -> None:
    """Limit TensorFlow's thread pools, so concurrent workers on few cores do not oversubscribe them."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # already initialised in this process; the first setting stands
        pass
