"""Which model a replica serves, and swapping it without dropping requests.

The served version is the control plane's pinned version if an operator pinned one (rollback),
else the newest registered version.  A new version is loaded beside the old one and swapped in
with one reference assignment; requests in flight finish on the model they started with.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import tensorflow as tf

from odl import dense_channel
from odl.control import ControlPlane
from odl.dense_channel import DenseRefresh
from odl.features import NUM_DENSE
from odl.model_store import CachePolicy, ModelStore
from odl.spec import check_spec
from odl.spec.net import PACKED_SIGNATURE
from serving.graph_cache import CacheRefresher

log = logging.getLogger("odl.serving.model")
RETRY_FAILED_S = 30.0  # a version that failed to load is retried this often, not every poll
WARM_BATCHES = (1, 8, 64, 256, 1024)


class ReadWriteLock:
    """Many predictions at once, or one in-place weight or cache refresh: a request never sees
    half of a refresh.  A waiting writer goes first (new readers queue behind it), so a busy
    replica still applies its refreshes."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writers = 0       # waiting or writing
        self._writing = False

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._writers += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._writers -= 1
                self._cond.notify_all()


@dataclass(eq=False)   # identity: the batcher keys batches by the model object they run on
class LoadedModel:
    version: str
    manifest: dict[str, Any]
    fn: Any  # the serving_default concrete function
    loaded_at: float
    saved: Any = None  # the loaded SavedModel object: keeps fn's variables alive
    refresh_seq: int = 0           # the dense refresh applied last (0: the version's own weights)
    refreshed_at: float = 0.0
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)
    cache: CacheRefresher | None = None   # the CallGraphOp cache policy of an optimised model
    xla: bool = False              # serving the XLA twins (``xla_choice``)

    def __post_init__(self):
        sigs = getattr(self.saved, "signatures", {}) if self.saved is not None else {}
        self.candidates_fn = sigs.get("score_candidates_xla" if self.xla else "score_candidates")
        # a spec's optimised graph also takes the packed request (odl.spec.net): fewer tensors
        self.packed_fn = sigs.get(f"{PACKED_SIGNATURE}_xla" if self.xla else PACKED_SIGNATURE)
        # versions exported before the model took real-time features have no such input
        self.takes_features = "features" in self.fn.structured_input_signature[1]
        self.takes_user_item = "user_emb" in self.fn.structured_input_signature[1]
        if "refresh_cache" in sigs:
            policy = self.manifest.get("cache_policy") or {}
            self.cache = CacheRefresher(sigs["refresh_cache"], CachePolicy(**policy))

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest.get("embedding_dim", 16))

    @property
    def created_at(self) -> float:
        return float(self.manifest.get("created_at", self.loaded_at))

    def predict_inputs(self, inputs: dict[str, np.ndarray], packed: bool = False) -> np.ndarray:
        """[B] probabilities from the signature's inputs by name (a spec's model:
        ``serving.spec_scoring``), in the packed layout when ``packed`` (``packed_fn``)."""
        args = {k: tf.constant(v) for k, v in inputs.items()}
        fn = self.packed_fn if packed else self.fn
        with self.lock.read():
            out = fn(**args)
        if self.cache is not None:
            self.cache.on_call()
        return out["probability"].numpy()

    def warm(self, batch_sizes: tuple[int, ...] = WARM_BATCHES, candidates: int = 100) -> None:
        """Run each signature once per batch bucket before the model takes traffic, so the first
        requests do not pay TensorFlow's first-call costs."""
        if not self.takes_user_item:      # a spec's model: its own inputs
            for packed, fn in ((False, self.fn), (True, self.packed_fn)):
                if fn is None:
                    continue
                specs = fn.structured_input_signature[1]
                for b in batch_sizes:
                    self.predict_inputs({k: np.zeros([b, *s.shape[1:]], s.dtype.as_numpy_dtype)
                                         for k, s in specs.items()}, packed)
            return
        d = self.embedding_dim
        for b in batch_sizes:
            z = np.zeros(b, np.int64)
            self.predict(np.zeros((b, d), np.float32), np.zeros((b, d), np.float32), z, z,
                         np.zeros((b, NUM_DENSE), np.float32))
        if self.candidates_fn is not None:
            for b in (1, 4):
                self.score_candidates(np.zeros((b, d), np.float32), np.zeros((b, candidates, d), np.float32),
                                      np.zeros((b, candidates), np.int64), np.zeros(b, np.int64),
                                      np.zeros((b, candidates, NUM_DENSE), np.float32))

    def _inputs(self, user, item, position, hour, features) -> dict[str, tf.Tensor]:
        args = {"user_emb": tf.constant(user), "item_emb": tf.constant(item),
                "position": tf.constant(position, tf.int64), "hour": tf.constant(hour, tf.int64)}
        if self.takes_features:
            args["features"] = tf.constant(features, tf.float32)
        return args

    def predict(self, user: np.ndarray, item: np.ndarray, position: np.ndarray,
                hour: np.ndarray, features: np.ndarray) -> np.ndarray:
        """[B] probabilities; ``features`` [B, NUM_DENSE] (``serving.features``)."""
        with self.lock.read():
            out = self.fn(**self._inputs(user, item, position, hour, features))
        if self.cache is not None:
            self.cache.on_call()
        return out["probability"].numpy()

    def score_candidates(self, user: np.ndarray, items: np.ndarray, position: np.ndarray,
                         hour: np.ndarray, features: np.ndarray) -> np.ndarray:
        """[B, C] probabilities of C candidates for each of B users (rank-3 signature);
        ``features`` [B, C, NUM_DENSE]."""
        if self.candidates_fn is None:   # a version exported before the signature existed
            b, c, d = items.shape
            flat = self.predict(np.repeat(user, c, axis=0), items.reshape(b * c, d),
                                position.reshape(-1), np.repeat(hour, c), features.reshape(b * c, -1))
            return flat.reshape(b, c)
        with self.lock.read():
            out = self.candidates_fn(**self._inputs(user, items, position, hour, features))
        if self.cache is not None:
            self.cache.on_call()
        return out["probability"].numpy()

    def apply_dense(self, refresh: DenseRefresh) -> bool:
        """Apply a dense refresh in place (optimised models only); False if it does not fit."""
        sigs = self.saved.signatures if self.saved is not None else {}
        if "apply_weights" not in sigs:
            return False
        fn = sigs["apply_weights"]
        specs = fn.structured_input_signature[1]
        given = {k.replace("/", "_"): v for k, v in refresh.weights.items()}
        if set(given) != set(specs) or any(tuple(given[k].shape) != tuple(specs[k].shape) for k in specs):
            log.warning("dense refresh %d does not fit version %s's weights", refresh.seq, self.version)
            return False
        args = {k: tf.constant(given[k], specs[k].dtype) for k in specs}
        with self.lock.write():
            fn(**args)                 # apply_weights recomputes the cache with the weights
            if self.cache is not None:
                self.cache.refreshed()
        self.refresh_seq, self.refreshed_at = refresh.seq, time.time()
        return True

    def maintain(self) -> bool:
        """Run a due CallGraphOp cache refresh under the write lock (the model poll calls
        this, the thread that also applies weight refreshes); True if it ran."""
        if self.cache is None or not self.cache.due:
            return False
        with self.lock.write():
            return self.cache.run_due()


