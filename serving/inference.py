"""What an inference worker does with one batch: look the embeddings up, call the model, split.

Two kinds of request batch separately (``Batcher`` keys by (model, kind)):

Each row also gets its real-time features from the online feature store (``serving.features``).

- ``Pairs`` (the predict API): rows of (user, item, position, hour) -> ``serving_default``.
- ``Candidates`` (the recommendation API): one user and C items -> ``score_candidates`` on
  [B, C] input, the rank-3 graph the exporter simplified (tensordot -> Reshape/MatMul/Reshape);
  requests with fewer candidates than the batch's widest are padded and the padding dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import numpy as np

from serving.embedding_cache import EmbeddingCache, Lookup
from serving.features import RequestFeatures
from serving.model import LoadedModel


@dataclass(frozen=True)
class Pairs:
    user_ids: list[int]
    item_ids: list[int]
    positions: list[int]
    hours: list[int]

    @property
    def rows(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class Candidates:
    user_id: int
    item_ids: list[int]
    position: int
    hour: int

    @property
    def rows(self) -> int:
        return len(self.item_ids)


@dataclass
class Scored:
    probabilities: np.ndarray
    degraded: bool


class Inference:
    """``run`` is the Batcher's RunBatch; ``on_lookup(table, Lookup)`` feeds the metrics."""

    def __init__(self, cache: EmbeddingCache, features: RequestFeatures,
                 on_lookup=lambda table, lookup: None):
        self.cache, self.features, self.on_lookup = cache, features, on_lookup
        self.spec = None     # a declared spec's scorer (serving.spec_scoring), set by the app

    def _vectors(self, table: str, ids: list[int], dim: int) -> Lookup:
        found = self.cache.lookup(table, ids, dim)
        self.on_lookup(table, found)
        return found

    def run(self, key: Hashable, payloads: list) -> list[Scored]:
        model, kind = key
        if kind == "pairs":
            return self._pairs(model, payloads)
        if kind == "spec":
            return [Scored(p, d) for p, d in self.spec.run(model, payloads)]
        return self._candidates(model, payloads)

    def _pairs(self, model: LoadedModel, batch: list[Pairs]) -> list[Scored]:
        d = model.embedding_dim
        user_ids = [u for p in batch for u in p.user_ids]
        item_ids = [i for p in batch for i in p.item_ids]
        users, items = self._vectors("user", user_ids, d), self._vectors("item", item_ids, d)
        pos = np.fromiter((x for p in batch for x in p.positions), np.int64)
        hour = np.fromiter((x for p in batch for x in p.hours), np.int64)
        feats, no_store = self.features.pairs(user_ids, item_ids)
        probs = model.predict(users.vectors, items.vectors, pos, hour, feats)
        degraded = users.degraded or items.degraded or no_store
        out, start = [], 0
        for p in batch:
            out.append(Scored(probs[start:start + p.rows], degraded))
            start += p.rows
        return out

    def _candidates(self, model: LoadedModel, batch: list[Candidates]) -> list[Scored]:
        d, width = model.embedding_dim, max(p.rows for p in batch)
        users = self._vectors("user", [p.user_id for p in batch], d)
        flat = [i for p in batch for i in p.item_ids]
        items = self._vectors("item", flat, d)
        flat_feats, no_store = self.features.pairs([p.user_id for p in batch for _ in p.item_ids], flat)
        item_emb = np.zeros((len(batch), width, d), np.float32)
        pos = np.zeros((len(batch), width), np.int64)
        feats = self.features.default(len(batch) * width).reshape(len(batch), width, -1)
        start = 0
        for b, p in enumerate(batch):
            item_emb[b, :p.rows] = items.vectors[start:start + p.rows]
            feats[b, :p.rows] = flat_feats[start:start + p.rows]
            pos[b, :] = p.position
            start += p.rows
        hour = np.asarray([p.hour for p in batch], np.int64)
        probs = model.score_candidates(users.vectors, item_emb, pos, hour, feats)
        degraded = users.degraded or items.degraded or no_store
        return [Scored(probs[b, :p.rows], degraded) for b, p in enumerate(batch)]
