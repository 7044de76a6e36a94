"""When a quiet stream cuts partial batches.  The cuts must not depend on when the trainer happens
to look (a restarted trainer looks later after the last record than an uninterrupted one), and a
consumer that is only slow must not look like a quiet stream: either would make a replay cut
other batches than the original run, and so train another model."""
import json
import time

import pytest

from tests.conftest import make_config
from trainers.samples import decode_records
from trainers.streaming import StreamingTrainer

WAIT_S, HOLD_S = 5.0, 6.0     # max_batch_wait_ms; the aligner's hold (window 5 s + idle 1 s)


def _records(ts_ms: list[int], start: int = 0):
    values = [json.dumps({"sample_id": f"r{start + k}:1", "request_id": f"r{start + k}",
                          "user_id": k, "item_id": 1, "position": 0, "hour": 1, "label": k % 2,
                          "impression_ts_ms": ts}).encode() for k, ts in enumerate(ts_ms)]
    return decode_records([0] * len(values), list(range(start, start + len(values))), values)


def _trainer(tmp_path, name: str) -> StreamingTrainer:
    cfg = make_config(tmp_path / name,
                      feature_job={"attribution_window_s": 5, "idle_timeout_s": 1,
                                   "watermark_delay_ms": 0},
                      trainer={"batch_size": 4, "max_batch_wait_ms": int(WAIT_S * 1000),
                               "align_labels": True, "frozen_baseline_after": None,
                               "checkpoint": {"restore": False}})
    t = StreamingTrainer(cfg)
    t.batches = []
    train = t._train
    t._train = lambda rows: (t.batches.append(len(rows)), train(rows))[1]
    return t


def _look(t: StreamingTrainer, after_s: float) -> int:
    """A poll that found nothing, ``after_s`` seconds after the last record."""
    t._last_data = time.monotonic() - after_s
    return t.step(None)


@pytest.fixture
def pair(tmp_path):
    ts = [0] * 6 + [10_000] * 3   # six released at once (clock 10 s), three held for 6 s
    a, b = _trainer(tmp_path, "a"), _trainer(tmp_path, "b")
    for t in (a, b):
        assert t.step(_records(ts)) == 4 and t.batches == [4]   # one full batch, two wait
    yield a, b
    a.close()
    b.close()


def test_quiet_cuts_do_not_depend_on_when_the_trainer_looks(pair):
    looked_twice, looked_once = pair
    _look(looked_twice, WAIT_S + 0.5)            # quiet: the two waiting are cut
    assert looked_twice.batches == [4, 2]
    _look(looked_twice, HOLD_S + WAIT_S)         # idle: the three held are released and cut
    _look(looked_once, HOLD_S + 1.0)             # both due at one look: the same cuts
    assert looked_twice.batches == looked_once.batches == [4, 2, 3]
    assert looked_twice.model.step == looked_once.model.step == 3


class _Source:
    """A sample source that reports a backlog, or cannot (an exception)."""
    def __init__(self, backlog):
        self._n = backlog

    def backlog(self, taken, timeout_s=2.0):
        if isinstance(self._n, Exception):
            raise self._n
        return self._n


class _Prefetch:
    """The prefetcher's ``call``: runs the source's method (here, in this thread)."""
    def __init__(self, source):
        self._source = source

    def call(self, name, *args, timeout_s=30.0):
        return getattr(self._source, name)(*args)

    def close(self):
        pass


def test_a_slow_consumer_is_not_a_quiet_stream(pair):
    t, _ = pair
    t._prefetch = _Prefetch(_Source(25))
    _look(t, WAIT_S + 1.0)                       # records wait at the broker: no cut
    assert t.batches == [4]
    gap_wait_s = t.cfg.kafka.offset_gap_wait_ms / 1000.0
    _look(t, WAIT_S + gap_wait_s + 0.5)          # a backlog that never drains counts no more
    assert t.batches == [4, 2, 3]


def test_a_broker_that_cannot_say_leaves_the_stream_quiet(pair):
    t, _ = pair
    t._prefetch = _Prefetch(_Source(RuntimeError("broker away")))
    _look(t, WAIT_S + 0.5)
    assert t.batches == [4, 2]
