"""The prefetchers: decode ahead, hand out exactly the records asked for, in order, run calls
where the source lives, and surface a failing source or child instead of hanging.  The process
prefetcher's child (``trainers.decode_process``) builds its own ``FakeSource`` from a pickle."""
import json
import os
import signal
import threading
import time
from functools import partial

import pytest

from trainers.prefetch import Prefetcher, ProcessPrefetcher
from trainers.samples import Records


class FakeSource:
    def __init__(self, values):
        self.values, self.paused, self.calls_on = list(values), False, []
        self.closed = False

    def fetch(self, max_records, timeout_s):
        out, self.values = self.values[:max_records], self.values[max_records:]
        if not out:
            time.sleep(timeout_s)
        return [(0, k, v) for k, v in out]

    def set_paused(self, paused):
        self.paused = paused

    def where(self):
        return os.getpid(), threading.current_thread().name

    def left(self):
        return len(self.values)

    def close(self):
        self.closed = True


def sample(k):
    return json.dumps({"sample_id": f"s{k}", "user_id": k, "item_id": 1, "position": 0,
                       "label": k % 2, "impression_ts_ms": k}).encode()


def test_records_come_in_order_decoded_and_exactly_as_asked():
    src = FakeSource([(k, sample(k)) for k in range(5000)] + [(5000, b"{bad")])
    pf = Prefetcher(lambda: src, max_chunks=2, poll_records=700)
    got = []
    while sum(map(len, got)) < 5001:
        batch = pf.take(256, 2.0)
        assert 0 < len(batch) <= 256
        got.append(batch)
    recs = Records.concat(got)
    assert recs.offsets.tolist() == list(range(5001)) and set(recs.partitions.tolist()) == {0}
    assert recs.rows[3, 0] == 3 and recs.valid[:5000].all()
    assert not recs.valid[5000]                                  # malformed: keeps its offset
    assert recs.next_offsets() == {0: 5001}
    assert len(pf.take(10, 0.2)) == 0                            # nothing more: returns on time
    assert pf.call("where") == (os.getpid(), "odl-prefetch")
    pf.close()
    assert src.closed


def test_a_failing_source_is_reported():
    def boom():
        raise ConnectionError("no broker")
    pf = Prefetcher(boom)
    with pytest.raises(RuntimeError, match="no broker"):
        pf.call("where")
    with pytest.raises(RuntimeError, match="no broker"):
        pf.take(1, 0.1)


def _spec_values(n: int, bad_at: int | None = None) -> tuple:
    import orjson

    from odl.spec import SPECS_DIR, EventValidator, load_spec
    from odl.spec.sample import sample_record
    from odl.spec.synth import synthetic_rows
    spec = load_spec(SPECS_DIR / "criteo.yaml")
    check = EventValidator(spec.events).check
    values = []
    for k, row in enumerate(synthetic_rows(spec, n, seed=2)):
        ev = check(row, now_ms=row["ts_ms"])[1]
        values.append(orjson.dumps(sample_record(spec, f"c{k}", ev["ts_ms"], k % 2, ev)))
    if bad_at is not None:
        values[bad_at] = b'{"sample_id": "x", "ts_ms": 5, "label": 7}'
    return spec, values


def _process_prefetcher(values, codec, **kw) -> ProcessPrefetcher:
    return ProcessPrefetcher(partial(FakeSource, list(enumerate(values))), codec.process_decoder(),
                             width=codec.layout.width, absorb=codec.absorb, **kw)


def _take_all(pf, n: int) -> Records:
    got, have = [], 0
    while have < n:
        got.append(pf.take(min(512, n - have), 10.0))
        assert len(got[-1])
        have += len(got[-1])
    return Records.concat(got)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_decode_process_gives_the_rows_the_thread_gives():
    """Fetching and decoding in a child process: the same rows, refusals and moments as in the
    thread, in order; calls run in the child; the child is gone after close."""
    from trainers.spec_samples import SpecCodec
    spec, values = _spec_values(1500, bad_at=1234)
    want = SpecCodec(spec).decode_records([0] * len(values), list(range(len(values))), values)
    codec = SpecCodec(spec)
    pf = _process_prefetcher(values, codec, poll_records=700)
    recs = _take_all(pf, len(values))
    assert recs.offsets.tolist() == list(range(len(values)))
    assert (recs.rows == want.rows).all() and (recs.valid == want.valid).all()
    assert not recs.valid[1234] and len(codec.rejected) == 1 and "label 7" in codec.rejected[0]
    child = pf._child.pid
    assert pf.call("where")[0] == child != os.getpid() and pf.call("left") == 0
    with pytest.raises(RuntimeError, match="AttributeError"):
        pf.call("no_such_method")
    pf.close()
    assert _gone(child)


