"""A user's own training script: DataFrames in, model.fit, products out, SavedModels for TF Serving.

    python examples/fit.py                        # makes a small synthetic marketplace in example-run/
    python examples/fit.py --data DIR --out OUT   # your data: catalog + train + validation files (docs/data.md)
"""

import argparse
import os

import pandas as pd

import tf_q2e  # first: it makes TensorFlow use Keras 2 (tf-keras), which TensorFlow Recommenders needs
import tensorflow as tf  # noqa: E402
from tf_q2e.data import synth  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", help="a data set directory (default: a synthetic marketplace made in OUT/data)")
parser.add_argument("--out", default="example-run", help="where the model and the exports go")
parser.add_argument("--config", help="YAML config (default: the built-in defaults)")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--products", type=int, default=3000, help="synthetic catalogue size")
parser.add_argument("--impressions", type=int, default=40000, help="synthetic impressions")
args = parser.parse_args()

data = args.data or os.path.join(args.out, "data")
if args.data is None and not os.path.exists(os.path.join(data, "manifest.json")):
    synth.generate(data, products=args.products, impressions=args.impressions, seed=0)

# Impression rows from DataFrames (or tf_q2e.data.from_files / from_dir), checked like `q2e validate`.
config = tf_q2e.load_config(args.config, overrides=["train.global_batch_size=256"])
catalog = pd.read_parquet(os.path.join(data, "catalog.parquet"))
train = tf_q2e.data.from_pandas(pd.read_parquet(os.path.join(data, "train.parquet")), catalog)
valid = tf_q2e.data.from_pandas(pd.read_parquet(os.path.join(data, "validation.parquet")), catalog)
batch = config.train.global_batch_size

strategy = tf.distribute.MirroredStrategy()  # every GPU of the machine, or its CPU
with strategy.scope():
    model = tf_q2e.build_model(config, train)  # variables created from the data's schema
    model.compile(optimizer=tf_q2e.SparseAdam(config.train.learning_rate))
model.fit(
    train.shuffle(100_000, seed=0).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE),
    validation_data=valid.batch(batch),
    epochs=args.epochs,
    callbacks=[tf_q2e.EarlyStopping("val_engagement_auc", patience=2, restore_best_weights=True),
               tf.keras.callbacks.TensorBoard(os.path.join(args.out, "logs"))],
    verbose=2,
)
tf_q2e.save(model, os.path.join(args.out, "model"))  # tf_q2e.load(...) brings it back

# Products for queries: the catalogue embedded once, exact search (scann=True for ScaNN).
retriever = tf_q2e.Retriever.from_model(model, catalog)
queries = ["grey jute rug", "white laptop", "sofa 3-seater"]
context = {"query_country": "US"} if "query_country" in model.context_columns else None
for query, hits in zip(queries, retriever.search(queries, k=5, context=context)):
    print(query)
    for hit in hits:
        print(f"  {hit.product_id}  score {hit.score:.3f}  p(engaged) {hit.engagement_probability:.3f}  {hit.title}")

# SavedModels in TensorFlow Serving's layout: OUT/serving/q2e/<version> (stock ops) and q2e_scann.
exported = tf_q2e.export(retriever, os.path.join(args.out, "serving"))
print(f"exported version {exported['version']}: {', '.join(exported['models'].values())}")
