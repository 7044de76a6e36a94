"""The parts of a training group that its members share: who trains which partitions, the dense
averager, and the commit record of group checkpoints.  The coordinator that runs a group on Ray
is ``trainers.coordinator``; docs/training.md ("Scale-out") states the consistency model.

**Data parallelism.**  Trainer i of N consumes the samples partitions p with p % N == i.  The
embedding tables live in S parameter-server shards (``trainers.ps``) that every trainer reads and
updates; each trainer keeps its own copy of the dense network and, every
``sync_every_steps`` steps, replaces it with the average of the latest copies all trainers have
reported (``DenseAverager``: asynchronous periodic model averaging, no barrier).

**Exactly-once across the group.**  A group checkpoint (epoch e) holds every trainer at a step
boundary, then every trainer (positions, held samples, dedup window, dense weights and slots)
and every shard (rows and their optimiser slots) writes its part tagged with e, and only then is
e committed by an atomic write of ``group.json``.  Any failure restarts the whole group from the
committed epoch: parts of later epochs are deleted, shards and trainers restore e, trainers seek
to e's positions.  Sparse updates applied after e are rolled back with everything else, so every
sample is trained exactly once into the state that survives.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from odl.config import Config
from trainers.checkpoint import write_atomic


def partitions_for(index: int, count: int, partitions: int) -> list[int]:
    """The samples partitions trainer ``index`` of ``count`` consumes (disjoint, covering all)."""
    if not 0 <= index < count <= partitions:
        raise ValueError(f"trainer {index} of {count} over {partitions} partitions")
    return [p for p in range(partitions) if p % count == index]


@dataclass
class GroupMember:
    """What a trainer needs to take part in a group (Ray handles are picklable)."""
    index: int
    count: int
    partitions: list[int]
    shards: list[Any]               # EmbeddingShard actor handles
    averager: Any                   # DenseAverager actor handle
    epoch: int | None               # committed epoch to restore, None = start afresh
    skip_ahead: bool = False        # then go on from the newest offsets (a rollback's choice)

    @property
    def name(self) -> str:
        return f"trainer-{self.index}"


def average_weights(copies: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The element-wise mean of several copies of the same weights (dtype kept)."""
    if not copies:
        return {}
    return {k: np.mean([c[k] for c in copies], axis=0).astype(copies[0][k].dtype) for k in copies[0]}


class DenseAverager:
    """Keeps each trainer's latest dense weights; ``exchange`` returns the average of all that
    have reported.  Trainable weights and BatchNorm moving statistics are averaged alike; each
    trainer's optimiser slots stay its own (local SGD with periodic averaging)."""

    def __init__(self, count: int):
        self.count = count
        self.latest: dict[int, dict[str, np.ndarray]] = {}
        self.exchanges = 0

    def exchange(self, index: int, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not 0 <= index < self.count:
            raise ValueError(f"trainer index {index} outside 0..{self.count - 1}")
        self.latest[index] = weights
        self.exchanges += 1
        return self.average()

    def average(self) -> dict[str, np.ndarray]:
        return average_weights(list(self.latest.values()))


@dataclass
class GroupCommit:
    """``group.json``: the newest epoch whose every part is on disk, and the group's shape (a
    different shape cannot restore it: partitions and id ownership would not match)."""
    epoch: int
    trainers: int
    ps_shards: int
    created: float = field(default_factory=time.time)

    @staticmethod
    def path(cfg: Config) -> Path:
        return cfg.paths.checkpoints / "trainer" / "group.json"

    @classmethod
    def read(cls, cfg: Config) -> "GroupCommit | None":
        p = cls.path(cfg)
        try:
            return cls(**json.loads(p.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise RuntimeError(f"{p} is unreadable ({exc}); move it aside to start afresh") from exc

    def write(self, cfg: Config) -> None:
        p = self.path(cfg)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, json.dumps(self.__dict__, sort_keys=True))

    def check_shape(self, trainers: int, ps_shards: int, where: Path) -> None:
        if (self.trainers, self.ps_shards) != (trainers, ps_shards):
            raise RuntimeError(
                f"{where} holds a group of {self.trainers} trainers and {self.ps_shards} shards; "
                f"the config asks for {trainers} and {ps_shards}. Restore with the old "
                "trainer.scale, or move the checkpoint directory aside to start afresh")
