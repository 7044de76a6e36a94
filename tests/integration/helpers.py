"""Shared by the exporter and serving integration tests: the trainer's side of the exporter,
answered by a real ``CTRModel`` in this process (the Ray path is covered by the stack test)."""
import numpy as np

from trainers.model import Batch, CTRModel

DIM = 8


class LocalTrainer:
    """The two calls the exporter makes of the trainer actor, answered by an in-process model;
    ``metrics`` is what the trainer's progressive validation would report."""

    def __init__(self, model: CTRModel):
        self.model = model
        self.metrics = {"samples_trained": 0, "auc": 0.70, "loss": 0.5}
        self.rng = np.random.default_rng(0)

    def train(self, steps: int = 5, users: int = 300, items: int = 200) -> None:
        for _ in range(steps):
            n = 128
            self.model.train(Batch(self.rng.integers(0, users, n), self.rng.integers(0, items, n),
                                   self.rng.integers(0, 5, n), self.rng.integers(0, 24, n),
                                   (self.rng.random(n) < 0.3).astype(np.float32)))
            self.metrics["samples_trained"] += n

    def changes(self, since):
        return self.model.embedding_changes(since)

    def track_served(self, step: int) -> bool:
        return False    # no shadow here: the gate compares the windows in ``metrics``

    def snapshot(self, embeddings: bool = False):
        return {**self.model.export_snapshot(embeddings), "metrics": dict(self.metrics),
                "offsets": {"samples:0": self.metrics["samples_trained"]}, "embedding_dim": DIM}


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda msg, *a: self.lines.append((level, msg % a))
