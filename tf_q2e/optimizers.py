"""Optimizers whose updates of embedding tables cost O(rows touched), not O(table).

The hashed n-gram tables (2^18 x 64 each) get `tf.IndexedSlices` gradients: a
batch of 768 touches at most ~30k of the 262k rows. tf-keras's `Adam` still decays the *whole*
`m` and `v` slots and rewrites the whole table every step (see its docstring:
"the sparse behavior is equivalent to the dense behavior"), so a step costs
O(table). `SparseAdam` is the "lazy" Adam of TF1's `LazyAdamOptimizer` and
TF-Addons' `tfa.optimizers.LazyAdam`: it updates only the touched rows.

`SparseAdam` keeps `IndexedSlices` updates out of XLA. tf-keras optimizers
default to `jit_compile=True` when a GPU is present (on a CPU-only machine they
silently switch it off), and run each variable's update in a
`tf.function(jit_compile=True)`. The number of unique rows changes from batch to
batch, and XLA compiles one program per input shape: measured on CPU with
`jit_compile` forced on, every new row count cost a 50-100 ms recompilation,
against ~1 ms for a cached shape. Dense gradients still go through XLA.
(`model.compile(jit_compile=True)` compiles the whole train step, optimizer
included, which Keras controls; with these optimizers it trains on CPU.)

The class overrides two private tf-keras hooks, `_update_step_xla` and
`_deduplicate_sparse_grad` (tf-keras 2.20). If a later tf-keras renames them,
the overrides go dead and the behaviour falls back to tf-keras's (XLA for
sparse updates; repeated rows summed twice, which is still correct).
"""

from __future__ import annotations

import math

import tensorflow as tf

__all__ = ["SparseAdam", "sum_duplicate_rows"]


def sum_duplicate_rows(gradient: tf.IndexedSlices) -> tf.IndexedSlices:
    """Returns `gradient` with unique indices, the values of repeated indices summed.

    A row gathered twice in the forward pass appears twice in the gradient; its
    true gradient is the sum. Gather/update/scatter with repeated indices would
    instead keep one arbitrary copy.

    Args:
        gradient: values `[N, D...]`, indices `[N]`.

    Returns:
        values `[U, D...]`, indices `[U]` (U unique indices, first-seen order).
    """
    unique_indices, positions = tf.unique(gradient.indices)  # [U], [N]
    summed = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(unique_indices)[0])
    return tf.IndexedSlices(summed, unique_indices, gradient.dense_shape)


def _scatter_sub_unique(variable, rows, delta):
    """`variable[rows] -= delta` for unique `rows`, as gather, subtract, `scatter_update`.

    Same float32 arithmetic as `variable.scatter_sub`, but faster on CPU (TF 2.20:
    `benchmarks/optimizer_speed.py`). Correct only because `rows` are unique.
    """
    return variable.scatter_update(tf.IndexedSlices(tf.gather(variable, rows) - delta, rows))


class _SparseUpdatesOutsideXla:
    """Mixin for a tf-keras optimizer: `IndexedSlices` updates never run under XLA.

    tf-keras calls `_update_step_xla(grad, var, key)` for every variable when
    `self.jit_compile` is set (single device and `tf.distribute`). Dense
    gradients keep that XLA path; `IndexedSlices` take the plain
    `_update_step`, so a varying number of touched rows does not recompile.
    """

    def _update_step_xla(self, gradient, variable, key):
        if isinstance(gradient, tf.IndexedSlices):
            return self._update_step(gradient, variable)
        return self._dense_update_step_xla(gradient, variable, key)

    @tf.function(jit_compile=True)
    def _dense_update_step_xla(self, gradient, variable, key):
        """XLA-compiled update of one variable; `key` (an int) keeps one trace per variable."""
        del key
        return self._update_step(gradient, variable)


class _Scales:
    """A plain holder of `{variable key: learning-rate multiplier}` (an attribute of a tracked type would
    make a tf-keras optimizer wrap the dict and try to checkpoint it)."""

    def __init__(self):
        self.by_key: dict = {}