def xla_choice(setting: str) -> bool:
    """Whether this replica serves XLA-compiled graphs: ``serving.xla`` on / off, or auto =
    when this process sees a GPU (on these CPUs XLA is slower than TensorFlow's kernels,
    docs/serving-graph.md).  Decided where the graph runs, not where it was exported."""
    if setting == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return setting == "on"


class ModelHolder:
    def __init__(self, store: ModelStore, cp: ControlPlane, xla: str = "auto",
                 spec_hash: str | None = None):
        """``spec_hash``: the running spec's (default: the default shape's); a version written
        under another is refused."""
        self.store, self.cp, self.spec_hash = store, cp, spec_hash
        self.xla = xla_choice(xla)
        self.current: LoadedModel | None = None
        self.load_errors = 0
        self.fallback = False   # serving the store's newest because the control plane is away
        self._failed: dict[str, float] = {}  # version -> when loading it last failed
        self._lock = threading.Lock()

    def load(self, version: str) -> LoadedModel:
        path = self.store.path(version)
        loaded = tf.saved_model.load(str(path))
        # Call the signature directly: the restored tf.function attribute adds ~0.1 ms per call.
        # This replica's XLA choice picks the optimised graph's compiled twins where it has them.
        xla = self.xla and "serving_xla" in loaded.signatures
        fn = loaded.signatures["serving_xla" if xla else "serving_default"]
        manifest = self.store.manifest(version)
        check_spec(manifest.get("spec"), f"version {version}", expected=self.spec_hash)
        model = LoadedModel(str(version), manifest, fn, time.time(), loaded, xla=xla)
        model.warm()
        return model

    def wanted_version(self) -> str | None:
        """The version the control plane wants served.  With the control plane unreachable a
        replica that serves nothing yet takes the newest version in the model store (it would
        otherwise answer nothing until Redis is back; pins live in Redis, so this is the only
        choice it can make), and one that serves a version keeps it."""
        try:
            served = self.cp.served_version()
        except redis.RedisError as exc:
            if self.current is not None:
                return self.current.version
            newest = self._newest()
            if newest is not None and not self.fallback:
                log.warning("control plane unreachable (%s): serving the newest version in the "
                            "model store, %s, until it is back", exc, newest)
            self.fallback = newest is not None
            return newest
        if self.fallback:
            log.info("control plane back: serving the version it wants")
            self.fallback = False
        return served or self._newest()

    def _newest(self) -> str | None:
        latest = self.store.latest()
        return str(latest) if latest is not None else None

    def refresh(self) -> bool:
        """Load the wanted version if it differs from the current one; True if swapped."""
        wanted = self.wanted_version()
        if wanted is None or (self.current and self.current.version == wanted):
            return False
        if time.time() - self._failed.get(wanted, 0.0) < RETRY_FAILED_S:
            return False
        with self._lock:
            try:
                model = self.load(wanted)
            except Exception as exc:  # noqa: BLE001 - keep serving the old version
                self.load_errors += 1
                self._failed[wanted] = time.time()
                log.error("could not load version %s: %s", wanted, exc)
                return False
            self.current = model
        log.info("now serving version %s", wanted)
        return True

    def maintain(self) -> bool:
        m = self.current
        return m.maintain() if m is not None else False

    def refresh_dense(self, r) -> bool:
        """Apply the newest dense refresh if it refines the version served now; True if applied."""
        m = self.current
        if m is None:
            return False
        seq, base = dense_channel.head(r, self.store.model_name)
        if seq <= m.refresh_seq or base != m.version:
            return False   # nothing new, or a refresh of another version (pinned to an older one)
        refresh = dense_channel.read(r, self.store.model_name)
        if refresh is None or refresh.base_version != m.version:
            return False
        if m.apply_dense(refresh):
            log.info("applied dense refresh %d (step %d) to version %s", refresh.seq,
                     refresh.trainer_step, m.version)
            return True
        m.refresh_seq = refresh.seq   # does not fit: do not try it again
        return False
