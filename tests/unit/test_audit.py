"""The ledger audit (``trainers.audit``): what it counts as lost, and how a loss is looked up."""
import json

import numpy as np

from trainers.audit import audit, records_of
from trainers.samples import DefaultCodec, row_key


def _value(rid, label, provisional=False):
    return json.dumps({"sample_id": f"{rid}:2", "request_id": rid, "user_id": 1, "item_id": 2,
                       "position": 0, "hour": 1, "label": label, "impression_ts_ms": 1_000,
                       "provisional": provisional}).encode()


def _records(values):
    return [(0, off, v) for off, v in enumerate(values)]


def test_a_key_the_ledger_lacks_is_lost_and_its_records_can_be_looked_up():
    codec = DefaultCodec()
    recs = _records([_value("a", 1), _value("b", 0), _value("a", 1), b"not json"])
    ledger = np.array([row_key("b:2", False)], np.int64)
    result = audit(codec, recs, ledger, delayed=False)
    assert (result.expected, result.lost, result.dup, result.malformed) == (2, 1, 0, 1)
    assert result.lost_keys == (row_key("a:2", False),)
    found = records_of(codec, recs, result.lost_keys)
    assert [(k, p, o) for k, p, o, _ in found] == [(row_key("a:2", False), 0, 0),
                                                  (row_key("a:2", False), 0, 2)]
    assert "lost_keys" not in result.as_dict()


def test_with_delayed_feedback_a_positive_after_a_final_negative_is_expected():
    """The job may send an impression's final negative and, after a restore, its positive:
    the positive is a click that happened and must be trained."""
    codec = DefaultCodec()
    recs = _records([_value("a", 0, True), _value("a", 0), _value("a", 1)])
    ledger = np.array([row_key("a:2", True)], np.int64)
    result = audit(codec, recs, ledger, delayed=True)
    assert (result.expected, result.lost) == (2, 1)
    assert result.lost_keys == (row_key("a:2", False),)


def test_impressions_sent_with_both_labels_are_counted_with_which_came_first():
    codec = DefaultCodec()
    recs = _records([_value("a", 0), _value("a", 1), _value("b", 1), _value("b", 0),
                     _value("c", 0), _value("c", 0), _value("d", 1, False), _value("e", 0, True)])
    result = audit(codec, recs, np.zeros(0, np.int64), delayed=False)
    assert (result.relabelled, result.relabelled_negative_first) == (2, 1)
