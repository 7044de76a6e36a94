"""The contestants of `odl eval`, each scoring rows before it learns them (``protocol.Learner``).

``OnlineODL`` is the trainer's own ``CTRModel`` fed as the stream feeds it; ``FrozenODL`` a copy
of it frozen half-way; ``DailyODL`` the same model retrained from scratch every period (several
epochs over everything labelled so far) and served unchanged in between -- the batch practice
ODL exists to beat.  ``Popularity``, ``RiverLR`` and ``VowpalWabbit`` are plain peers on the
same rows; the last two need the optional ``eval`` extra and are skipped with a note without it.
"""
from __future__ import annotations

import math

import numpy as np

from typing import Any, Callable

from odl.config import TrainerConfig
from trainers.evaluation.protocol import FINAL, ReplayLog, TrainEvents

MakeModel = Callable[[], Any]    # a fresh model of the log's shape (``ReplayLog.make_model``)


class OnlineODL:
    """The streaming trainer's model, learning each label when its timing releases it."""

    def __init__(self, make_model: MakeModel, timing: str, name: str = "online"):
        self.name, self.timing = name, timing
        self.model = make_model()

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray:
        return self.model.predict(log.batch(rows))

    def learn(self, log: ReplayLog, ev: TrainEvents, sel: slice) -> None:
        delayed = (ev.kind[sel] != FINAL).astype(np.float32) if self.timing == "delayed" else None
        self.model.train(log.batch(ev.row[sel], ev.label[sel], delayed))


class FrozenODL:
    """The online model as it was half-way through the log; never learns again."""

    timing = "immediate"

    def __init__(self, source: OnlineODL, name: str = "frozen"):
        self.name, self.source = name, source
        self.frozen: Any = None

    def freeze(self) -> None:
        self.frozen = self.source.model.frozen_copy()

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray:
        if self.frozen is None:     # before the half-way point it is the online model itself
            return self.source.predict(log, rows)
        return self.frozen.predict(log.batch(rows))

    def learn(self, log, ev, sel) -> None:
        pass


class DailyODL:
    """Retrained from scratch at each period boundary on every row whose label is known by
    then (``epochs`` shuffled passes), then served unchanged for the period."""

    timing = "immediate"

    def __init__(self, make_model: MakeModel, cfg: TrainerConfig, period_ms: int, window_ms: int,
                 epochs: int = 3, name: str = "daily"):
        self.name, self.cfg, self.period_ms, self.epochs = name, cfg, period_ms, epochs
        self.make_model = make_model
        self.window_ms = window_ms
        self.model: Any = None
        self.next_ms: int | None = None
        self.retrains = 0

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray:
        t = int(log.ts_ms[rows[0]])
        if self.next_ms is None:
            self.next_ms = t + self.period_ms
        if t >= self.next_ms:
            while self.next_ms <= t:
                self.next_ms += self.period_ms
            self._retrain(log, t)
        if self.model is None:      # nothing trained yet: the prior of an untrained model
            return np.full(len(rows), 0.5, np.float32)
        return self.model.predict(log.batch(rows))

    def _retrain(self, log: ReplayLog, now_ms: int) -> None:
        # rows whose attribution window has closed by now: their labels are final (a retrain
        # on rows still inside it would see their quick positives but not their negatives)
        known = np.nonzero(log.ts_ms + self.window_ms < now_ms)[0] if self.window_ms else \
            np.nonzero(log.ts_ms < now_ms)[0]
        if not len(known):
            return
        model = self.make_model()
        rng = np.random.default_rng(self.cfg.seed + self.retrains)
        bs = self.cfg.batch_size
        for _ in range(self.epochs):
            order = rng.permutation(known)
            for s in range(0, len(order), bs):
                rows = order[s:s + bs]
                model.train(log.batch(rows, log.label[rows]))
        self.model, self.retrains = model, self.retrains + 1

    def learn(self, log, ev, sel) -> None:
        pass


