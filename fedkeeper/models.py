"""The paper's two networks in Keras 3, and the weight conversion between Keras models and named tensors."""

from __future__ import annotations

import os
import threading
import weakref
import zlib
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()
# Each model's traced training loop and step (see `train`), kept beside the model: an attribute would be
# tracked by Keras.
_LOOPS: "weakref.WeakKeyDictionary[Any, dict[str, tuple]]" = weakref.WeakKeyDictionary()
_LOOPS_LOCK = threading.Lock()
_RELEASED = {"traces": 0, "rss": 0}  # traces() and the resident set when release_freed_memory last released
_RELEASE_LOCK = threading.Lock()  # threads of one instance end invocations at once
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _keras():
    import keras  # deferred: only the client and setup pay TensorFlow's import cost

    threads = os.environ.get("FEDKEEPER_TF_THREADS")
    if threads and not _CACHE:
        intra = os.environ.get("FEDKEEPER_TF_INTRA_THREADS")
        configure_threads(int(threads), int(intra) if intra else None)
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


def fit_seed(federation_seed: int, round_: int, client: str) -> int:
    """The seed of a client's batch order in a round: a function of the federation's seed, the round and the client."""
    return (int(federation_seed) * 1_000_003 + int(round_) * 7919 + zlib.crc32(client.encode())) % 2**31


