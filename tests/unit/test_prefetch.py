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