class Popularity:
    """The item's click rate so far, smoothed towards the overall click rate."""

    def __init__(self, timing: str, strength: float = 10.0, name: str = "pop"):
        self.name, self.timing, self.strength = name, timing, strength
        self.clicks: dict[int, float] = {}
        self.imps: dict[int, float] = {}
        self.total = [0.0, 0.0]   # clicks, impressions

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray:
        prior = (self.total[0] + 1.0) / (self.total[1] + 2.0)
        k = self.strength
        return np.array([(self.clicks.get(i, 0.0) + k * prior) / (self.imps.get(i, 0.0) + k)
                         for i in log.item[rows].tolist()], np.float32)

    def learn(self, log: ReplayLog, ev: TrainEvents, sel: slice) -> None:
        for i, y in zip(log.item[ev.row[sel]].tolist(), ev.label[sel].tolist()):
            self.clicks[i] = self.clicks.get(i, 0.0) + y
            self.imps[i] = self.imps.get(i, 0.0) + 1.0
            self.total[0] += y
            self.total[1] += 1.0


class RiverLR:
    """River's online logistic regression on the log's one-hot ids (Adagrad)."""

    def __init__(self, timing: str, name: str = "river"):
        from river import linear_model, optim
        self.name, self.timing = name, timing
        self.model = linear_model.LogisticRegression(optimizer=optim.AdaGrad())

    @staticmethod
    def _x(log: ReplayLog, r: int) -> dict[str, float]:
        ns, numeric = log.tokens(r)
        return {**{f"{n}={t}": 1.0 for n, toks in ns.items() for t in toks}, **numeric}

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray:
        return np.array([self.model.predict_proba_one(self._x(log, r)).get(True, 0.5)
                         for r in rows.tolist()], np.float32)

    def learn(self, log: ReplayLog, ev: TrainEvents, sel: slice) -> None:
        for r, y in zip(ev.row[sel].tolist(), ev.label[sel].tolist()):
            self.model.learn_one(self._x(log, r), bool(y))


class VowpalWabbit:
    """Vowpal Wabbit, logistic loss, a namespace per input (user and item ids for the default
    shape, every declared sparse feature for a spec), its default adaptive updates."""

    def __init__(self, timing: str, name: str = "vw"):
        import vowpalwabbit
        self.name, self.timing = name, timing
        self.vw = vowpalwabbit.Workspace("--loss_function logistic --link logistic --quiet")

    @staticmethod
    def _x(log: ReplayLog, r: int) -> str:
        ns, numeric = log.tokens(r)
        line = " ".join(f"|{_vw_name(n)} " + " ".join(toks) for n, toks in ns.items())
        if numeric:
            line += " |numeric " + " ".join(f"{_vw_name(k)}:{v:.6g}" for k, v in numeric.items())
        return line

    def predict(self, log: ReplayLog, rows: np.ndarray) -> np.ndarray:
        return np.array([self.vw.predict(self._x(log, r)) for r in rows.tolist()], np.float32)

    def learn(self, log: ReplayLog, ev: TrainEvents, sel: slice) -> None:
        for r, y in zip(ev.row[sel].tolist(), ev.label[sel].tolist()):
            self.vw.learn(f"{1 if y > 0 else -1} {self._x(log, r)}")


def _vw_name(name: str) -> str:
    """A VW namespace or feature name: no spaces, colons or pipes."""
    return name.replace(" ", "_").replace(":", "_").replace("|", "_")


def optional_peers(timing: str) -> tuple[list, list[str]]:
    """River and VW if installed (the ``eval`` extra); otherwise a note for each missing one."""
    peers, notes = [], []
    for cls, pkg in ((RiverLR, "river"), (VowpalWabbit, "vowpalwabbit")):
        try:
            peers.append(cls(timing))
        except ImportError:
            notes.append(f"{cls.__name__} skipped: `{pkg}` is not installed "
                         f"(pip install -e '.[eval]')")
    return peers, notes


def default_period_ms(span_ms: int, max_periods: int = 10) -> int:
    """A tenth of the log's span (``max_periods`` retrains, which bounds the cost), and never
    less than a day once the log spans ``max_periods`` days: so a ten-day log is retrained
    daily, MovieLens (twenty years) every two years, a ten-minute synthetic stream every minute."""
    day = 86_400_000
    return max(day, math.ceil(span_ms / max_periods)) if span_ms >= max_periods * day \
        else max(1, math.ceil(span_ms / max_periods))
