"""The model store and version registry: numbered version directories (TF-Serving layout).

``<store>/<model>/<version>/`` holds the SavedModel, ``odl_manifest.json`` and the embedding
snapshot the version was exported with (``embeddings/<table>.npz``: ids and float32 vectors),
which a rollback restores into Redis as a new generation.  A version is written into a
temporary directory and renamed into place, so a reader never sees half of one.
``<store>/<model>/history.jsonl`` is the registry's log: published, refused, restored, retired.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "odl_manifest.json"
SNAPSHOT_DIR = "embeddings"
HISTORY = "history.jsonl"


@dataclass
class CachePolicy:
    """How a replica refreshes an optimised model's weight-only cache (a manifest's
    ``cache_policy``): after ``every_n_calls`` calls or ``every_s`` seconds, whichever first."""
    every_n_calls: int = 1000
    every_s: float = 5.0


@dataclass
class Manifest:
    version: str
    parent: str | None
    trainer_step: int
    kafka_offsets: dict[str, int]
    metrics: dict[str, Any]
    embedding_generation: int | None
    created_at: float = field(default_factory=time.time)
    model_name: str = "ctr"
    embedding_dim: int = 16
    embedding_snapshot: str | None = None      # directory inside the version, if written
    embedding_rows: dict[str, int] = field(default_factory=dict)
    graph: dict[str, Any] = field(default_factory=dict)         # optimisation passes' report
    cache_policy: dict[str, Any] = field(default_factory=dict)  # a CachePolicy, as a dict
    spec: str | None = None     # the feature spec's hash (odl.spec) the model was trained under
    # the trainer's newest checkpoint when the version was cut (at or before its step): where
    # `odl rollback --trainer` takes the trainer back to
    trainer_checkpoint: str | None = None
    # each standardised numeric input's [count, sum, sum of squares] at the cut: serving scales
    # requests by them, as the trainer scaled the samples (odl.spec.encode.numeric_values)
    numeric_moments: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelStore:
    def __init__(self, root: Path, model_name: str):
        self.dir = Path(root) / model_name
        self.model_name = model_name

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.dir.iterdir()
                      if p.name.isdigit() and (p / MANIFEST).is_file())

    def latest(self) -> int | None:
        v = self.versions()
        return v[-1] if v else None

    def path(self, version: int | str) -> Path:
        return self.dir / str(int(version))

    def manifest(self, version: int | str) -> dict[str, Any]:
        return json.loads((self.path(version) / MANIFEST).read_text())

    def next_version(self) -> int:
        return (self.latest() or 0) + 1

    def publish(self, version: int, write_model, manifest: Manifest,
                embeddings: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
        """``write_model(tmp_path)`` writes the SavedModel; then the embedding snapshot and the
        manifest, then one atomic rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{version}-{time.time_ns()}"
        try:
            write_model(tmp)
            if embeddings is not None:
                snap = tmp / SNAPSHOT_DIR
                snap.mkdir()
                for table, (ids, vectors) in embeddings.items():
                    np.savez(snap / f"{table}.npz", ids=np.asarray(ids, np.int64),
                             vectors=np.asarray(vectors, np.float32))
                manifest.embedding_snapshot = SNAPSHOT_DIR
                manifest.embedding_rows = {t: int(len(ids)) for t, (ids, _) in embeddings.items()}
            (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1, allow_nan=True))
            final = self.path(version)
            tmp.rename(final)
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def retain(self, keep: int, protect: set[int] = frozenset()) -> list[int]:
        """Delete all but the newest ``keep`` versions (never a protected one)."""
        vs = self.versions()
        doomed = [v for v in vs[:-keep] if v not in protect] if keep < len(vs) else []
        for v in doomed:
            shutil.rmtree(self.path(v), ignore_errors=True)
        return doomed

    def snapshot(self, version: int | str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The embedding rows a version was exported with; KeyError if it has none,
        FileNotFoundError if a table its manifest lists is missing (never a silent empty set)."""
        man = self.manifest(version)
        rel = man.get("embedding_snapshot")
        if not rel:
            raise KeyError(f"version {version} has no embedding snapshot")
        out = {}
        for table in man.get("embedding_rows") or {}:
            f = self.path(version) / rel / f"{table}.npz"
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing")
            with np.load(f) as z:
                out[table] = (z["ids"], z["vectors"])
        if not out:
            raise KeyError(f"version {version}'s embedding snapshot lists no table")
        return out

    # --- the registry's log -------------------------------------------------------------------
    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (published, refused, restored, retired ...) to the history."""
        self.dir.mkdir(parents=True, exist_ok=True)
        rec = {"event": event, "ts": time.time(), **fields}
        with open(self.dir / HISTORY, "a") as f:
            f.write(json.dumps(rec, allow_nan=True) + "\n")
        return rec

    def history(self, last: int = 50) -> list[dict[str, Any]]:
        path = self.dir / HISTORY
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines()[-last:]:
            try:
                out.append(json.loads(line))
            except ValueError:   # a line cut by a crash mid-write: skip it, keep the rest
                continue
        return out
