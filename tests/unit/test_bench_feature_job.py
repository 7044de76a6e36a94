"""``odl bench feature-job`` counts what the full job emits: a sample per impression, a second
(provisional) one with delayed feedback, a DLQ record per malformed event.  Counting one sample
per impression under delayed feedback put the throughput's 95 % mark at about half the events
and doubled the figure (docs/features.md, "Throughput")."""
from __future__ import annotations

from bench.feature_job import Backlog
from odl.config import Config
from pipeline.feature_sql import JobTopics
from pipeline.generator import Record


def _backlog(delayed_feedback: bool) -> Backlog:
    cfg = Config()
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"delayed_feedback": delayed_feedback})})
    kinds = ["impression"] * 7 + ["click"] * 2 + ["malformed"]
    events = [Record(k, b"k", b"{}", k, kind) for k, kind in enumerate(kinds)]
    return Backlog(cfg, "127.0.0.1:1", JobTopics("e", "s", "d", "f"), events, 0.0)


def test_expected_outputs_count_the_provisional_samples():
    assert _backlog(delayed_feedback=True).expected_outputs == 2 * 7 + 1
    assert _backlog(delayed_feedback=False).expected_outputs == 7 + 1
    assert Config().delayed_feedback     # the default the benchmark runs with
