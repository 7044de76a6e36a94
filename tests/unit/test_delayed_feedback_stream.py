"""Delayed feedback in the streaming trainer: provisional negatives are trained at once, positives
importance-weighted, final negatives only settle the figures; each impression is judged by its
score at impression time against its final label."""
import json

import numpy as np
import pytest

from odl.config import ConfigError, load_config
from pipeline.feature_sql import JobTopics, statements
from tests.conftest import make_config
from trainers.samples import PROVISIONAL, SID, decode, decode_records, sample_hash
from trainers.streaming import StreamingTrainer


def _rec(rid, label, provisional=False, user=1, item=2, ts=1_000):
    return json.dumps({"sample_id": f"{rid}:{item}", "request_id": rid, "user_id": user,
                       "item_id": item, "position": 0, "hour": 1, "label": label,
                       "impression_ts_ms": ts, "provisional": provisional}).encode()


def _records(values, start=0):
    return decode_records([0] * len(values), list(range(start, start + len(values))), values)


def test_provisional_and_final_samples_are_told_apart():
    prov, final = decode(_rec("r", 0, True)), decode(_rec("r", 0))
    assert prov[PROVISIONAL] == 1 and final[PROVISIONAL] == 0
    assert final[SID] == sample_hash("r:2") and prov[SID] != final[SID]   # no false duplicate
    recs = _records([_rec("r", 1, True), _rec("s", 0, "yes")])   # a positive cannot be provisional
    assert recs.valid.tolist() == [False, False]


@pytest.fixture
def trainer(tmp_path):
    cfg = make_config(tmp_path, trainer={"delayed_feedback": True, "batch_size": 4,
                                         "frozen_baseline_after": None,
                                         "checkpoint": {"restore": False}})
    t = StreamingTrainer(cfg)
    yield t
    t.close()


def test_stream_trains_provisional_and_positives_and_settles_negatives(trainer):
    imps = [_rec(f"r{k}", 0, True, user=k, item=k) for k in range(4)]
    assert trainer.step(_records(imps), flush=True) == 4          # trained at once, before labels
    assert trainer.validator.seen == 0 and len(trainer.provisional) == 4
    finals = [_rec("r0", 1, user=0, item=0), _rec("r1", 0, user=1, item=1),
              _rec("r2", 0, user=2, item=2), _rec("r0", 1, user=0, item=0)]   # a repeat
    assert trainer.step(_records(finals, 4), flush=True) == 1     # only the positive is trained
    assert trainer.duplicates == 1 and trainer.settled_negatives == 2
    assert trainer.validator.seen == 3                              # judged with final labels
    assert sorted(trainer.validator.labels) == [0.0, 0.0, 1.0]
    assert len(trainer.provisional) == 1                            # r3 still awaits its label
    m = trainer.metrics()
    assert m["delayed_feedback"] and m["awaiting_labels"] == 1


def test_without_delayed_feedback_provisional_samples_are_not_trained(tmp_path):
    cfg = make_config(tmp_path, trainer={"delayed_feedback": False, "batch_size": 2,
                                         "checkpoint": {"restore": False}})
    t = StreamingTrainer(cfg)
    try:
        assert t.step(_records([_rec("a", 0, True), _rec("a", 1)]), flush=True) == 1
    finally:
        t.close()


def test_job_emits_provisional_samples_only_in_delayed_mode(tmp_path):
    topics = JobTopics("events", "samples", "dlq", "features")
    for on in (False, True):
        cfg = make_config(tmp_path, trainer={"delayed_feedback": on})
        inserts = statements(cfg, topics)[1]
        assert sum("TRUE\n" in i and "samples_sink" in i for i in inserts) == int(on)


def test_delayed_feedback_is_on_unless_labels_are_aligned(tmp_path):
    assert make_config(tmp_path).delayed_feedback
    aligned = make_config(tmp_path, trainer={"align_labels": True})
    assert not aligned.delayed_feedback and aligned.label_alignment
    assert not make_config(tmp_path).label_alignment


def test_delayed_feedback_and_alignment_exclude_each_other(tmp_path, monkeypatch):
    monkeypatch.setenv("ODL__TRAINER__DELAYED_FEEDBACK", "true")
    monkeypatch.setenv("ODL__TRAINER__ALIGN_LABELS", "true")
    with pytest.raises(ConfigError, match="delayed_feedback"):
        load_config(None)


