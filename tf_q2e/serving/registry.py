"""Which models and versions a TF Serving base directory holds, and which are loaded.

The layout is TensorFlow Serving's: `BASE/<model>/<version>/` holds a SavedModel,
`<version>` a positive integer; anything else in a model directory (such as the
`.tmp-...` directories an export writes before renaming them into place) is
ignored, and a version directory counts only once its `saved_model.pb` exists.
`BASE/models.config` (a text-format `ModelServerConfig`), when present, lists
the models; otherwise every subdirectory with version directories is a model.

`ModelRegistry.refresh` brings the loaded set in line with the disk: it loads
the newest `keep_versions` versions of each model, newest first, and makes a
version the default only once it is loaded and warmed up; then it unloads what
is surplus or gone. Different models load in parallel (up to
`max_concurrent_loads` at once), so a new version of one model does not wait
for another model's load; the versions of one model load one after another.
Requests hold a reference to the `Servable` they resolved, so a request in
flight on an unloaded version finishes on it. A version that
fails to load is reported in the status and not retried until its directory
goes away (write a new version number instead of fixing one in place).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from tf_q2e.errors import InputError
from tf_q2e.serving.errors import ServingError, not_found
from tf_q2e.serving.loader import load_servable
from tf_q2e.serving.protos import VersionStatus
from tf_q2e.serving.signatures import Limits, Servable

CONFIG_FILE = "models.config"
DEFAULT_MAX_CONCURRENT_LOADS = 2
_VERSION_NAME = re.compile(r"[1-9][0-9]{0,17}")
_SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


def discover_models(base: str) -> dict[str, str]:
    """Model name -> model directory, from `BASE/models.config` or the subdirectories.

    Raises:
        InputError: models.config is malformed or names a path outside `base`.
    """
    config = os.path.join(base, CONFIG_FILE)
    if os.path.isfile(config):
        return read_models_config(base, config)
    found = {}
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if not name.startswith(".") and os.path.isdir(path) and _version_names(path):
            found[name] = path
    return found


def read_models_config(base: str, path: str) -> dict[str, str]:
    """Parses a text-format `ModelServerConfig`; every base_path must lie inside `base`.

    A relative base_path is taken relative to `base`, so an export directory can move.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as e:
        raise InputError(f"{path}: not a text-format ModelServerConfig: {e}") from None
    if config.WhichOneof("config") != "model_config_list":
        raise InputError(f"{path}: needs a model_config_list with one config {{ name base_path }} per model")
    models: dict[str, str] = {}
    for entry in config.model_config_list.config:
        if not entry.name or entry.name in models:
            raise InputError(f"{path}: every model needs a unique, non-empty name (got {entry.name!r})")
        if entry.model_platform not in ("", "tensorflow"):
            raise InputError(
                f"{path}: model '{entry.name}' has model_platform '{entry.model_platform}'; only 'tensorflow' is served"
            )
        models[entry.name] = _resolve_base_path(base, path, entry)
    return models


def _resolve_base_path(base: str, path: str, entry: model_server_config_pb2.ModelConfig) -> str:
    resolved = os.path.realpath(os.path.join(base, entry.base_path))
    if not entry.base_path or resolved == base or os.path.commonpath([base, resolved]) != base:
        raise InputError(
            f"{path}: model '{entry.name}' has base_path {entry.base_path!r}, which resolves to {resolved}, "
            f"not a directory inside the model base {base}; use a path inside it, e.g. {entry.name!r}"
        )
    return resolved


def list_versions(model_dir: str) -> list[int]:
    """The versions ready to load, ascending: integer directories with a saved_model.pb."""
    return sorted(
        int(name)
        for name in _version_names(model_dir)
        if any(os.path.isfile(os.path.join(model_dir, name, f)) for f in _SAVED_MODEL_FILES)
    )


