"""The offset-gap guard (``odl.offset_gaps``): records leave in offset order with none missing;
a gap is fetched again until it fills, or stepped over once it outlasts the wait."""
from odl.offset_gaps import GapGuard


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def recs(p, offsets):
    return [(p, o, f"v{p}.{o}") for o in offsets]


def test_contiguous_records_pass_and_a_later_batch_first_is_refetched_until_it_fills():
    clock = Clock()
    g = GapGuard("t", wait_s=5.0, clock=clock)
    g.start(0, 10)
    out, rewind = g.admit(recs(0, [10, 11]) + recs(1, [3, 4]))
    assert [r[:2] for r in out] == [(0, 10), (0, 11), (1, 3), (1, 4)] and rewind == {}
    # offsets 12..14 are not stored yet: 15.. arrives first; partition 1 goes on meanwhile
    out, rewind = g.admit(recs(0, [15, 16]) + recs(1, [5]))
    assert [r[:2] for r in out] == [(1, 5)] and rewind == {0: 12} and g.waiting == {0: 12}
    clock.t = 1.0
    out, rewind = g.admit(recs(0, [15]))            # still missing
    assert out == [] and rewind == {0: 12}
    out, rewind = g.admit(recs(0, [12, 13, 14, 15, 16]))
    assert [r[1] for r in out] == [12, 13, 14, 15, 16] and rewind == {}
    assert (g.waited, g.stepped_over, g.waiting) == (1, 0, {})
    out, _ = g.admit(recs(0, [15, 16, 17]))          # a repeat after a seek back
    assert [r[1] for r in out] == [17]


def test_a_gap_that_never_fills_is_stepped_over_after_the_wait():
    clock = Clock()
    g = GapGuard("t", wait_s=5.0, clock=clock)
    g.start(2, 0)
    assert g.admit(recs(2, [0, 1, 4]))[1] == {2: 2}
    clock.t = 4.9
    assert g.admit(recs(2, [4]))[1] == {2: 2}
    clock.t = 5.0
    out, rewind = g.admit(recs(2, [4, 5]))
    assert [r[1] for r in out] == [4, 5] and rewind == {}
    assert (g.waited, g.stepped_over) == (0, 2)


def test_no_wait_steps_over_at_once_and_an_unknown_start_trusts_the_first_record():
    g = GapGuard("t", wait_s=0.0, clock=Clock())
    out, rewind = g.admit(recs(0, [7, 9]))
    assert [r[1] for r in out] == [7, 9] and rewind == {} and g.stepped_over == 1


class _Msg:
    def __init__(self, p, o):
        self.p, self.o = p, o

    def error(self):
        return None

    def partition(self):
        return self.p

    def offset(self):
        return self.o

    def value(self):
        return b"%d" % self.o


class _TansuLikeConsumer:
    """One partition whose offsets 2..3 are stored only after 4..5 became readable."""

    def __init__(self, conf):
        self.log = [0, 1, 4, 5]
        self.pos = 0
        self.seeks = []

    def list_topics(self, topic, timeout):
        from types import SimpleNamespace
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions={0: None})})

    def committed(self, tps, timeout):
        return tps

    def get_watermark_offsets(self, tp, timeout):
        return (0, 6)

    def assign(self, tps):
        self.pos = tps[0].offset if tps[0].offset >= 0 else 0

    def consume(self, num_messages, timeout):
        got = [_Msg(0, o) for o in self.log if o >= self.pos][:num_messages]
        self.pos = got[-1].o + 1 if got else self.pos
        return got

    def seek(self, tp):
        self.seeks.append(tp.offset)
        self.pos = tp.offset
        self.log = [0, 1, 2, 3, 4, 5]    # the slow batch is stored now

    def close(self):
        pass


def test_the_trainers_source_reads_a_late_stored_batch_instead_of_skipping_it(monkeypatch, tmp_path):
    from tests.conftest import make_config
    from trainers import kafka_source
    monkeypatch.setattr(kafka_source, "Consumer", _TansuLikeConsumer)
    src = kafka_source.SampleSource(make_config(tmp_path), "samples", "g", None, {})
    first = src.fetch(100, 0.1)
    assert [o for _, o, _ in first] == [0, 1] and src._c.seeks == [2]
    assert [o for _, o, _ in src.fetch(100, 0.1)] == [2, 3, 4, 5]
