"""Tests of `tf_q2e.optimizers`: lazy (row-sparse) Adam.

Expected numbers come from a NumPy lazy-Adam reference written here. The
2-replica test runs in a subprocess, because logical CPU devices must be
configured before TensorFlow runs its first op in a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import tf_q2e  # noqa: F401  (Keras 2 before TensorFlow)

import numpy as np
import pytest
import tensorflow as tf

from tf_q2e.optimizers import SparseAdam, sum_duplicate_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, BETA_1, BETA_2, EPS = 0.1, 0.9, 0.999, 1e-7


def numpy_lazy_adam(theta, m, v, step, rows, grad, lr=LR, b1=BETA_1, b2=BETA_2, eps=EPS):
    """One lazy-Adam step in float64 on `rows` (unique) with gradient `grad` [len(rows), D]; returns new arrays."""
    theta, m, v = theta.copy(), m.copy(), v.copy()
    m[rows] = b1 * m[rows] + (1 - b1) * grad
    v[rows] = b2 * v[rows] + (1 - b2) * grad**2
    alpha = lr * np.sqrt(1 - b2**step) / (1 - b1**step)
    theta[rows] -= alpha * m[rows] / (np.sqrt(v[rows]) + eps)
    return theta, m, v


def slots(optimizer, variable):
    """(m, v) of `variable` as NumPy arrays."""
    index = optimizer._index_dict[optimizer._var_key(variable)]
    return optimizer._momentums[index].numpy(), optimizer._velocities[index].numpy()


def table(rows=6, dim=3, seed=0):
    return np.random.RandomState(seed).randn(rows, dim).astype(np.float32)


# Three steps, a different set of rows each step; row 5 is never touched.
SPARSE_STEPS = [([0, 2], 1), ([2, 3, 4], 2), ([1, 0], 3)]


def sparse_grad(rows, seed, dim=3):
    return np.random.RandomState(100 + seed).randn(len(rows), dim).astype(np.float32)


# --- dense path -------------------------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
def test_dense_gradient_equals_keras_adam_bit_for_bit(jit_compile):
    keras_var, sparse_var = tf.Variable(table()), tf.Variable(table())
    keras_adam, sparse_adam = tf.keras.optimizers.Adam(LR), SparseAdam(LR)
    keras_adam.jit_compile = sparse_adam.jit_compile = jit_compile  # tf-keras turns it off on CPU; force it
    for step in range(3):
        grad = tf.constant(table(seed=10 + step))
        keras_adam.apply_gradients([(grad, keras_var)])
        sparse_adam.apply_gradients([(grad, sparse_var)])
    np.testing.assert_array_equal(sparse_var.numpy(), keras_var.numpy())
    for ours, theirs in zip(slots(sparse_adam, sparse_var), slots(keras_adam, keras_var)):
        np.testing.assert_array_equal(ours, theirs)
    assert not np.allclose(sparse_var.numpy(), table())  # the variable did move


@pytest.mark.parametrize("sparse", [False, True])
def test_a_scaled_learning_rate_moves_those_variables_by_that_fraction_of_adams_step(sparse):
    plain, scaled, other = tf.Variable(table()), tf.Variable(table()), tf.Variable(table())
    optimizer = SparseAdam(LR)
    optimizer.scale_learning_rate([scaled], 0.25)
    assert (optimizer.learning_rate_scale(scaled), optimizer.learning_rate_scale(plain)) == (0.25, 1.0)
    for step in range(3):
        grad = table(seed=10 + step)
        grad = tf.IndexedSlices(tf.constant(grad[:4]), tf.constant([0, 1, 2, 3])) if sparse else tf.constant(grad)
        optimizer.apply_gradients([(grad, plain), (grad, scaled), (grad, other)])
        # Adam's step is alpha m / (sqrt(v) + eps) whatever the gradient's scale; the multiplier scales alpha.
        np.testing.assert_allclose(scaled.numpy() - table(), 0.25 * (plain.numpy() - table()), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(other.numpy(), plain.numpy())
    for ours, theirs in zip(slots(optimizer, scaled), slots(optimizer, plain)):
        np.testing.assert_array_equal(ours, theirs)  # the moments do not depend on the rate
    assert not np.allclose(plain.numpy(), table())
    with pytest.raises(ValueError, match=r"multiplier \(0.0\) must be a number above 0"):
        optimizer.scale_learning_rate([plain], 0)


def test_sparse_gradient_on_every_row_equals_dense_adam():
    dense_var, sparse_var = tf.Variable(table()), tf.Variable(table())
    dense_adam, sparse_adam = tf.keras.optimizers.Adam(LR), SparseAdam(LR)
    for step in range(3):
        grad = table(seed=20 + step)
        dense_adam.apply_gradients([(tf.constant(grad), dense_var)])
        rows = np.array([5, 0, 3, 1, 4, 2])  # every row, shuffled
        sparse_adam.apply_gradients([(tf.IndexedSlices(tf.constant(grad[rows]), tf.constant(rows)), sparse_var)])
    np.testing.assert_array_equal(sparse_var.numpy(), dense_var.numpy())


# --- sparse path ------------------------------------------------------------------------------


@pytest.mark.parametrize("jit_compile", [False, True])
def test_sparse_gradient_follows_numpy_lazy_adam(jit_compile):
    variable = tf.Variable(table())
    optimizer = SparseAdam(LR)
    optimizer.jit_compile = jit_compile
    optimizer.build([variable])
    theta, m, v = table().astype(np.float64), np.zeros((6, 3)), np.zeros((6, 3))
    for rows, step in SPARSE_STEPS:
        grad = sparse_grad(rows, step)
        before = (variable.numpy(),) + slots(optimizer, variable)
        optimizer.apply_gradients([(tf.IndexedSlices(tf.constant(grad), tf.constant(rows)), variable)])
        theta, m, v = numpy_lazy_adam(theta, m, v, step, rows, grad.astype(np.float64))

        after = (variable.numpy(),) + slots(optimizer, variable)
        untouched = [r for r in range(6) if r not in rows]
        for old, new in zip(before, after):  # untouched rows and their m, v: bit for bit unchanged
            np.testing.assert_array_equal(new[untouched], np.asarray(old, np.float32)[untouched])
        np.testing.assert_allclose(after[0], theta, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(after[1], m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(after[2], v, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(variable.numpy()[5], table()[5])  # row 5 never touched, never moved
    assert int(optimizer.iterations.numpy()) == 3


def test_sparse_differs_from_dense_adam_on_untouched_rows():
    """The point of lazy Adam: dense Adam keeps moving a row by momentum after its gradient stops."""
    lazy_var, dense_var = tf.Variable(table()), tf.Variable(table())
    lazy, dense = SparseAdam(LR), tf.keras.optimizers.Adam(LR)
    for rows, step in SPARSE_STEPS:
        grad = tf.IndexedSlices(tf.constant(sparse_grad(rows, step)), tf.constant(rows))
        lazy.apply_gradients([(grad, lazy_var)])
        dense.apply_gradients([(grad, dense_var)])
    # Row 4 was touched at step 2 only: dense Adam moved it again at step 3, lazy Adam did not.
    assert not np.allclose(dense_var.numpy()[4], lazy_var.numpy()[4])


def test_duplicate_indices_are_summed():
    rows, values = [1, 4, 1, 1], table(rows=4, seed=30)
    summed_rows = [1, 4]
    summed = np.stack([values[0] + values[2] + values[3], values[1]])

    variable = tf.Variable(table())
    optimizer = SparseAdam(LR)
    optimizer.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(rows)), variable)])
    zeros = np.zeros((6, 3))
    theta, m, _ = numpy_lazy_adam(table().astype(np.float64), zeros, zeros, 1, summed_rows, summed)
    np.testing.assert_allclose(variable.numpy(), theta, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(slots(optimizer, variable)[0], m, rtol=1e-5, atol=1e-7)


def test_update_step_called_directly_sums_duplicates():
    variable = tf.Variable(table())
    optimizer = SparseAdam(LR)
    optimizer.build([variable])
    optimizer.update_step(tf.IndexedSlices(tf.constant([[1.0] * 3, [2.0] * 3]), tf.constant([2, 2])), variable)
    np.testing.assert_allclose(slots(optimizer, variable)[0][2], [(1 - BETA_1) * 3.0] * 3, rtol=1e-6)


def test_sum_duplicate_rows():
    summed = sum_duplicate_rows(tf.IndexedSlices(tf.constant([[1.0], [2.0], [4.0]]), tf.constant([7, 3, 7])))
    assert summed.indices.numpy().tolist() == [7, 3]
    assert summed.values.numpy().ravel().tolist() == [5.0, 2.0]


def test_amsgrad_sparse_keeps_running_max_of_touched_rows_only():
    variable = tf.Variable(table())
    optimizer = SparseAdam(LR, amsgrad=True)
    big, small = tf.constant([[10.0] * 3]), tf.constant([[0.1] * 3])
    optimizer.apply_gradients([(tf.IndexedSlices(big, tf.constant([1])), variable)])
    optimizer.apply_gradients([(tf.IndexedSlices(small, tf.constant([1])), variable)])
    v_hat = optimizer._velocity_hats[0].numpy()
    v = slots(optimizer, variable)[1]
    np.testing.assert_allclose(v_hat[1], [(1 - BETA_2) * 100.0] * 3, rtol=1e-5)  # step-1 value, the max
    assert v[1, 0] < v_hat[1, 0]
    np.testing.assert_array_equal(np.delete(v_hat, 1, axis=0), 0.0)


def test_jit_compile_keeps_sparse_updates_out_of_xla():
    """Dense variables get one XLA trace each; IndexedSlices (any row count) never reach XLA."""
    embedding, kernel = tf.Variable(table()), tf.Variable(table(rows=2))
    optimizer = SparseAdam(LR)
    optimizer.jit_compile = True
    for rows, step in SPARSE_STEPS:
        sparse = tf.IndexedSlices(tf.constant(sparse_grad(rows, step)), tf.constant(rows))
        optimizer.apply_gradients([(sparse, embedding), (tf.constant(table(rows=2, seed=step)), kernel)])
    assert optimizer._dense_update_step_xla.experimental_get_tracing_count() == 1


# --- training ---------------------------------------------------------------------------------


def embedding_model(rows=50, dim=4, dtype=None):
    """[B, L] int ids -> mean-pooled embedding -> Dense(1)."""
    return tf.keras.Sequential(
        [
            tf.keras.layers.Embedding(rows, dim, dtype=dtype),
            tf.keras.layers.GlobalAveragePooling1D(dtype=dtype),
            tf.keras.layers.Dense(1, dtype=dtype),
            tf.keras.layers.Activation("linear", dtype="float32"),
        ]
    )


def regression_data(n=64, length=5, used_rows=40):
    """Ids from [0, used_rows): rows used_rows.. of a 50-row table are never touched."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, used_rows, size=(n, length))
    target = (ids % 7).mean(axis=1, keepdims=True).astype(np.float32) - 3.0
    return ids, target


