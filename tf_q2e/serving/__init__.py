"""Serving: a development server that speaks TensorFlow Serving's APIs, and a client.

* `ModelServer` (`server.py`) serves a TF Serving base directory over gRPC
  (PredictionService, ModelService) and REST, reloading new versions as they
  appear; `q2e serve` runs it.
* `ServingClient` (`client.py`) talks to it, or to a stock `tensorflow/serving`,
  over either protocol; `q2e query` uses its `search`.
* `ServingError` (`errors.py`) is what either raises for a refused request.

The names are imported on first use, so importing this package (as the command
line does to build its parser) does not load TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelServer": "tf_q2e.serving.server",
    "ServingClient": "tf_q2e.serving.client",
    "ServingError": "tf_q2e.serving.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
