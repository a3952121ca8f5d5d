"""Listings added, changed and removed without a rebuild: incremental updates of a run's index.

`update_index(run_dir, upsert=FILE, delete=FILE)` (`q2e index --run RUN
--upsert delta.parquet --delete ids.txt`) embeds only the products of the delta
catalogue (new ids are added, known ids replaced), removes the deleted ids, and
writes `RUN/index/` again: the exact index (`vectors.npy`, `products.parquet`
with the filter attributes) and the ScaNN searcher. `q2e export` then writes a
new version from it, which the development server (and TensorFlow Serving)
picks up as any other.

How, with the pinned `scann` 1.4.2: only its pybind searcher
(`scann_ops_pybind`) has `upsert`, `delete` and `rebalance`; the TF-op searcher
that the SavedModels hold has none. Both are the same C++ searcher and
serialise the same assets (ScaNN config, partitioner, tokenization, AH
codebook and codes, float dataset), so the update goes

    TF state (RUN/index/scann) -> assets -> pybind searcher -> upsert, delete
    (-> rebalance) -> assets -> TF state -> RUN/index/scann

and searching the converted state gives the pybind searcher's results (tested).
The pybind searcher's own `serialize` writes its document ids as a Python
object dump (`scann_docids.pkl`) and `load_searcher` executes it back:
neither is called here (the package never unpickles: docs/security.md). The ids live in `products.parquet`, row i naming the
searcher's datapoint i (a deletion moves the last datapoint into the freed
slot, as the pybind searcher does).

Rebalancing: new products join the partition (leaf) whose centre is nearest,
and the centres were trained on the products of the build. At 1M products
ScaNN's own imbalance statistic barely moved over 20% churn (0.133 -> 0.130)
while queries about products of topics new since the build lost recall@100
(0.919 -> 0.906; 0.974 after a rebalance), so the rule counts churn instead:
`auto` rebalances a tree (retrains its partitions and codebook over the
current products: about the cost of building the searcher, without embedding)
once the products upserted and deleted since the partitions were trained
reach `REBALANCE_CHURN` (20%) of the index; `always` and `never` on request.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import tensorflow as tf

from tf_q2e.errors import InputError
from tf_q2e.index import INDEX_DIR, embed_catalog, load_index, write_index

# ScaNN's searcher state: the TF `ScannState` variables, in its constructor's order, and the asset file of each.
STATE_FIELDS = ("scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook", "hashed_dataset",
                "int8_dataset", "int8_multipliers", "dp_norms", "dataset")
ASSET_FILES = {"scann_config": "scann_config.pb", "serialized_partitioner": "serialized_partitioner.pb",
               "ah_codebook": "ah_codebook.pb", "datapoint_to_token": "datapoint_to_token.npy",
               "hashed_dataset": "hashed_dataset.npy", "int8_dataset": "int8_dataset.npy",
               "int8_multipliers": "int8_multipliers.npy", "dp_norms": "dp_norms.npy", "dataset": "dataset.npy"}
# The dtype of the empty scalar a state holds for an asset its searcher does not use (no partitioner without a
# tree, no AH data with brute force, no int8 data without int8 reordering).
ABSENT_DTYPES = {"scann_config": tf.string, "serialized_partitioner": tf.string, "ah_codebook": tf.string,
                 "datapoint_to_token": tf.int32, "hashed_dataset": tf.uint8, "int8_dataset": tf.int8,
                 "int8_multipliers": tf.float32, "dp_norms": tf.float32, "dataset": tf.float32}
REBALANCE_CHURN = 0.2
REBALANCE_CHOICES = ("auto", "always", "never")


def state_to_assets(state: tf.Module, directory: str) -> None:
    """Writes a TF `ScannState`'s tensors as the asset files the pybind searcher loads (`scann_assets.pbtxt`
    included). A state leaves an asset it does not use as a scalar: no file."""
    from scann.scann_ops.py.scann_ops_pybind_backcompat import populate_and_save_assets_proto

    for field in STATE_FIELDS:
        value = getattr(state, field).numpy()
        if np.ndim(value) == 0:
            continue
        path = os.path.join(directory, ASSET_FILES[field])
        if field in ("scann_config", "serialized_partitioner", "ah_codebook"):
            with open(path, "wb") as f:
                f.write(value[0])
        else:
            np.save(path, value, allow_pickle=False)
    populate_and_save_assets_proto(directory)


def assets_to_state(directory: str) -> tf.Module:
    """A TF `ScannState` of the asset files in `directory` (a state's absent asset is an empty scalar)."""
    from scann.scann_ops.py import scann_ops

    tensors = []
    for field in STATE_FIELDS:
        path = os.path.join(directory, ASSET_FILES[field])
        if not os.path.exists(path):
            tensors.append(tf.zeros([], ABSENT_DTYPES[field]))
        elif path.endswith(".pb"):
            with open(path, "rb") as f:
                tensors.append(tf.constant([f.read()]))
        else:
            tensors.append(tf.constant(np.load(path, allow_pickle=False)))
    return scann_ops.ScannState(tensors)


def pybind_searcher(state: tf.Module, docids: list[str]):
    """ScaNN's pybind searcher (it has `upsert`, `delete`, `rebalance`) of a TF state, datapoint i named
    `docids[i]` (kept in memory only)."""
    from scann.scann_ops.py import scann_ops_pybind

    with tempfile.TemporaryDirectory(prefix="q2e-scann-") as directory:
        state_to_assets(state, directory)
        with open(os.path.join(directory, "scann_assets.pbtxt"), encoding="utf-8") as f:
            native = scann_ops_pybind.scann_pybind.ScannNumpy(directory, f.read())
    return scann_ops_pybind.ScannSearcher(native, docids=list(docids))


class _State:
    """What `write_index` needs of a searcher: its TF state."""

    def __init__(self, state: tf.Module):
        self.state = state

    def serialize_to_module(self) -> tf.Module:
        return self.state


def searcher_state(searcher) -> tf.Module:
    """The TF `ScannState` of a pybind searcher (through its asset files; never its pickled document ids)."""
    with tempfile.TemporaryDirectory(prefix="q2e-scann-") as directory:
        searcher.searcher.serialize(directory, False)  # the native searcher's own: no scann_docids.pkl
        return assets_to_state(directory)


def read_ids(path: str) -> list[str]:
    """The product ids of a text file, one per line (blank lines skipped)."""
    if not os.path.exists(path):
        raise InputError(f"--delete {path}: the file does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def update_index(run_dir: str, upsert: str | None = None, delete: str | list[str] | None = None,
                 rebalance: str = "auto", log=None) -> dict:
    """Adds or replaces the products of the catalogue file `upsert` and removes the ids of `delete` (a file
    of one id per line, or a list) in `RUN/index/`, embedding only the upserted products.

    Returns the index metadata, whose `updates` list gains this update's counts and timings
    (`churn_since_rebalance` counts the products changed since the partitions were trained).
    """
    from tf_q2e.train import load_model

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if rebalance not in REBALANCE_CHOICES:
        raise InputError(f"--rebalance {rebalance!r}: choose {', '.join(REBALANCE_CHOICES)}")
    if upsert is None and delete is None:
        raise InputError("an index update needs --upsert FILE or --delete FILE")
    start = time.perf_counter()
    index = load_index(run_dir)
    deleted = (read_ids(delete) if isinstance(delete, (str, os.PathLike)) else list(delete)) if delete is not None else []
    row_of = {str(p): i for i, p in enumerate(index.product_ids)}
    unknown = [p for p in deleted if p not in row_of]
    deleted = list(dict.fromkeys(p for p in deleted if p in row_of))
    if unknown:
        log(f"{len(unknown)} id(s) to delete are not in the index (e.g. {unknown[0]!r}): nothing to remove for them")

    ids = np.zeros(0, dtype=object)
    vectors = np.zeros((0, index.vectors.shape[1]), np.float32)
    titles, attributes = ids, {}
    embed_seconds = 0.0
    if upsert is not None:
        model = load_model(run_dir)
        t = time.perf_counter()
        ids, titles, vectors, attributes = embed_catalog(model, upsert, model.config.index.batch_size,
                                                         model.config.data.on_bad_rows)
        embed_seconds = time.perf_counter() - t
        if vectors.shape[1] != index.vectors.shape[1]:
            raise InputError(f"--upsert {upsert}: vectors of {vectors.shape[1]} entries for an index of "
                             f"{index.vectors.shape[1]}")
        both = sorted(set(deleted) & {str(p) for p in ids})
        if both:
            raise InputError(f"product id {both[0]!r} is both upserted ({upsert}) and deleted; give it in one of them")
    ids = [str(p) for p in ids]
    added = sum(p not in row_of for p in ids)
    if len(row_of) - len(deleted) + added < 1:
        raise InputError("the update would leave the index with no product")

    t = time.perf_counter()
    searcher = pybind_searcher(index.load_scann_state(), list(row_of))
    if deleted:
        searcher.delete(deleted)
    if ids:
        searcher.upsert(ids, vectors, batch_size=min(len(ids), 1024))
    # Churn since the partitions were last trained (the build, or the last rebalance).
    churn = int(index.meta.get("churn_since_rebalance", 0)) + len(ids) + len(deleted)
    rebalanced = rebalance == "always" or (rebalance == "auto" and index.options.kind == "tree_ah"
                                            and churn >= REBALANCE_CHURN * len(index.product_ids))
    if rebalanced:
        searcher.rebalance()
        churn = 0
    state = searcher_state(searcher)
    update_seconds = time.perf_counter() - t

    # Row i of the index is the searcher's datapoint i: an upserted product's new fields, else its old ones.
    order = np.asarray(searcher.docids, dtype=object)
    new_rows = pd.Index(ids).get_indexer(order) if ids else np.full(len(order), -1)  # -1: not upserted
    old_rows = np.fromiter((row_of.get(p, -1) for p in order), np.int64, count=len(order))  # 4x pandas' at 1M
    upserted = new_rows >= 0

    def pick(new_values, old_values):
        out = np.asarray(old_values)[np.maximum(old_rows, 0)]
        out[upserted] = np.asarray(new_values)[new_rows[upserted]]
        return out

    new_vectors = pick(vectors, index.vectors)
    new_titles = pick(np.asarray(titles, dtype=object), index.titles)
    new_attributes = {name: pick(np.asarray(attributes.get(name, np.full(len(ids), "", dtype=object)), dtype=object),
                                 np.asarray(values, dtype=object)) for name, values in index.attributes.items()}
    meta = dict(index.meta)
    meta["products"] = len(order)
    meta["churn_since_rebalance"] = churn
    meta.setdefault("updates", []).append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "upserted": len(ids), "added": int(added),
        "replaced": len(ids) - int(added), "deleted": len(deleted), "unknown_deletes": len(unknown),
        "rebalanced": bool(rebalanced), "embed_seconds": round(embed_seconds, 2),
        "update_seconds": round(update_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
        "upsert_file": os.path.abspath(upsert) if upsert else None})
    meta["scann"] = dataclasses.asdict(index.options)
    write_index(os.path.join(run_dir, INDEX_DIR), order, new_titles, new_vectors.astype(np.float32),
                _State(state), meta, new_attributes)
    log(f"updated {os.path.join(run_dir, INDEX_DIR)}: {added} added, {len(ids) - added} replaced, {len(deleted)} deleted"
        f" -> {len(order)} products{'; rebalanced' if rebalanced else ''} in {time.perf_counter() - start:.1f} s")
    return meta


__all__ = ["update_index", "pybind_searcher", "searcher_state", "state_to_assets", "assets_to_state"]
