"""Run by tests/test_replicas.py in a fresh process: one device vs two logical CPU replicas.

Builds the same Que2EngageModel twice (same weights), computes the loss and the
gradients of one global batch of 8 rows on one device and split over two
replicas (cross-replica negatives on), and prints both as JSON. With the
argument `mined`, each row also carries 2 mined negatives (`MINED`: two
padding slots, both in replica 1's half, so the replicas' filled counts
differ; two are the products of other rows).
"""

import json
import sys

import tf_q2e  # noqa: F401  (Keras 2 before TensorFlow)
import numpy as np
import tensorflow as tf

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

from tf_q2e.config import load_config  # noqa: E402
from tf_q2e.train import build_model  # noqa: E402

overrides = ["features.buckets=512", "features.category_buckets=64", "features.context_buckets=32", "model.hidden_dim=16",
             "model.embedding_dim=8", "model.text_embedding_dim=8"] + sys.argv[1:]
with_mined = "mined" in overrides
config = load_config(None, [o for o in overrides if o != "mined"])
batch = {
    "query": ["red sofa", "blue bike", "red sofa cheap", "lamp", "desk lamp", "bike", "sofa", "green lamp"],
    "query_country": ["US", "DE", "US", "FR", "US", "DE", "GB", "US"],
    "product_id": ["a", "b", "a", "c", "d", "b", "e", "f"],  # a and b repeat: accidental hits
    "product_title": ["Red sofa", "Blue bike", "Red sofa", "Lamp", "Desk lamp", "Blue bike", "Sofa", "Green lamp"],
    "product_description": ["comfy", "fast", "comfy", "", "bright", "fast", "old", "new"],
    "product_category": ["sofa", "bike", "sofa", "lamp", "lamp", "bike", "sofa", "lamp"],
    "engaged": [1, 0, -1, 1, 0, 0, 1, -1],
}
batch = {k: tf.constant(v) for k, v in batch.items()}
batch["product_image_embedding"] = tf.constant(np.random.default_rng(0).normal(size=(8, 3)).astype("float32"))
if with_mined:  # 2 per row, row-major: rows 0-3 own mined 0-7 (replica 0's half)
    from tf_q2e.data.mined import MINED

    ids = ["m1", "m2", "b", "m0", "m3", "m4", "m5", "a", "m6", "", "m7", "m8", "c", "", "m10", "m11"]  # 8 + 6 filled
    batch[MINED] = {"product_id": tf.constant(ids), "product_title": tf.constant([f"mined {i} sofa" for i in ids]),
                    "product_description": tf.constant([""] * 16), "product_category": tf.constant(["sofa"] * 16),
                    "product_image_embedding": tf.constant(np.random.default_rng(1).normal(size=(16, 3)).astype("float32"))}


def loss_and_gradients(model, features):
    with tf.GradientTape() as tape:
        loss = model.compute_loss(features, training=False)
    grads = tape.gradient(loss, model.trainable_variables)
    return loss, [tf.convert_to_tensor(g) for g in grads]


single = build_model(config, 3, ("query_country",))
loss1, grads1 = loss_and_gradients(single, batch)

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())
with strategy.scope():
    mirrored = build_model(config, 3, ("query_country",))
mirrored.set_weights(single.get_weights())
halves = strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.nest.map_structure(lambda v: v[ctx.replica_id_in_sync_group * len(v) // 2:
                                                 (ctx.replica_id_in_sync_group + 1) * len(v) // 2], batch)
)


@tf.function
def replicated(features):
    loss, grads = strategy.run(loss_and_gradients, args=(mirrored, features))
    return strategy.reduce("SUM", loss, None), [strategy.reduce("SUM", g, None) for g in grads]


loss2, grads2 = replicated(halves)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "loss_single": float(loss1),
    "loss_replicas": float(loss2),
    "max_gradient": max(float(tf.reduce_max(tf.abs(g))) for g in grads1),
    "max_gradient_difference": max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(grads1, grads2)),
}))
