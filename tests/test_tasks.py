"""The two losses against NumPy references on 4×4 examples."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_q2e.tasks import EngagementBCE, ScaledSoftmaxRetrieval


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(4)
    return _unit(rng.normal(size=(4, 3))).astype(np.float32), _unit(rng.normal(size=(4, 3))).astype(np.float32)


def _softmax_reference(q, d, scale, ids=None, log_q=None):
    logits = scale * q.astype(np.float64) @ d.T.astype(np.float64)
    if log_q is not None:
        logits = logits - log_q[None, :]
    n = len(q)
    if ids is not None:
        for i in range(n):
            for j in range(n):
                if j != i and ids[j] == ids[i]:
                    logits[i, j] = -np.inf
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    rows = -np.diag(log_softmax)
    return rows.mean(), rows, logits


def test_scaled_softmax_matches_numpy(vectors):
    q, d = vectors
    expected, rows, _ = _softmax_reference(q, d, 20.0)
    out = ScaledSoftmaxRetrieval(20.0, remove_accidental_hits=False)(q, d)
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(out.row_losses.numpy(), rows, rtol=1e-5, atol=2e-6)


def test_accidental_hits_are_masked(vectors):
    q, d = vectors
    ids = np.array([b"a", b"b", b"a", b"c"])
    expected, rows, _ = _softmax_reference(q, d, 20.0, ids=ids)
    unmasked, _, _ = _softmax_reference(q, d, 20.0)
    out = ScaledSoftmaxRetrieval(20.0)(q, d, product_ids=tf.constant(ids))
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5, atol=2e-6)
    assert abs(expected - unmasked) > 1e-3  # the mask changes the loss
    np.testing.assert_allclose(out.row_losses.numpy()[[1, 3]], rows[[1, 3]], rtol=1e-5, atol=2e-6)


def test_logq_correction_subtracts_log_frequency(vectors):
    q, d = vectors
    log_q = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    expected, _, _ = _softmax_reference(q, d, 20.0, log_q=log_q)
    out = ScaledSoftmaxRetrieval(20.0, remove_accidental_hits=False)(q, d, product_log_q=tf.constant(log_q))
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5, atol=2e-6)
    plain = ScaledSoftmaxRetrieval(20.0, remove_accidental_hits=False)(q, d)
    assert abs(out.loss.numpy() - plain.loss.numpy()) > 1e-3


def test_retrieval_docstring_example():
    eye = np.eye(2, dtype=np.float32)
    out = ScaledSoftmaxRetrieval(1.0, remove_accidental_hits=False)(eye, eye)
    np.testing.assert_allclose(out.loss.numpy(), 0.31326, atol=1e-5)


def test_in_batch_recall_at_1(vectors):
    q, _ = vectors
    d = q.copy()
    d[2] = -q[2]  # row 2's positive is now its worst candidate
    hits = ScaledSoftmaxRetrieval(20.0, remove_accidental_hits=False)(q, d).hits_at_1.numpy()
    _, _, logits = _softmax_reference(q, d, 20.0)
    np.testing.assert_array_equal(hits, (logits.argmax(1) == np.arange(4)).astype(np.float32))
    assert hits[2] == 0.0


def test_large_scale_does_not_overflow_in_float16(vectors):
    q, d = vectors
    out = ScaledSoftmaxRetrieval(1000.0)(tf.constant(q, tf.float16), tf.constant(d, tf.float16), product_ids=tf.constant([b"a", b"a", b"b", b"c"]))
    assert out.loss.dtype == tf.float32 and np.isfinite(out.loss.numpy())


def _extra_reference(q, d, e, scale, ids, extra_ids, valid):
    """Row losses of the softmax over [in-batch d | extra e] with padding and accidental hits masked."""
    logits = scale * np.concatenate([q @ d.T, q @ e.T], axis=1).astype(np.float64)
    n = len(q)
    for i in range(n):
        for j in range(n):
            if j != i and ids[j] == ids[i]:
                logits[i, j] = -np.inf
        for k in range(len(e)):
            if not valid[k] or extra_ids[k] == ids[i]:
                logits[i, n + k] = -np.inf
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return -log_softmax[np.arange(n), np.arange(n)], logits


def test_extra_negatives_are_masked_columns_of_every_rows_softmax(vectors):
    q, d = vectors
    e = _unit(np.random.default_rng(5).normal(size=(5, 3))).astype(np.float32)
    ids, extra_ids = np.array([b"a", b"b", b"c", b"d"]), np.array([b"x", b"b", b"y", b"", b"z"])
    valid = extra_ids != b""
    rows, logits = _extra_reference(q, d, e, 20.0, ids, extra_ids, valid)
    out = ScaledSoftmaxRetrieval(20.0)(q, d, product_ids=tf.constant(ids), extra_embeddings=e,
                                      extra_ids=tf.constant(extra_ids), extra_valid=tf.constant(valid))
    np.testing.assert_allclose(out.row_losses.numpy(), rows, rtol=1e-5, atol=2e-6)
    plain = ScaledSoftmaxRetrieval(20.0)(q, d, product_ids=tf.constant(ids))
    assert np.all(out.row_losses.numpy() > plain.row_losses.numpy())  # more negatives, higher loss
    # The padding slot and row 1's own product (extra "b") are masked: moving them changes nothing.
    moved = e.copy()
    moved[[1, 3]] = q[1]
    again = ScaledSoftmaxRetrieval(20.0)(q, d, product_ids=tf.constant(ids), extra_embeddings=moved,
                                        extra_ids=tf.constant(extra_ids), extra_valid=tf.constant(valid))
    np.testing.assert_allclose(again.row_losses.numpy()[1], rows[1], rtol=1e-5)
    # The in-batch recall@1 ignores the extra columns.
    np.testing.assert_array_equal(out.hits_at_1.numpy(), plain.hits_at_1.numpy())


def test_margin_loss_is_on_the_hardest_unmasked_negative(vectors):
    q, d = vectors
    e = _unit(np.random.default_rng(6).normal(size=(3, 3))).astype(np.float32)
    ids, extra_ids = np.array([b"a", b"a", b"c", b"d"]), np.array([b"x", b"c", b""])
    valid = extra_ids != b""
    out = ScaledSoftmaxRetrieval(20.0, margin=0.2)(q, d, product_ids=tf.constant(ids), extra_embeddings=e,
                                                  extra_ids=tf.constant(extra_ids), extra_valid=tf.constant(valid))
    _, logits = _extra_reference(q, d, e, 1.0, ids, extra_ids, valid)
    cosines = np.concatenate([q @ d.T, q @ e.T], axis=1)
    expected = []
    for i in range(4):
        negatives = [j for j in range(7) if j != i and np.isfinite(logits[i, j])]
        assert 4 + 2 not in negatives and (i != 2 or 4 + 1 not in negatives)  # padding; row 2's own "c"
        expected.append(max(0.0, 0.2 - cosines[i, i] + cosines[i, negatives].max()))
    np.testing.assert_allclose(out.margin_losses.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert max(expected) > 0


def _bce_reference(q, d, engaged, scale, bias=0.0):
    logits = scale * (q * d).sum(1) + bias
    labelled = engaged >= 0
    y = np.maximum(engaged, 0)
    rows = np.log1p(np.exp(-logits)) * y + np.log1p(np.exp(logits)) * (1 - y)
    return (rows * labelled).sum() / max(labelled.sum(), 1), logits


def test_engagement_bce_matches_numpy_and_masks_unlabelled(vectors):
    q, d = vectors
    engaged = np.array([1, 0, -1, 0])
    expected, logits = _bce_reference(q, d, engaged, 20.0)
    out = EngagementBCE(20.0)(q, d, tf.constant(engaged))
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(out.logits.numpy(), logits, rtol=1e-5, atol=2e-6)
    assert out.row_losses.numpy()[2] == 0.0 and out.labelled.numpy().tolist() == [1, 1, 0, 1]


def test_engagement_bce_docstring_example():
    q = np.array([[1, 0], [1, 0], [1, 0]], dtype=np.float32)
    d = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    out = EngagementBCE(1.0)(q, d, tf.constant([1, 0, -1]))
    np.testing.assert_allclose(out.loss.numpy(), 0.50320, atol=1e-5)


def test_engagement_bce_learned_bias_shifts_logits_and_gets_a_gradient(vectors):
    q, d = vectors
    layer = EngagementBCE(20.0, learned_bias=True)
    engaged = tf.constant([1, 0, 0, 0])
    layer(q, d, engaged)
    layer.bias.assign(-3.0 / layer.bias_lr_multiplier)  # b = m · the variable
    expected, _ = _bce_reference(q, d, engaged.numpy(), 20.0, bias=-3.0)
    with tf.GradientTape() as tape:
        out = layer(q, d, engaged)
    np.testing.assert_allclose(out.loss.numpy(), expected, rtol=1e-5, atol=2e-6)
    assert tape.gradient(out.loss, layer.bias).numpy() != 0.0


def test_all_unlabelled_batch_gives_zero_bce(vectors):
    q, d = vectors
    assert EngagementBCE(20.0)(q, d, tf.constant([-1, -1, -1, -1])).loss.numpy() == 0.0
