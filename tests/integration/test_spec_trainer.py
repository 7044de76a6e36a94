"""The streaming trainer on a feature spec's samples (``trainers.spec_samples``), on the real
broker: every sound record trained once (duplicates and malformed records counted, not trained),
the spec's model learns, and a checkpoint restores into a trainer of the same spec only."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from odl import names
from odl.kafka_util import ensure_topics, producer
from odl.spec import SPECS_DIR, EventValidator, SpecMismatch, parse_spec
from odl.spec.sample import sample_record
from odl.spec.synth import synthetic_rows
from tests.conftest import make_config
from trainers.samples import DefaultCodec
from trainers.spec_samples import SpecCodec
from trainers.streaming import StreamingTrainer

N = 6000
DUPLICATES = 40
MALFORMED = [b"{", orjson.dumps({"sample_id": "x", "ts_ms": 1, "label": 3, "fields": {}})]


def _drain(tr: StreamingTrainer, produced: int) -> None:
    """Train until the trainer has consumed all ``produced`` records (one partition)."""
    deadline = time.monotonic() + 120
    while tr.positions.get(0, 0) < produced:
        assert time.monotonic() < deadline, f"consumed {tr.positions} of {produced}"
        tr.step(tr.poll_batch(timeout_s=0.5))
    tr.step(None, flush=True)


def test_spec_samples_train_once_and_restore_under_their_spec(tmp_path: Path, broker_port: int):
    # adlog with a standardised numeric input: its running moments are checkpointed too
    spec = parse_spec((SPECS_DIR / "adlog.yaml").read_text()
                      .replace("    is_attributed:", "    bid: {type: float, min: 0}\n    is_attributed:")
                      .replace("label:\n", "numeric:\n  bid: {field: bid, transform: standardize}\n"
                               "label:\n"))
    check = EventValidator(spec.events).check
    records = []
    for k, row in enumerate(synthetic_rows(spec, N, seed=3, vocab=300)):
        ev = check(row, now_ms=row["ts_ms"])[1]
        records.append(orjson.dumps(sample_record(spec, f"ad-{k}", ev["ts_ms"],
                                                  int(ev["is_attributed"]), ev)))
    stream = records[:N // 2] + MALFORMED + records[N // 2:] + records[:DUPLICATES]
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "partitions": 1, "topic_prefix": f"spec{os.getpid()}."},
                      trainer={"batch_size": 128, "max_batch_wait_ms": 200,
                               "frozen_baseline_after": None, "delayed_feedback": False,
                               "align_labels": False, "hidden_units": [32, 16]})
    ensure_topics(cfg)
    prod = producer(cfg)
    topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
    for v in stream:
        prod.send(topic, value=v)
    prod.flush()
    prod.close()

    tr = StreamingTrainer(cfg, codec=SpecCodec(spec))
    _drain(tr, len(stream))
    assert (tr.trained, tr.duplicates, tr.malformed) == (N, DUPLICATES, len(MALFORMED))
    assert set(tr.model.tables) == set(spec.tables)
    assert tr.validator.summary()["auc"] > 0.6      # the synthetic label is learnable
    tr.checkpoint("full")
    moments = tr.numeric_moments       # of the records taken: all of them, here
    assert moments == tr.codec.numeric_moments()
    probe = tr.codec.to_batch(tr.codec.decode_records([0] * 64, list(range(64)), records[:64]).rows)
    before = tr.model.predict(probe)
    tr.close()

    again = StreamingTrainer(cfg, codec=SpecCodec(spec))
    assert again.restored_from is not None and again.model.step == tr.model.step
    np.testing.assert_allclose(again.model.predict(probe), before, rtol=1e-5)
    assert moments["bid"][0] > N / 2 and again.numeric_moments == moments
    again.close()
    with pytest.raises(SpecMismatch, match="adlog|feature spec"):
        StreamingTrainer(cfg, codec=DefaultCodec())