@pytest.mark.slow
def test_model_fit_decreases_loss():
    tf.keras.utils.set_random_seed(0)
    ids, target = regression_data()
    model = embedding_model()
    model.compile(SparseAdam(0.05), "mse")
    history = model.fit(ids, target, batch_size=16, epochs=5, shuffle=False, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]


@pytest.mark.slow
def test_loss_scale_optimizer_equals_unscaled_sparse_adam():
    """Float32 model: the loss scale 2^15 is exact, so the wrapped optimizer gives the same numbers."""
    ids, target = regression_data()
    weights = []
    for wrap in (False, True):
        tf.keras.utils.set_random_seed(0)
        model = embedding_model()
        optimizer = SparseAdam(0.05)
        model.compile(tf.keras.mixed_precision.LossScaleOptimizer(optimizer) if wrap else optimizer, "mse")
        model.fit(ids, target, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for unscaled, scaled in zip(*weights):
        np.testing.assert_allclose(scaled, unscaled, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_loss_scale_optimizer_trains_mixed_float16_embeddings():
    tf.keras.utils.set_random_seed(0)
    ids, target = regression_data()
    model = embedding_model(dtype="mixed_float16")
    optimizer = tf.keras.mixed_precision.LossScaleOptimizer(SparseAdam(0.05))
    model.compile(optimizer, "mse")
    start_table = model.layers[0].embeddings.numpy()
    history = model.fit(ids, target, batch_size=16, epochs=5, shuffle=False, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    table_after = model.layers[0].embeddings.numpy()
    assert table_after.dtype == np.float32
    unseen = sorted(set(range(50)) - set(ids.ravel().tolist()))
    assert len(unseen) >= 10
    np.testing.assert_array_equal(table_after[unseen], start_table[unseen])


# --- checkpoints and config -------------------------------------------------------------------


def test_checkpoint_round_trip_restores_slots(tmp_path):
    def train(variable, optimizer, steps):
        for rows, step in steps:
            grad = tf.IndexedSlices(tf.constant(sparse_grad(rows, step)), tf.constant(rows))
            optimizer.apply_gradients([(grad, variable)])

    variable, optimizer = tf.Variable(table()), SparseAdam(LR)
    train(variable, optimizer, SPARSE_STEPS[:2])
    path = tf.train.Checkpoint(table=variable, optimizer=optimizer).save(str(tmp_path / "ckpt"))

    restored_var, restored_opt = tf.Variable(tf.zeros([6, 3])), SparseAdam(LR)
    tf.train.Checkpoint(table=restored_var, optimizer=restored_opt).restore(path).assert_existing_objects_matched()
    restored_opt.build([restored_var])  # slots are restored when they are created
    assert int(restored_opt.iterations.numpy()) == 2
    for ours, saved in zip(slots(restored_opt, restored_var), slots(optimizer, variable)):
        assert np.any(saved != 0)
        np.testing.assert_array_equal(ours, saved)

    train(variable, optimizer, SPARSE_STEPS[2:])
    train(restored_var, restored_opt, SPARSE_STEPS[2:])
    np.testing.assert_array_equal(restored_var.numpy(), variable.numpy())


def test_keras_adam_checkpoint_restores_into_sparse_adam(tmp_path):
    variable, adam = tf.Variable(table()), tf.keras.optimizers.Adam(LR)
    adam.apply_gradients([(tf.constant(table(seed=40)), variable)])
    path = tf.train.Checkpoint(table=variable, optimizer=adam).save(str(tmp_path / "ckpt"))
    restored_var, sparse = tf.Variable(tf.zeros([6, 3])), SparseAdam(LR)
    tf.train.Checkpoint(table=restored_var, optimizer=sparse).restore(path).assert_existing_objects_matched()
    sparse.build([restored_var])
    for ours, saved in zip(slots(sparse, restored_var), slots(adam, variable)):
        np.testing.assert_array_equal(ours, saved)


def test_get_config_from_config_round_trip():
    optimizer = SparseAdam(7e-4, beta_1=0.8, beta_2=0.99, epsilon=1e-6, amsgrad=True, adaptive_epsilon=True)
    config = optimizer.get_config()
    clone = SparseAdam.from_config(config)
    assert isinstance(clone, SparseAdam)
    assert clone.get_config() == config
    assert (clone.beta_1, clone.beta_2, clone.epsilon, clone.amsgrad, clone.adaptive_epsilon) == (
        0.8, 0.99, 1e-6, True, True,
    )
    assert clone.name == "SparseAdam"
    np.testing.assert_allclose(float(clone.learning_rate), 7e-4, rtol=1e-6)


def test_keras_serialize_deserialize_finds_registered_class():
    restored = tf.keras.optimizers.deserialize(tf.keras.optimizers.serialize(SparseAdam(0.01)))
    assert type(restored) is SparseAdam


# --- 2 replicas vs 1 device (subprocess) -------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tf_q2e
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tf_q2e.optimizers import SparseAdam

    rng = np.random.RandomState(0)
    # 32 rows of 4 ids from 20: ids repeat within a row, within a replica's half and across halves.
    ids = rng.randint(0, 20, size=(32, 4))
    target = rng.randn(32, 1).astype(np.float32)
    init = [rng.randn(20, 3).astype(np.float32), rng.randn(3, 1).astype(np.float32), np.zeros(1, np.float32)]

    def train(strategy, jit_compile=False, dense_scale=1.0):
        with strategy.scope():
            model = tf.keras.Sequential([
                tf.keras.layers.Embedding(20, 3), tf.keras.layers.GlobalAveragePooling1D(), tf.keras.layers.Dense(1)])
            model.build([None, 4])
            model.set_weights(init)
            optimizer = SparseAdam(0.05)
            optimizer.jit_compile = jit_compile  # tf-keras turns it off on CPU; force it
            optimizer.scale_learning_rate(model.layers[2].trainable_variables, dense_scale)
            model.compile(optimizer, "mse")
        data = tf.data.Dataset.from_tensor_slices((ids, target)).batch(8)  # global batch 8
        model.fit(data, epochs=2, verbose=0)
        index = optimizer._index_dict[optimizer._var_key(model.layers[0].embeddings)]
        slot = optimizer._momentums[index]
        return model.get_weights() + [slot.numpy()], strategy.num_replicas_in_sync

    one, n1 = train(tf.distribute.get_strategy())
    two, n2 = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    two_xla, _ = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), jit_compile=True)
    # A learning-rate multiplier registered on the mirrored variables reaches their per-replica updates.
    one_scaled, _ = train(tf.distribute.get_strategy(), dense_scale=0.25)
    two_scaled, _ = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), dense_scale=0.25)
    print(json.dumps({
        "max_abs_diff_scaled": max(float(np.abs(a - b).max()) for a, b in zip(one_scaled, two_scaled)),
        "scale_changed_dense": float(np.abs(one_scaled[1] - one[1]).max()),
        "replicas": [n1, n2],
        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(one, two)),
        "max_abs_diff_xla": max(float(np.abs(a - b).max()) for a, b in zip(one, two_xla)),
        "moved": float(np.abs(one[0] - init[0]).max()),
    }))
    """
)


@pytest.mark.slow
def test_mirrored_two_replicas_equal_one_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["replicas"] == [1, 2]
    assert report["moved"] > 1e-3
    assert report["max_abs_diff"] < 1e-5, report
    assert report["max_abs_diff_xla"] < 1e-5, report  # 2 replicas, dense updates under XLA
    assert report["scale_changed_dense"] > 1e-3, report
    assert report["max_abs_diff_scaled"] < 1e-5, report
