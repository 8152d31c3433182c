"""models.evaluate: Keras's own test step over the batches in graph calls, and the freed memory a worker returns."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_loop")]

SHAPE = (12,)


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random examples of SHAPE with labels of 10 classes."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + SHAPE).astype("float32"), rng.integers(0, 10, n).astype("int64")


def model(jit: bool = False):
    """A fresh NN on SHAPE, compiled as the client compiles it."""
    from fedkeeper import models

    return models.build("nn", SHAPE, 10, jit_compile=jit, steps_per_execution=32)


@pytest.mark.parametrize("n,batch", [(503, 256), (512, 256), (100, 256), (7, 3), (1, 1)])
def test_evaluate_scores_as_keras_evaluate_does_bit_for_bit(n, batch):
    # Prepare: a trained model (so the scores are not those of random weights) and data whose size is a
    # multiple of the batch, not one, or smaller than one batch.
    from fedkeeper import models

    x, y = data(n, seed=n)
    m = model()
    models.train(m, *data(200, seed=1), batch_size=10, epochs=1, seed=3)

    # Execute
    ours = models.evaluate(m, x, y, batch_size=batch)
    theirs = m.evaluate(x, y, batch_size=batch, verbose=0, return_dict=True)

    # Assert
    assert set(ours) == {"loss", "accuracy"}
    assert ours == theirs


def test_a_model_compiled_with_xla_is_scored_by_the_plain_graph_step():
    # Prepare: the same weights in an XLA-compiled model and a plain one.
    from fedkeeper import models

    x, y = data(300, seed=4)
    jit, plain = model(jit=True), model()
    models.train(jit, *data(100, seed=2), batch_size=10, epochs=1, seed=0)
    models.set_weights(plain, models.get_weights(jit))

    # Execute
    ours = models.evaluate(jit, x, y)

    # Assert: what Keras's evaluate gives on the plain model, bit for bit.
    assert ours == plain.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)


def test_evaluate_on_a_fresh_model_builds_it_and_changes_no_weight():
    # Prepare: a model that never trained, and a copy of its weights.
    from fedkeeper import models

    x, y = data(50)
    m = model()
    before = models.get_weights(m)

    # Execute: twice, so the second call runs on a warm, traced loop.
    first = models.evaluate(m, x, y, batch_size=16)
    second = models.evaluate(m, x, y, batch_size=16)

    # Assert: the metrics were reset between calls (not accumulated), and no weight moved.
    assert first == second
    assert 0.0 <= first["accuracy"] <= 1.0 and np.isfinite(first["loss"])
    after = models.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_evaluate_refuses_bad_input_with_the_fix():
    from fedkeeper import models

    m = model()
    x, y = data(20)
    with pytest.raises(ValueError, match="at least 1"):
        models.evaluate(m, x, y, batch_size=0)
    with pytest.raises(ValueError, match="one label per example"):
        models.evaluate(m, x, y[:19])
    with pytest.raises(ValueError, match="no examples"):
        models.evaluate(m, x[:0], y[:0])


def test_freed_memory_is_released_after_a_new_trace_or_enough_growth(monkeypatch):
    # Prepare: a resident set the test sets; whatever earlier tests traced is released first.
    from fedkeeper import models

    rss = {"now": 500 * 2**20}
    monkeypatch.setattr(models, "_resident_bytes", lambda: rss["now"])
    models.release_freed_memory()
    m = model()
    x, y = data(40)

    # Execute / Assert: a first fit traces its loop, so a release runs; with nothing new and no growth it does not.
    models.train(m, x, y, batch_size=10, epochs=1, seed=0)
    assert models.release_freed_memory() is True
    assert models.release_freed_memory() is False
    models.train(m, x, y, batch_size=10, epochs=1, seed=1)  # warm: the same traced programs
    assert models.release_freed_memory() is False
    rss["now"] += models.RELEASE_GROWTH_BYTES - 1  # grown, but by less than the threshold
    assert models.release_freed_memory() is False
    rss["now"] += 1
    assert models.release_freed_memory() is True
    assert models.release_freed_memory() is False  # growth counts from the resident set after that release
    rss["now"] -= 100 * 2**20  # shrinking never triggers one
    assert models.release_freed_memory() is False
    models.evaluate(m, x, y)  # the test loop is new
    assert models.release_freed_memory() is True
    models.train(m, x[:35], y[:35], batch_size=10, epochs=1, seed=0)  # a tail batch of 5: a new shape
    assert models.release_freed_memory() is True


FRAGMENT_AND_RELEASE = """
import sys
from fedkeeper import models
def rss():
    return models._resident_bytes()
# Many heap blocks, every 64th kept alive: the freed ones cannot shrink the heap's top, only a release frees them.
blocks = [bytes(4000) for _ in range(20000)]
keep = blocks[::64]
before = rss()
del blocks
held = rss()
released = models.release_freed_memory(0)
print(before, held, rss(), int(released))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_a_release_gives_freed_heap_pages_back_to_the_os():
    # Prepare / Execute: a fresh interpreter (no TensorFlow needed) fragments its heap, frees most of it, releases.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRAGMENT_AND_RELEASE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, held, after, released = (int(v) for v in out.stdout.split())
    # Assert: freeing alone kept most of the ~80 MB resident; the release returned most of it.
    assert released == 1
    assert held > before - 40 * 2**20
    assert after < held - 40 * 2**20
