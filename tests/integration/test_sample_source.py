"""The trainer's sample source against the real broker: its end offsets, and its backlog (what
a quiet-stream check asks before cutting a partial batch), which counts the records past the
trainer's positions, or past where the source took a partition up when the trainer has taken
none from it yet.  Both use the fetch responses' high watermarks: tansu answers ListOffsets with
its last batch's base offset + 1 (1 for a partition holding one batch of 10 records)."""
from __future__ import annotations

import time
import uuid

from odl import names
from odl.kafka_util import ensure_topics, producer
from tests.conftest import make_config
from trainers.kafka_source import SampleSource


def test_end_offsets_and_backlog_count_the_records_past_the_trainers_positions(tmp_path, broker_port):
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "partitions": 2,
                                       "topic_prefix": f"ss{uuid.uuid4().hex[:6]}."})
    ensure_topics(cfg)
    topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
    prod = producer(cfg)
    for k in range(10):
        prod.send(topic, value=b"{}", partition=0)
    for k in range(3):
        prod.send(topic, value=b"{}", partition=1)
    prod.flush()
    prod.close()
    fresh = SampleSource(cfg, topic, "ss-test", None, {})
    later = SampleSource(cfg, topic, "ss-test", None, {0: 7})     # restored from a checkpoint
    try:
        deadline = time.monotonic() + 30
        for source, n in ((fresh, 13), (later, 6)):               # as the prefetcher does
            got = []
            while len(got) < n and time.monotonic() < deadline:
                got += source.fetch(100, 1.0)
            assert len(got) == n
        assert fresh.end_offsets() == {0: 10, 1: 3}
        assert fresh.backlog({}) == 13
        assert fresh.backlog({0: 4}) == 6 + 3
        assert fresh.backlog({0: 10, 1: 3}) == 0
        assert later.backlog({}) == 3 + 3                  # partition 0 taken up at offset 7
    finally:
        fresh.close()
        later.close()