@tf.keras.utils.register_keras_serializable(package="tf_q2e")
class SparseAdam(_SparseUpdatesOutsideXla, tf.keras.optimizers.Adam):
    r"""Adam with lazy, row-sparse updates for `tf.IndexedSlices` gradients.

    Dense gradients take tf-keras's `Adam.update_step` unchanged (same numbers,
    bit for bit). For an `IndexedSlices` gradient — from `tf.gather`,
    `tf.nn.embedding_lookup` or `tf.keras.layers.Embedding` — only the rows R_t
    that the batch touched are read and written. At global step
    `t = iterations + 1`, with `g_r` the gradient of row r (repeated indices
    summed):

        for r in R_t:
            m_r <- m_r + (g_r - m_r) (1 - beta_1)       # = beta_1 m_r + (1 - beta_1) g_r
            v_r <- v_r + (g_r^2 - v_r) (1 - beta_2)
            v^_r <- max(v^_r, v_r)                      # amsgrad only; then v_r := v^_r below
            theta_r <- theta_r - alpha_t m_r / (sqrt(v_r) + eps_t)
        for r not in R_t: theta_r, m_r, v_r (and v^_r) are left as they are

        alpha_t = learning_rate sqrt(1 - beta_2^t) / (1 - beta_1^t)
        eps_t   = epsilon, or epsilon sqrt(1 - beta_2^t) with adaptive_epsilon

    The bias correction uses the global step t, as dense Adam does, not a
    per-row count. A step costs O(|R_t| D) instead of O(rows D).

    How this differs from dense Adam (on purpose): dense Adam decays `m` and `v`
    of every row each step and keeps moving rows that the batch did not touch
    (by `alpha_t m_r / (sqrt(v_r) + eps)`, with `m_r` shrinking by `beta_1` per
    step). Here an untouched row does not move and its moments do not decay
    until it is next touched. This is the semantics of TF1
    `tf.contrib.opt.LazyAdamOptimizer`, TF-Addons `tfa.optimizers.LazyAdam`
    and PyTorch `torch.optim.SparseAdam`. In TF-Addons' words, it "can provide
    large improvements in model training throughput for some applications.
    However, it provides slightly different semantics than the original Adam
    algorithm, and may lead to different empirical results." If every row is
    touched every step, the result equals dense Adam (bit for bit).

    Notes:
        * Repeated indices in one `IndexedSlices` are summed
          (`sum_duplicate_rows`). tf-keras's `apply_gradients` already does
          this; `SparseAdam` does it once, in `update_step`, so a direct call of
          `update_step` is correct too.
        * `jit_compile` applies to dense gradients only (see the module
          docstring); `IndexedSlices` updates always run without XLA.
        * Under `tf.distribute`, tf-keras all-reduces an `IndexedSlices`
          gradient by concatenating the replicas' slices; the repeated rows are
          summed here, so N replicas give the same update as one device.
        * `weight_decay` and `use_ema` remain tf-keras's dense operations over
          every variable (O(table)); leave them off for the tables, or exclude
          the tables with `exclude_from_weight_decay`.
        * Slots (`m`, `v`, `vhat`) are the same variables as `Adam`'s, so
          checkpoints of `Adam` and `SparseAdam` are interchangeable.
        * `scale_learning_rate(variables, r)` gives some variables r × the
          learning rate (a fine-tuned pretrained encoder's smaller rate:
          Que2Search trained its transformers at 2e-4 beside 7e-4). Under
          Adam, scaling their gradient would not do it: the step is invariant
          to the gradient's scale. Not part of `get_config`: set it again
          after loading an optimizer.

    Args:
        Same as `tf.keras.optimizers.Adam`; `name` defaults to "SparseAdam".

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2014.
        TF-Addons `LazyAdam`:
        https://www.tensorflow.org/addons/api_docs/python/tfa/optimizers/LazyAdam
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="SparseAdam", **kwargs):
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, name=name, **kwargs
        )
        self._learning_rate_scales = _Scales()

    def scale_learning_rate(self, variables, multiplier: float) -> None:
        """Updates each of `variables` with `multiplier` x the learning rate from now on (1 restores it).

        Raises:
            ValueError: `multiplier` is not a finite number above 0.
        """
        multiplier = float(multiplier)
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"SparseAdam.scale_learning_rate: the multiplier ({multiplier}) must be a number above 0")
        for variable in variables:
            self._learning_rate_scales.by_key[self._var_key(variable)] = multiplier

    def learning_rate_scale(self, variable) -> float:
        """The multiplier of the learning rate for `variable` (1 unless `scale_learning_rate` set one)."""
        return self._learning_rate_scales.by_key.get(self._var_key(variable), 1.0)

    def _deduplicate_sparse_grad(self, grads):
        # `update_step` sums repeated rows itself; doing it here as well would
        # run `tf.unique` twice per table and step.
        return list(grads)

    def update_step(self, gradient, variable):
        """Updates `variable` from `gradient`: lazily for `IndexedSlices`, as `Adam` otherwise."""
        scale = self.learning_rate_scale(variable)
        if isinstance(gradient, tf.IndexedSlices):
            return self._sparse_update_step(sum_duplicate_rows(gradient), variable, scale)
        if scale == 1.0:
            return super().update_step(gradient, variable)
        return self._scaled_dense_update_step(gradient, variable, scale)

    def _scaled_dense_update_step(self, gradient, variable, scale: float):
        """`Adam.update_step`'s dense branch with `scale` x the learning rate."""
        dtype = variable.dtype
        alpha, epsilon_hat = self._alpha_epsilon(dtype, scale)
        slot = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[slot], self._velocities[slot]
        m.assign_add((gradient - m) * (1 - self.beta_1))
        v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
        if self.amsgrad:
            v_hat = self._velocity_hats[slot]
            v_hat.assign(tf.maximum(v_hat, v))
            v = v_hat
        return variable.assign_sub((m * alpha) / (tf.sqrt(v) + epsilon_hat))

    def _alpha_epsilon(self, dtype, scale: float = 1.0):
        """Adam's step size alpha_t (times `scale`) and epsilon_t at the current step."""
        lr = tf.cast(self.learning_rate, dtype)
        if scale != 1.0:
            lr = lr * scale
        local_step = tf.cast(self.iterations + 1, dtype)
        # The same expressions as `Adam.update_step` (e.g. `1 - self.beta_1` in
        # Python, not in float32), so a gradient touching every row gives
        # dense Adam's numbers bit for bit.
        beta_1_power = tf.pow(tf.cast(self.beta_1, dtype), local_step)
        beta_2_power = tf.pow(tf.cast(self.beta_2, dtype), local_step)
        alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        epsilon_hat = self.epsilon * tf.sqrt(1 - beta_2_power) if self.adaptive_epsilon else self.epsilon
        return alpha, epsilon_hat

    def _sparse_update_step(self, gradient: tf.IndexedSlices, variable, scale: float = 1.0):
        dtype = variable.dtype
        alpha, epsilon_hat = self._alpha_epsilon(dtype, scale)
        slot = self._index_dict[self._var_key(variable)]
        m = self._momentums[slot]
        v = self._velocities[slot]
        rows = gradient.indices  # [U]
        grad = tf.cast(gradient.values, dtype)  # [U, D...]

        m_rows = tf.gather(m, rows)  # [U, D...]
        m_rows = m_rows + (grad - m_rows) * (1 - self.beta_1)
        v_rows = tf.gather(v, rows)
        v_rows = v_rows + (tf.square(grad) - v_rows) * (1 - self.beta_2)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        if self.amsgrad:
            v_hat = self._velocity_hats[slot]
            v_rows = tf.maximum(tf.gather(v_hat, rows), v_rows)
            v_hat.scatter_update(tf.IndexedSlices(v_rows, rows))
        step = (m_rows * alpha) / (tf.sqrt(v_rows) + epsilon_hat)  # [U, D...]
        return _scatter_sub_unique(variable, rows, step)

    def get_config(self):
        config = super().get_config()
        # tf-keras's Adam.get_config drops `adaptive_epsilon`.
        config["adaptive_epsilon"] = self.adaptive_epsilon
        return config