def _version_names(model_dir: str) -> list[str]:
    try:
        names = os.listdir(model_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [name for name in names if _VERSION_NAME.fullmatch(name) and os.path.isdir(os.path.join(model_dir, name))]


@dataclass
class _Model:
    """What the registry knows of one model: its directory and its versions' states."""

    directory: str
    available: dict[int, Servable] = field(default_factory=dict)
    loading: set[int] = field(default_factory=set)
    failed: dict[int, ServingError] = field(default_factory=dict)


class ModelRegistry:
    """The loaded versions of every model in a base directory; thread-safe lookups.

    `refresh` must be called from one thread at a time (the server's poller);
    `servable` and `statuses` may be called from any number of request threads.
    `max_concurrent_loads` bounds how many models `refresh` loads at once (one
    thread per model, each loading that model's versions in order).
    """

    def __init__(self, base: str, keep_versions: int, limits: Limits, log: Callable[[str], None],
                 max_concurrent_loads: int = DEFAULT_MAX_CONCURRENT_LOADS) -> None:
        if max_concurrent_loads < 1:
            raise ValueError(f"max_concurrent_loads must be at least 1, got {max_concurrent_loads}")
        self.base = os.path.realpath(base)
        self._keep = keep_versions
        self._max_concurrent_loads = max_concurrent_loads
        self._loaders: ThreadPoolExecutor | None = None  # the threads `refresh` loads models on
        self._limits = limits
        self._log = log
        self._lock = threading.Lock()
        self._models: dict[str, _Model] = {}

    def refresh(self) -> None:
        """One scan of the base directory: load new versions, unload surplus and gone ones.

        Models are refreshed in parallel, up to `max_concurrent_loads` at once;
        returns once every model's refresh has finished. A version that fails
        to load is recorded in its model's status (see `statuses`), not raised.

        Raises:
            InputError: models.config is malformed (nothing is changed then).
            Exception: the first unexpected error of a model's refresh (e.g. its
                directory cannot be listed), raised once the other models are done.
        """
        wanted = discover_models(self.base)
        with self._lock:
            dropped = [name for name, model in self._models.items() if wanted.get(name) != model.directory]
        for name in dropped:
            self._drop_model(name, "no longer in the model base")
        models = []
        for name, directory in wanted.items():
            with self._lock:
                models.append((name, self._models.setdefault(name, _Model(directory))))
        if self._loaders is None:  # kept across refreshes: the poller calls refresh every poll_seconds
            self._loaders = ThreadPoolExecutor(max_workers=self._max_concurrent_loads, thread_name_prefix="q2e-load")
        done = [self._loaders.submit(self._refresh_model, name, model) for name, model in models]
        errors = [e for e in (future.exception() for future in done) if e is not None]  # waits for every model
        if errors:
            raise errors[0]

    def servable(self, name: str, version: int | None = None) -> Servable:
        """The named version of a model, or its newest available one; NOT_FOUND otherwise."""
        with self._lock:
            model = self._model(name)
            if version is None and model.available:
                return model.available[max(model.available)]
            if version in model.available:
                return model.available[version]
            raise not_found(self._unavailable_message(name, model, version))

    def statuses(self, name: str, version: int | None = None) -> list[VersionStatus]:
        """The state of each version of a model, newest first; NOT_FOUND for an unknown one."""
        with self._lock:
            model = self._model(name)
            rows = [VersionStatus(v, "AVAILABLE") for v in model.available]
            rows += [VersionStatus(v, "LOADING") for v in model.loading]
            rows += [VersionStatus(v, "END", error) for v, error in model.failed.items()]
            rows = [row for row in rows if version is None or row.version == version]
            if not rows:
                raise not_found(self._unavailable_message(name, model, version))
        return sorted(rows, key=lambda row: -row.version)

    def model_names(self) -> list[str]:
        """The names of the models in the base directory."""
        with self._lock:
            return sorted(self._models)

    def close(self) -> None:
        """Unloads everything (and stops the loading threads; a later `refresh` starts new ones)."""
        if self._loaders is not None:
            self._loaders.shutdown(wait=True)
            self._loaders = None
        for name in self.model_names():
            self._drop_model(name, "server stopping")

    def _refresh_model(self, name: str, model: _Model) -> None:
        on_disk = list_versions(model.directory)
        with self._lock:
            gone = [v for v in model.available if v not in on_disk]
            for version in [v for v in model.failed if v not in on_disk]:
                del model.failed[version]
        self._unload(name, model, gone, "its directory is gone")
        for version in reversed(self._targets(model, on_disk)):
            if version not in model.available:
                self._load(name, model, version)
        targets = self._targets(model, on_disk)
        surplus = [v for v in model.available if v not in targets]
        self._unload(name, model, surplus, f"keeping the newest {self._keep}")

    def _targets(self, model: _Model, on_disk: list[int]) -> list[int]:
        """The versions to have loaded: the newest `keep_versions` that have not failed."""
        return [v for v in on_disk if v not in model.failed][-self._keep :]

    def _load(self, name: str, model: _Model, version: int) -> None:
        path = os.path.join(model.directory, str(version))
        with self._lock:
            model.loading.add(version)
        start = time.perf_counter()
        try:
            servable, warmups = load_servable(name, version, path, self._limits)
        except Exception as e:  # noqa: BLE001 - a version that fails must not stop the others
            error = e if isinstance(e, ServingError) else ServingError(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")
            with self._lock:
                model.loading.discard(version)
                model.failed[version] = error
            self._log(f"could not load model '{name}' version {version} from {path}: {error.message}")
            return
        with self._lock:
            model.loading.discard(version)
            model.available[version] = servable
        self._log(
            f"loaded model '{name}' version {version} from {path} in {time.perf_counter() - start:.1f} s "
            f"({len(servable.signatures)} signatures, {warmups} warm-up requests replayed)"
        )

    def _unload(self, name: str, model: _Model, versions: list[int], reason: str) -> None:
        for version in versions:
            with self._lock:
                del model.available[version]
            self._log(f"unloaded model '{name}' version {version} ({reason})")

    def _drop_model(self, name: str, reason: str) -> None:
        with self._lock:
            model = self._models.pop(name)
        self._unload(name, model, sorted(model.available), reason)

    def _model(self, name: str) -> _Model:
        """The named model (call with the lock held); NOT_FOUND when it is not served."""
        if name not in self._models:
            raise not_found(f"model '{name}' is not served (served: {', '.join(sorted(self._models)) or 'none'})")
        return self._models[name]

    @staticmethod
    def _unavailable_message(name: str, model: _Model, version: int | None) -> str:
        wanted = f"version {version}" if version is not None else "available version"
        loaded = ", ".join(map(str, sorted(model.available))) or "none"
        failures = "; ".join(f"version {v} failed to load: {e.message}" for v, e in sorted(model.failed.items()))
        return f"model '{name}' has no {wanted} (loaded versions: {loaded}{'; ' + failures if failures else ''})"
