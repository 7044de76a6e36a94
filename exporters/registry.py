"""The model store: numbered version directories (TF-Serving layout) with a manifest each.

``<store>/<model>/<version>/`` holds the SavedModel and ``odl_manifest.json``.  A version is
written into a temporary directory and renamed into place, so a reader never sees half of one.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "odl_manifest.json"


@dataclass
class Manifest:
    version: str
    parent: str | None
    trainer_step: int
    kafka_offsets: dict[str, int]
    metrics: dict[str, Any]
    embedding_generation: int
    created_at: float = field(default_factory=time.time)
    model_name: str = "ctr"
    embedding_dim: int = 16

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

    def publish(self, version: int, write_model, manifest: Manifest) -> Path:
        """``write_model(tmp_path)`` writes the SavedModel; then manifest, then atomic rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-{version}-{time.time_ns()}"
        try:
            write_model(tmp)
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
