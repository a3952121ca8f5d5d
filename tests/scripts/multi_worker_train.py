"""Run by tests/test_multi_worker.py, once per worker (TF_CONFIG set): `q2e train ARGS...`, then a probe.

First runs `tf_q2e.cli.main(["train", ...])` — what the `q2e` console script
runs — unchanged, except that `tf_q2e.train.make_strategy` and
`tf_q2e.train.build_model` are wrapped to keep a reference to the strategy and
to the model that `train` builds and fits.

Then, with the cluster still up, every worker takes part in a probe of the
trained model's own contrastive task layer (`model.retrieval`, the
`ScaledSoftmaxRetrieval` that `compute_loss` called in every training step),
run under the same `MultiWorkerMirroredStrategy` with a global batch of
2 x ROWS rows, ROWS rows on each worker's replica:

* candidates: query and product vectors all zero and distinct product ids, so
  every logit is 0 and each row's loss is log(number of candidates it was
  scored against); exp(row loss) counts the candidates (8 with the gather
  across workers, 4 without);
* row losses of fixed random unit query and product vectors (row 0's product
  id repeated in the last row, on the other worker: an accidental hit that
  only a cross-worker comparison of ids can mask), computed (a) split over
  the workers, (b) by this process alone on all rows outside the strategy —
  the single-device loss of the global batch — and (c) split over the
  workers with a `cross_replica=False` copy of the layer (the guard: what no
  gather would give). Vectors rather than the towers' outputs, so the probe
  traces no tower (tracing is what costs time here); the layer is the one the
  towers fed in training.

Prints one line `PROBE {json}` on stdout and exits with `q2e train`'s code.
"""

import json
import sys

from tf_q2e import cli  # first: importing tf_q2e makes TensorFlow use Keras 2
import numpy as np
import tensorflow as tf
from tf_q2e import train as train_module
from tf_q2e.tasks import ScaledSoftmaxRetrieval

ROWS = 4  # per worker
captured = {}

_make_strategy, _build_model = train_module.make_strategy, train_module.build_model


def _capturing_make_strategy(config):
    captured["strategy"] = _make_strategy(config)
    return captured["strategy"]


def _capturing_build_model(*args, **kwargs):
    captured["model"] = _build_model(*args, **kwargs)
    return captured["model"]


train_module.make_strategy = _capturing_make_strategy
train_module.build_model = _capturing_build_model


def probe(strategy, model) -> dict:
    replicas = strategy.num_replicas_in_sync
    rows = ROWS * replicas
    dim = model.config.model.embedding_dim
    layer = model.retrieval
    no_gather = ScaledSoftmaxRetrieval(layer.scale, layer.remove_accidental_hits, cross_replica=False)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, rows, dim)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    batch = {
        "query": tf.constant(vectors[0]),
        "product": tf.constant(vectors[1]),
        "distinct_id": tf.constant([f"p{i}" for i in range(rows)]),
        # Row 0's product again on the last worker: an accidental hit only a cross-worker id comparison masks.
        "id": tf.constant(["a"] + [f"p{i}" for i in range(1, rows - 1)] + ["a"]),
    }

    def replica_losses(features):
        # tf.identity places the inputs on this replica's device, as the towers' outputs are in training
        # (all_gather of a tensor without a device fails: "destinations can not be empty").
        features = {name: tf.identity(value) for name, value in features.items()}
        zeros = tf.zeros_like(features["query"])
        return {
            "candidates": layer(zeros, zeros, product_ids=features["distinct_id"]).row_losses,
            "candidates_without_gather": no_gather(zeros, zeros, product_ids=features["distinct_id"]).row_losses,
            "row_losses_across_workers": layer(features["query"], features["product"], product_ids=features["id"]).row_losses,
            "row_losses_without_gather": no_gather(features["query"], features["product"],
                                                   product_ids=features["id"]).row_losses,
        }

    @tf.function
    def distributed(features):
        per_replica = strategy.run(replica_losses, args=(features,))
        return {name: strategy.gather(value, axis=0) for name, value in per_replica.items()}

    halves = strategy.experimental_distribute_values_from_function(
        lambda ctx: {k: v[ctx.replica_id_in_sync_group * ROWS:(ctx.replica_id_in_sync_group + 1) * ROWS]
                     for k, v in batch.items()})
    out = {name: value.numpy() for name, value in distributed(halves).items()}
    # One process, all rows, no replica context: the single-device loss of the global batch.
    reference = layer(batch["query"], batch["product"], product_ids=batch["id"]).row_losses.numpy()
    return {
        "replicas": replicas,
        "cross_replica": layer.cross_replica,
        "candidates": np.exp(out["candidates"]).tolist(),
        "candidates_without_gather": np.exp(out["candidates_without_gather"]).tolist(),
        "row_losses_across_workers": out["row_losses_across_workers"].tolist(),
        "row_losses_without_gather": out["row_losses_without_gather"].tolist(),
        "row_losses_one_process": reference.tolist(),
    }


if __name__ == "__main__":
    code = cli.main(sys.argv[1:])
    if code == 0:
        print("PROBE " + json.dumps(probe(captured["strategy"], captured["model"])), flush=True)
    sys.exit(code)
