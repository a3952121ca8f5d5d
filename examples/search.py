"""Look products up in an exported model with stock TensorFlow alone (no tf_q2e, no tf-keras, no ScaNN).

    python examples/search.py example-run/serving/q2e "grey jute rug" "white laptop" [--k 5] [--country US]

The stock model (`q2e export`, `tf_q2e.export`) takes raw strings: its
`retrieval_exact` signature hashes the text, runs the query tower and scores
every product in the graph. TensorFlow Serving serves the same signature.
"""

import argparse
import os

import tensorflow as tf

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", help="an exported model directory (BASE/q2e) or one of its versions (BASE/q2e/1)")
parser.add_argument("queries", nargs="+")
parser.add_argument("--k", type=int, default=5)
parser.add_argument("--country", default="", help="query_country, when the model has that context input")
args = parser.parse_args()

path = args.model
if not os.path.exists(os.path.join(path, "saved_model.pb")):  # a model directory: its newest version
    path = os.path.join(path, str(max(int(v) for v in os.listdir(path) if v.isdigit())))
search = tf.saved_model.load(path).signatures["retrieval_exact"]
n = len(args.queries)
inputs = {name: tf.constant([args.country if name == "query_country" else ""] * n)
          for name in search.structured_input_signature[1] if name != "query"}
out = search(query=tf.constant(args.queries), **inputs)
for i, query in enumerate(args.queries):
    print(query)
    for j in range(min(args.k, out["product_ids"].shape[1])):
        product_id = out["product_ids"][i, j].numpy().decode()
        if product_id:  # "" marks a place the index could not fill
            print(f"  {product_id}  score {float(out['scores'][i, j]):.3f}  "
                  f"p(engaged) {float(out['engagement_probability'][i, j]):.3f}  {out['product_titles'][i, j].numpy().decode()}")