def test_the_served_versions_shadow_is_scored_on_the_same_samples(trainer):
    """The gate's comparison: a copy of the published snapshot scores every later impression
    beside the live model, judged on the same final labels."""
    imps = [_rec(f"r{k}", 0, True, user=k, item=k) for k in range(4)]
    trainer.step(_records(imps), flush=True)
    with trainer.model.lock:
        trainer.mark_candidate()                 # the exporter's version snapshot
    step = trainer.model.step
    assert not trainer.track_served(step + 1)    # not the step that was kept
    assert trainer.track_served(step) and trainer.served_step == step
    more = [_rec(f"s{k}", 0, True, user=k, item=k) for k in range(4)]
    trainer.step(_records(more, 4), flush=True)
    finals = [_rec("s0", 1, user=0, item=0), _rec("s1", 0, user=1, item=1),
              _rec("r2", 0, user=2, item=2)]      # r2 was scored before the shadow existed
    trainer.step(_records(finals, 8), flush=True)
    shadow = trainer.metrics()["shadow"]
    assert shadow["n"] == 2 and shadow["served_step"] == step
    assert sorted(trainer.paired.labels) == [0.0, 1.0]
    assert trainer.validator.seen == 3


def test_the_gate_compares_candidate_and_served_on_the_same_samples():
    from exporters import gate
    snap = {"weights": {"w": np.ones(2)}, "step": 9, "metrics": {"auc": 0.5, "loss": 0.4}}
    paired = {"n": 800, "auc_live": 0.70, "auc_served": 0.71, "logloss_live": 0.50,
              "logloss_served": 0.49}
    served = {"auc": 0.90}          # a window of other samples: would refuse by 0.4
    ok = gate.check({**snap, "metrics": {**snap["metrics"], "shadow": paired}}, served, 0.02)
    assert ok.ok
    worse = gate.check({**snap, "metrics": {**snap["metrics"], "shadow": {**paired, "auc_live": 0.66}}},
                       served, 0.02)
    assert not worse.ok and "on the same 800 samples" in worse.reason
    lossy = gate.check({**snap, "metrics": {**snap["metrics"], "shadow": {**paired, "logloss_live": 0.60}}},
                       served, 0.02, logloss_margin=0.05)
    assert not lossy.ok and "log-loss" in lossy.reason
    few = gate.check({**snap, "metrics": {**snap["metrics"], "shadow": {**paired, "n": 10}}},
                     served, 0.02)
    assert not few.ok and "worse than the served version's 0.9000" in few.reason   # windows


def test_a_positive_after_its_final_negative_is_still_trained(trainer):
    """After a restore the feature job may send an impression's final negative and then its
    positive (or the reverse).  The negative only settles figures, so it must not make the
    positive look like a repeat: the click happened, and is trained once."""
    assert trainer.step(_records([_rec("r0", 0, True)]), flush=True) == 1
    finals = [_rec("r0", 0), _rec("r0", 1), _rec("r0", 1), _rec("r0", 0)]
    assert trainer.step(_records(finals, 1), flush=True) == 1      # the positive, once
    assert trainer.duplicates == 2 and trainer.settled_negatives == 1
    assert trainer.validator.seen == 1                               # judged once


def test_the_frozen_copy_and_the_live_model_are_judged_on_the_same_samples(tmp_path):
    """The live model's own window reaches back to impressions scored before the copy was
    frozen (by a younger model); the comparison with the copy takes only the samples both
    scored, so ``auc_live_vs_frozen`` and ``auc_frozen`` differ by their models alone."""
    from trainers.metrics import auc
    cfg = make_config(tmp_path, trainer={"delayed_feedback": True, "batch_size": 4,
                                         "frozen_baseline_after": 8,
                                         "checkpoint": {"restore": False}})
    t = StreamingTrainer(cfg)
    try:
        labels = [1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1]       # the last 4: three positives
        imps = [_rec(f"r{k}", 0, True, user=k % 3, item=k % 5) for k in range(12)]
        t.step(_records(imps[:8]), flush=True)
        assert t.frozen is not None and t.vs_frozen.seen == 0    # frozen after 8 samples
        t.step(_records(imps[8:], 8), flush=True)                 # scored by both
        finals = [_rec(f"r{k}", y, user=k % 3, item=k % 5) for k, y in enumerate(labels)]
        t.step(_records(finals, 12), flush=True)
        assert t.validator.seen == 12                              # the live model's window
        m = t.metrics()
        assert m["scored_since_frozen"] == 4
        assert sorted(t.vs_frozen.labels) == [0.0, 1.0, 1.0, 1.0]  # r8..r11 alone
        live, frozen = np.asarray(t.vs_frozen.live), np.asarray(t.vs_frozen.other_scores)
        assert set(live.tolist()) <= set(t.validator.scores)      # their live scores
        y = np.asarray(t.vs_frozen.labels)
        assert m["auc_live_vs_frozen"] == auc(live, y) and m["auc_frozen"] == auc(frozen, y)
    finally:
        t.close()
