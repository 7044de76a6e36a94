"""`odl eval`: label timing, scoring before learning, the recomputed real-time features, a drifting
preference only an online model follows, and the delayed-feedback correction."""
import numpy as np
import pytest

from odl.config import Config
from odl.features import (ITEM_WINDOW_S, TILE_SLIDE_S, USER_WINDOWS_S, dense_values,
                          smoothed_ctr)
from trainers.evaluation.features import window_features
from trainers.evaluation.learners import OnlineODL, default_period_ms
from trainers.evaluation.logs import EvalLog
from trainers.evaluation.protocol import CORRECTION, PROVISIONAL, replay, train_events
from trainers.evaluation.run import EvalOptions, evaluate
from trainers.metrics import calibration


def _log(ts, user, item, label, click_ts, name="t"):
    n = len(ts)
    return EvalLog(name, np.asarray(ts, np.int64), np.asarray(user, np.int64),
                   np.asarray(item, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
                   np.asarray(label, np.float32), np.asarray(click_ts, np.int64))


def test_label_timings():
    log = _log([0, 100, 200], [1, 2, 3], [1, 2, 3], [1, 0, 1], [50, -1, 900])
    ev = train_events(log, "unaligned", window_ms=1000)
    assert list(zip(ev.due_ms, ev.row)) == [(50, 0), (900, 2), (1100, 1)]
    ev = train_events(log, "aligned", window_ms=1000)
    assert list(ev.due_ms) == [1000, 1100, 1200] and list(ev.row) == [0, 1, 2]
    ev = train_events(log, "delayed", window_ms=1000)
    assert list(zip(ev.due_ms, ev.row, ev.label, ev.kind)) == [
        (0, 0, 0, PROVISIONAL), (50, 0, 1, CORRECTION), (100, 1, 0, PROVISIONAL),
        (200, 2, 0, PROVISIONAL), (900, 2, 1, CORRECTION)]
    assert list(train_events(log, "unaligned", window_ms=0).due_ms) == [0, 100, 200]
    with pytest.raises(ValueError, match="unknown label timing"):
        train_events(log, "psychic", 0)


def test_out_of_order_log_is_refused():
    with pytest.raises(ValueError, match="event-time order"):
        _log([5, 1], [1, 1], [1, 1], [0, 0], [-1, -1])


class Spy:
    def __init__(self, timing):
        self.name, self.timing = f"spy-{timing}", timing
        self.scored, self.learned = set(), []

    def predict(self, log, rows):
        self.scored.update(rows.tolist())
        return np.full(len(rows), 0.5, np.float32)

    def learn(self, log, ev, sel):
        rows = ev.row[sel].tolist()
        assert set(rows) <= self.scored, "trained on a row before it was scored"
        self.learned += rows


@pytest.mark.parametrize("timing", ["immediate", "unaligned", "aligned", "delayed"])
def test_every_row_is_scored_before_it_is_learned(timing):
    rng = np.random.default_rng(0)
    n = 500
    ts = np.sort(rng.integers(0, 5000, n))          # ties included
    label = rng.random(n) < 0.3
    click = np.where(label, ts + rng.integers(0, 300, n), -1)
    log = _log(ts, rng.integers(0, 9, n), rng.integers(0, 9, n), label, click)
    spy = Spy(timing)
    replay(log, [spy], batch_size=16, window_ms=1000)
    # exactly the training events due by the log's end are learned, each once
    ev = train_events(log, timing, 1000)
    due = ev.due_ms <= ts[-1]
    assert sorted(spy.learned) == sorted(ev.row[due].tolist())
    assert len(spy.learned) == int(due.sum()) > 0


def test_window_features_match_the_definition():
    """Brute force over the definition: counts of the window ending at the impression's minute
    boundary, clicks at their own time, through the one dense_values."""
    rng = np.random.default_rng(1)
    n = 300
    ts = np.sort(rng.integers(0, 3 * 3_600_000, n))
    label = rng.random(n) < 0.4
    click = np.where(label, ts + rng.integers(200, 90_000, n), -1)
    user, item = rng.integers(0, 5, n), rng.integers(0, 7, n)
    got = window_features(_log(ts, user, item, label, click))
    for r in range(0, n, 7):
        end = ts[r] - ts[r] % (TILE_SLIDE_S * 1000)

        def count(ent, of, w):
            lo = end - w * 1000
            imps = int(np.sum((ent == of) & (ts >= lo) & (ts < end)))
            clicks = int(np.sum((ent == of) & label & (click >= lo) & (click < end)))
            return imps, clicks
        (a, b), (c, d) = (count(user, user[r], w) for w in USER_WINDOWS_S)
        e, f = count(item, item[r], ITEM_WINDOW_S)
        want = dense_values(a, b, c, d, e, f, smoothed_ctr(e, f))
        assert np.allclose(got[r], want, atol=1e-6), r


def _drifting_log(n=24_000, users=40, items=60, seed=3):
    """Each user likes one half of the items, and swaps halves at the middle of the log."""
    rng = np.random.default_rng(seed)
    ts = np.arange(n, dtype=np.int64) * 60_000           # one impression a minute
    user, item = rng.integers(0, users, n), rng.integers(0, items, n)
    taste = rng.integers(0, 2, users)
    flipped = (np.arange(n) >= n // 2).astype(int)
    likes = ((item % 2) == (taste[user] ^ flipped))
    label = rng.random(n) < np.where(likes, 0.7, 0.1)
    click = np.where(label, ts + 1000, -1)
    return _log(ts, user + 1, item + 1, label, click, "drift")


@pytest.mark.slow
def test_only_the_online_model_follows_a_drifting_preference():
    cfg = Config()
    log = _drifting_log()
    res = evaluate(cfg, log, EvalOptions(peers=False, per_row_peers=False, epochs=2,
                                         period_ms=default_period_ms(log.span_ms, 4)))
    auc = {n: f["auc"] for n, f in res.overall.items()}
    second = {n: np.mean([f["auc"] for f in fs[5:]]) for n, fs in res.per_slice.items()}
    assert second["online"] > second["frozen"] + 0.2, second    # the frozen copy learned the old taste
    assert auc["online"] > auc["daily"] + 0.02, auc
    assert auc["online"] > auc["pop"], auc
    assert "RESULT eval auc_online=" in res.result_line


class NaiveFakeNegatives(OnlineODL):
    """Fake negatives without the importance weights: learns p/(1+p), not p."""

    def learn(self, log, ev, sel):
        self.model.train(log.batch(ev.row[sel], ev.label[sel]))


@pytest.mark.slow
def test_importance_weights_undo_the_fake_negatives_bias():
    rng = np.random.default_rng(5)
    n, items = 30_000, 20
    item = rng.integers(0, items, n)
    p = np.linspace(0.2, 0.8, items)[item]
    label = rng.random(n) < p
    ts = np.arange(n, dtype=np.int64) * 1000
    log = _log(ts, rng.integers(0, 500, n) + 1, item + 1, label, np.where(label, ts + 5000, -1))
    cfg = Config().trainer
    def make():
        return log.make_model(cfg)
    fnw, naive = OnlineODL(make, "delayed", "fnw"), NaiveFakeNegatives(make, "delayed", "naive")
    res = replay(log, [fnw, naive], 128, window_ms=30_000)
    tail = slice(n // 2, n)
    y = log.label[tail]
    cal_fnw = calibration(res.scores["fnw"][tail], y)
    cal_naive = calibration(res.scores["naive"][tail], y)
    assert abs(cal_fnw - 1) < 0.08, cal_fnw
    assert cal_naive < 0.85, cal_naive        # biased towards p / (1 + p)