def epoch_orders(n: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The order `train` visits n examples in each epoch: a fresh permutation per epoch from a seeded NumPy generator."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(epochs)]


def forget_traces(model: Any) -> None:
    """Drop the model's traced training and test loops, so the next call traces them again (e.g. after adding loss terms)."""
    with _LOOPS_LOCK:
        _LOOPS.pop(model, None)


def traces() -> int:
    """How many programs the warm models' training and test loops have traced (and, with XLA, compiled) so far."""
    with _LOOPS_LOCK:  # threads of one instance add loops while another counts
        fns = [f for loops in _LOOPS.values() for pair in loops.values() for f in pair]
    return sum(int(f.experimental_get_tracing_count()) for f in fns)


# Growth of the resident set since the last release that makes the next invocation's end release again. A
# release is not free: the next fit faults the returned pages in again, about 0.1 s on a 0.6 s NN fit in one
# process (bench/warm_memory.py, policy alternate), so a worker releases when it has grown this much, not after
# every invocation; it stays within this much of what it holds after a release.
RELEASE_GROWTH_BYTES = 64 * 2**20


def _resident_bytes() -> int | None:
    """This process's resident set in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_freed_memory(growth_bytes: int = RELEASE_GROWTH_BYTES) -> bool:
    """Give heap pages that TensorFlow freed back to the OS, after a new trace or once the process has grown by
    `growth_bytes` since the last release; True if it did.

    glibc keeps freed pages mapped, and a warm worker's tensors and XLA's compiles free many: a warm CNN worker
    serving shards of new sizes grew from 756 to 1,010 MB over 12 invocations when it released only after new
    traces (bench/warm_memory.py, BENCHMARKS §6). Without glibc (musl, macOS) this does nothing.
    """
    now, rss = traces(), _resident_bytes()
    with _RELEASE_LOCK:
        grown = rss is not None and rss - _RELEASED["rss"] >= growth_bytes
        if now == _RELEASED["traces"] and not grown:
            return False
        _RELEASED["traces"] = now
        from fedkeeper import heap

        if not heap.release():
            return False
        after = _resident_bytes()
        _RELEASED["rss"] = after if after is not None else 0
        return True


def _loop(model: Any, kind: str = "train") -> tuple:
    """The model's (chunk, step) for kind "train" or "test": step is Keras's own train_step, compiled as the model
    says (XLA or not), or its test_step as a plain graph; chunk runs `count` steps over a stack of batches in one
    graph call.

    The test step skips XLA whatever the model says: on evaluation's large batches TensorFlow's own kernels
    were faster (2,000 MNIST examples in batches of 256: NN 11 ms against 15, CNN 236 ms against 421) and the
    first call traced in a quarter of the time XLA took to compile (NN 0.19 s against 0.77).
    """
    with _LOOPS_LOCK:
        got = _LOOPS.get(model, {}).get(kind)
    if got is not None:
        return got
    import tensorflow as tf

    jit = kind == "train" and bool(getattr(model, "jit_compile", False))
    step = tf.function(model.train_step if kind == "train" else model.test_step, jit_compile=jit,
                       reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def chunk(xs: Any, ys: Any, count: Any) -> None:
        def body(i: Any) -> tuple:
            logs = step((xs[i], ys[i]))
            with tf.control_dependencies(tf.nest.flatten(logs)):  # step i+1 starts after step i's update
                return (i + 1,)

        tf.while_loop(lambda i: i < count, body, (tf.constant(0),), parallel_iterations=1)

    with _LOOPS_LOCK:
        _LOOPS.setdefault(model, {})[kind] = (chunk, step)
    return chunk, step


def _build_state(model: Any, x: np.ndarray, y: np.ndarray) -> None:
    """Create the optimizer's and metrics' variables before any traced call: a loop body cannot create them."""
    symbolic = getattr(model, "_symbolic_build", None)  # Keras 3's own builder, without training
    if symbolic is not None:
        symbolic(data_batch=(x, y))
        return
    # Otherwise one step of Keras fit builds them; the weights and optimizer go back to where they were.
    before = get_weights(model)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    set_weights(model, before)
    reset_optimizer(model)


def train(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int, seed: int) -> dict[str, float]:
    """Train the compiled model in place for `epochs` passes over (x, y); returns the last epoch's loss and accuracy.

    Each epoch visits the examples in the order `epoch_orders` gives, in batches of batch_size (the last one
    smaller if the data does not divide), with Keras's own train_step (the model's loss, metrics, optimizer
    and regularizers, XLA-compiled if the model is). The batches go in as arrays, model.steps_per_execution
    steps to a graph call, instead of through a tf.data iterator: an iterator hands every step between
    threads, and with two fits on two cores each hand-off waited for a core, so fits sharing a machine
    idled a third of the time (a 5-epoch NN fit: 150 ms alone, 250 ms beside another; this way about 100 ms
    either way). The same seed gives the same batches in any process, warm or cold.
    """
    n, batch_size, epochs = len(x), int(batch_size), int(epochs)
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be at least 1")
    if len(y) != n:
        raise ValueError(f"{n} examples but {len(y)} labels; give one label per example")
    if epochs <= 0 or n == 0:
        return {}
    import tensorflow as tf

    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    full, rest = divmod(n, batch_size)
    if not model.optimizer.built:
        _build_state(model, x[:batch_size], y[:batch_size])
    chunk, step = _loop(model)
    feature_shape, label_shape = tuple(x.shape[1:]), tuple(y.shape[1:])
    for order in epoch_orders(n, epochs, seed):
        model.reset_metrics()
        for start in range(0, full, per_call):
            count = min(per_call, full - start)
            idx = order[start * batch_size:(start + count) * batch_size]
            xs = x[idx].reshape((count, batch_size) + feature_shape)
            ys = y[idx].reshape((count, batch_size) + label_shape)
            if count < per_call:
                # A short last chunk is padded to the traced shape; the loop stops at `count`, so padding never trains.
                xs = np.concatenate([xs, np.zeros((per_call - count,) + xs.shape[1:], xs.dtype)])
                ys = np.concatenate([ys, np.zeros((per_call - count,) + ys.shape[1:], ys.dtype)])
            chunk(xs, ys, tf.constant(count, tf.int32))
        if rest:
            tail = order[full * batch_size:]
            step((x[tail], y[tail]))
    return {k: float(v) for k, v in model.get_metrics_result().items()}


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """The compiled model's loss and metrics on (x, y): {"loss": .., "accuracy": ..}, as Keras's evaluate gives them.

    Keras's own test_step runs over the batches in order (the last one smaller if the data does not divide),
    all full batches in one graph call instead of through a tf.data iterator, for the reason `train` gives,
    and without XLA (see _loop): the scores are those of Keras's evaluate on the model compiled without it,
    bit for bit. The model's weights are not changed; its metrics are reset first.
    """
    n, batch_size = len(x), int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; it must be at least 1")
    if len(y) != n:
        raise ValueError(f"{n} examples but {len(y)} labels; give one label per example")
    if n == 0:
        raise ValueError("no examples to evaluate on; give at least one")
    import tensorflow as tf

    full, rest = divmod(n, batch_size)
    symbolic = getattr(model, "_symbolic_build", None)
    if symbolic is not None:
        symbolic(data_batch=(x[:batch_size], y[:batch_size]))  # builds only what is not built yet
    elif not model.optimizer.built:
        _build_state(model, x[:batch_size], y[:batch_size])
    chunk, step = _loop(model, "test")
    model.reset_metrics()
    if full:
        # Views, not copies: the batches are consecutive rows.
        xs = x[:full * batch_size].reshape((full, batch_size) + tuple(x.shape[1:]))
        ys = y[:full * batch_size].reshape((full, batch_size) + tuple(y.shape[1:]))
        chunk(xs, ys, tf.constant(full, tf.int32))
    if rest:
        step((x[full * batch_size:], y[full * batch_size:]))
    return {k: float(v) for k, v in model.get_metrics_result().items()}


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


def configure_threads(threads: int = 1, intra: int | None = None) -> None:
    """Limit TensorFlow's thread pools (inter-op to `threads`, intra-op to `intra`, default the same), so
    concurrent workers on few cores do not oversubscribe them."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads if intra is None else intra)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # already initialised in this process; the first setting stands
        pass
