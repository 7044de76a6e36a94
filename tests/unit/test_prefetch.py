"""The prefetch thread: decodes ahead, hands out exactly the records asked for, in order, runs
calls on its own thread, and surfaces a failing source instead of hanging."""
import json
import threading
import time

import pytest

from trainers.prefetch import Prefetcher
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
    assert pf.call(lambda s: threading.current_thread().name) == "odl-prefetch"
    pf.close()
    assert src.closed


def test_a_failing_source_is_reported():
    def boom():
        raise ConnectionError("no broker")
    pf = Prefetcher(boom)
    with pytest.raises(RuntimeError, match="no broker"):
        pf.call(lambda s: None)
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


def test_a_decode_process_gives_the_rows_the_thread_gives():
    """Decoding in a child process (``trainers.decode_process``): the same rows, refusals and
    moments as in the thread, in order, and the child is gone after close."""
    from trainers.spec_samples import SpecCodec
    spec, values = _spec_values(1500, bad_at=1234)
    want = SpecCodec(spec).decode_records([0] * len(values), list(range(len(values))), values)
    codec = SpecCodec(spec)
    src = FakeSource(list(enumerate(values)))
    pf = Prefetcher(lambda: src, poll_records=700, decode=codec.decode_records,
                    width=codec.layout.width, process_decoder=codec.process_decoder(),
                    absorb=codec.absorb)
    got = []
    while sum(map(len, got)) < len(values):
        got.append(pf.take(512, 10.0))
        assert len(got[-1])
    recs = Records.concat(got)
    assert recs.offsets.tolist() == list(range(len(values)))
    assert (recs.rows == want.rows).all() and (recs.valid == want.valid).all()
    assert not recs.valid[1234] and len(codec.rejected) == 1 and "label 7" in codec.rejected[0]
    pf.close()
    assert src.closed


def test_a_dead_decode_process_is_reported_not_waited_for():
    import os
    import signal

    from trainers.decode_process import DecodeFailed, DecodeProcess
    from trainers.spec_samples import SpecCodec
    spec, values = _spec_values(50)
    proc = DecodeProcess(SpecCodec(spec).process_decoder())
    proc.submit(values)
    assert proc.result().valid.all()
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(DecodeFailed, match=f"decode process {proc.pid} (died|is gone)"):
        proc.submit(values)
        proc.result()
    proc.close()


def test_moments_come_back_from_the_decode_process_and_a_restore_goes_to_it():
    from tests.unit.test_spec_samples import standardized_docs
    from trainers.decode_process import DecodeProcess
    from trainers.spec_samples import SpecCodec
    spec, docs = standardized_docs()
    local = SpecCodec(spec)
    local.decode_records([0] * 17, range(17), docs[:17])
    codec = SpecCodec(spec)
    proc = DecodeProcess(codec.process_decoder())
    proc.submit(docs[:17])
    codec.absorb(proc.result())
    proc.close()
    assert codec.numeric_moments() == local.numeric_moments() and codec.numeric_moments()["x"][0]
    # a restore sets the parent's moments; the next process starts from them
    codec.set_numeric_moments({"x": [5.0, 10.0, 30.0]})
    local.set_numeric_moments({"x": [5.0, 10.0, 30.0]})
    want = local.decode_records([0] * 23, range(23), docs[17:])
    proc = DecodeProcess(codec.process_decoder())
    proc.submit(docs[17:])
    got = proc.result()
    proc.close()
    assert (got.rows == want.rows).all() and got.moments == local.numeric_moments()
