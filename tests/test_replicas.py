"""Two logical CPU replicas and one device: same loss and gradients for one global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "replica_equivalence.py")

pytestmark = pytest.mark.slow  # each test trains in a subprocess


def _run(*overrides: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, SCRIPT, *overrides], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_replicas_equal_one_device_with_cross_replica_negatives():
    out = _run()
    assert out["replicas"] == 2
    assert abs(out["loss_single"] - out["loss_replicas"]) < 1e-4 * abs(out["loss_single"])
    assert out["max_gradient_difference"] < 1e-4 * out["max_gradient"]


def test_without_cross_replica_negatives_replicas_see_fewer_negatives():
    # Guards the test above: the equivalence is the gather's doing, not a tautology.
    out = _run("model.cross_replica_negatives=false")
    assert out["replicas"] == 2
    assert abs(out["loss_single"] - out["loss_replicas"]) > 1e-3


def test_two_replicas_equal_one_device_with_the_engagement_tables_of_the_term_channel():
    # The word weights and the query bias: hashed tables that only the engagement task trains.
    out = _run("model.term_dim=16", "model.term_weights=engagement", "model.query_bias=true",
               "model.engagement_bias=learned")
    assert out["replicas"] == 2
    assert abs(out["loss_single"] - out["loss_replicas"]) < 1e-4 * abs(out["loss_single"])
    assert out["max_gradient_difference"] < 1e-4 * out["max_gradient"]


def test_two_replicas_equal_one_device_with_mined_negatives_and_the_hardest_negative_loss():
    # Mined products are gathered across replicas like the batch's own: every row sees all 16.
    out = _run("mined", "model.hard_negative_weight=0.5", "model.hard_negative_from_epoch=0")
    assert out["replicas"] == 2
    assert abs(out["loss_single"] - out["loss_replicas"]) < 1e-4 * abs(out["loss_single"])
    assert out["max_gradient_difference"] < 1e-4 * out["max_gradient"]