def test_the_child_sends_no_more_chunks_than_the_trainer_grants():
    """Credit: with two chunks untaken the child stops fetching -- and still answers calls (a
    call must not wait behind chunks nobody reads).  Paused, it fetches nothing."""
    from trainers.spec_samples import SpecCodec
    spec, values = _spec_values(2000)
    pf = _process_prefetcher(values, SpecCodec(spec), max_chunks=2, poll_records=100)
    deadline = time.monotonic() + 20
    while pf._chunks.qsize() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    assert pf._chunks.qsize() == 2 and pf.call("left") == 1800
    assert len(pf.take(150, 5.0)) == 150         # one chunk and half of the next: one more comes
    pf.call("set_paused", True)
    time.sleep(0.3)
    left = pf.call("left")
    assert left in (1700, 1800)                  # the credited chunk, if fetched before the pause
    assert len(pf.take(1000, 1.0)) == (1800 - left) + 50 and pf.call("left") == left
    pf.call("set_paused", False)
    assert len(_take_all(pf, left)) == left
    pf.close()


def test_a_dead_decode_process_is_reported_not_waited_for():
    from trainers.spec_samples import SpecCodec
    spec, values = _spec_values(50)
    pf = _process_prefetcher(values, SpecCodec(spec))
    assert pf.take(50, 10.0).valid.all()
    child = pf._child.pid
    os.kill(child, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"decode process {child} died"):
        while True:
            pf.take(1, 0.2)
    with pytest.raises(RuntimeError, match=f"decode process {child} died"):
        pf.call("left")
    assert time.monotonic() - t0 < 10
    pf.close()


def test_a_source_that_cannot_open_in_the_child_is_reported():
    from trainers.spec_samples import SpecCodec
    spec, _ = _spec_values(1)
    pf = ProcessPrefetcher(partial(FakeSource, 42), SpecCodec(spec).process_decoder())
    with pytest.raises(RuntimeError, match="TypeError"):       # list(42)
        pf.call("left")
    pf.close()


def test_moments_come_back_from_the_decode_process_and_a_restore_goes_to_it():
    from tests.unit.test_spec_samples import standardized_docs
    from trainers.spec_samples import SpecCodec
    spec, docs = standardized_docs()
    local = SpecCodec(spec)
    first = local.decode_records([0] * 17, range(17), docs[:17])
    codec = SpecCodec(spec)
    pf = _process_prefetcher(docs[:17], codec)
    got = _take_all(pf, 17)
    pf.close()
    assert codec.numeric_moments() == local.numeric_moments() and codec.numeric_moments()["x"][0]
    assert (got.moments == first.moments).all()
    # a restore sets the parent's moments; the next process starts from them
    codec.set_numeric_moments({"x": [5.0, 10.0, 30.0]})
    local.set_numeric_moments({"x": [5.0, 10.0, 30.0]})
    want = local.decode_records([0] * 23, range(23), docs[17:])
    pf = _process_prefetcher(docs[17:], codec)
    got = _take_all(pf, 23)
    pf.close()
    assert (got.rows == want.rows).all() and codec.numeric_moments() == local.numeric_moments()


def test_a_call_after_the_source_side_ended_fails_at_once():
    """Nobody would answer it: it fails now rather than after its timeout, in both places."""
    from trainers.spec_samples import SpecCodec
    spec, values = _spec_values(10)
    for pf in (Prefetcher(lambda: FakeSource([])), _process_prefetcher(values, SpecCodec(spec))):
        assert pf.call("left") in range(11)             # answered while it runs
        pf.close()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="closed"):
            pf.call("left", timeout_s=20)
        assert time.monotonic() - t0 < 2
