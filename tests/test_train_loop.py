"""models.train: the client's training loop runs Keras's own steps on seeded batches, fed as arrays."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("train_loop")]

SHAPE = (12,)


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random examples of SHAPE with labels of 10 classes."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n,) + SHAPE).astype("float32"), rng.integers(0, 10, n).astype("int64")


def model(jit: bool, steps: int):
    """A fresh NN on SHAPE, compiled as the client compiles it."""
    from fedkeeper import models

    return models.build("nn", SHAPE, 10, jit_compile=jit, steps_per_execution=steps)


def keras_fit_on(m, x, y, batch: int, epochs: int, seed: int) -> dict:
    """Keras's own fit, one epoch at a time, over the batches `train` would visit; returns the last history."""
    import tensorflow as tf

    from fedkeeper import models

    spec = (tf.TensorSpec((None,) + SHAPE, tf.float32), tf.TensorSpec((None,), tf.int64))
    hist = None
    for order in models.epoch_orders(len(x), epochs, seed):
        batches = [(x[order[i:i + batch]], y[order[i:i + batch]]) for i in range(0, len(x), batch)]
        ds = tf.data.Dataset.from_generator(lambda b=batches: iter(b), output_signature=spec)
        hist = m.fit(ds, epochs=1, verbose=0)
    return {k: float(v[-1]) for k, v in hist.history.items()}


@pytest.mark.parametrize("jit,steps,n", [(False, 32, 503), (True, 32, 503), (False, 4, 40), (True, 1, 27)])
def test_train_runs_the_same_steps_as_keras_fit_on_the_same_batches(jit, steps, n):
    # Prepare: two copies of one model; n not a multiple of the batch, and batches not a multiple of the
    # steps per call, so the padded last chunk and the short tail batch both run.
    from fedkeeper import models

    x, y = data(n)
    ours, theirs = model(jit, steps), model(jit, steps)
    models.set_weights(theirs, models.get_weights(ours))

    # Execute
    logs = models.train(ours, x, y, 10, 3, seed=5)
    expected = keras_fit_on(theirs, x, y, 10, 3, seed=5)

    # Assert: the same weights bit for bit, the same step count, the same last-epoch metrics.
    a, b = models.get_weights(ours), models.get_weights(theirs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert int(ours.optimizer.iterations.numpy()) == 3 * -(-n // 10)
    assert logs == pytest.approx(expected, rel=1e-6)


def test_the_same_seed_gives_the_same_update_in_a_warm_model_and_a_cold_one():
    # Prepare: a warm model that has already trained on other data, and a fresh one, both at the same start.
    from fedkeeper import models

    x, y = data(95)
    warm, cold = model(True, 8), model(True, 8)
    start = models.get_weights(cold)
    models.train(warm, *data(50, seed=1), 10, 2, seed=9)

    # Execute
    models.set_weights(warm, start)
    models.reset_optimizer(warm)
    models.train(warm, x, y, 10, 2, seed=3)
    models.train(cold, x, y, 10, 2, seed=3)
    other = model(True, 8)
    models.set_weights(other, start)
    models.train(other, x, y, 10, 2, seed=4)

    # Assert: warm equals cold bit for bit; another seed visits another order and ends elsewhere.
    w, c, o = models.get_weights(warm), models.get_weights(cold), models.get_weights(other)
    assert all(np.array_equal(w[k], c[k]) for k in w)
    assert not all(np.array_equal(c[k], o[k]) for k in c)


def test_epoch_orders_are_seeded_permutations_fresh_each_epoch():
    from fedkeeper import models

    orders = models.epoch_orders(37, 4, seed=11)

    assert len(orders) == 4
    assert all(sorted(o.tolist()) == list(range(37)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert all(np.array_equal(a, b) for a, b in zip(orders, models.epoch_orders(37, 4, seed=11)))


def test_nothing_to_train_leaves_the_model_untouched_and_bad_input_is_refused():
    from fedkeeper import models

    m = model(False, 4)
    before = models.get_weights(m)

    assert models.train(m, *data(20), 10, 0, seed=1) == {}
    assert models.train(m, *data(0), 10, 2, seed=1) == {}
    after = models.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="batch_size"):
        models.train(m, *data(20), 0, 1, seed=1)
    x, y = data(20)
    with pytest.raises(ValueError, match="20 examples but 19 labels"):
        models.train(m, x, y[:19], 10, 1, seed=1)
    after = models.get_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_a_proximal_term_added_after_the_loop_was_traced_joins_the_loss():
    # Prepare: a model whose loop is traced without terms, then FedProx's term anchored at the start.
    from fedkeeper import client_terms, models

    x, y = data(60)
    plain, prox = model(True, 4), model(True, 4)
    start = models.get_weights(plain)
    models.set_weights(prox, start)
    models.train(prox, x, y, 10, 1, seed=2)  # traces the loop without the term
    models.set_weights(prox, start)
    models.reset_optimizer(prox)

    # Execute
    client_terms.before_fit(prox, {"proximal_mu": 50.0}, start)
    models.train(prox, x, y, 10, 2, seed=2)
    client_terms.after_fit(prox)
    models.train(plain, x, y, 10, 2, seed=2)

    # Assert: the strong pull to the start keeps the proximal update much nearer to it than the plain one.
    def dist(w: dict) -> float:
        return float(np.sqrt(sum(np.sum((w[k] - start[k]) ** 2) for k in start)))

    assert dist(models.get_weights(prox)) < 0.5 * dist(models.get_weights(plain))


def test_a_keras_without_its_symbolic_builder_still_trains_the_same_steps():
    # Prepare: two copies of a fresh model; one hides Keras's private builder, so train's fallback builds it.
    from fedkeeper import models

    x, y = data(45)
    usual, fallback = model(True, 4), model(True, 4)
    models.set_weights(fallback, models.get_weights(usual))
    fallback._symbolic_build = None

    # Execute
    models.train(usual, x, y, 10, 2, seed=1)
    models.train(fallback, x, y, 10, 2, seed=1)

    # Assert: the fallback's building step left no trace: same weights, same step count.
    a, b = models.get_weights(usual), models.get_weights(fallback)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert int(fallback.optimizer.iterations.numpy()) == int(usual.optimizer.iterations.numpy()) == 10
