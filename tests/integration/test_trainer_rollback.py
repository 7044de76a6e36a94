"""`odl rollback --trainer`'s mechanism on the real broker: the live trainer goes back to a
named checkpoint (model, duplicate window, figures, position) and either replays the samples
since -- each trained again exactly once -- or skips ahead to the newest; a restart resumes
from the rolled-back state; and the request travels through the control plane to the loop."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from odl import names
from odl.control import ControlPlane
from odl.kafka_util import ensure_topics, producer
from odl.spec import SPECS_DIR, EventValidator, load_spec
from odl.spec.sample import sample_record
from odl.spec.synth import synthetic_rows
from tests.conftest import make_config
from tests.integration.test_spec_trainer import _drain
from trainers.spec_samples import SpecCodec
from trainers.streaming import StreamingTrainer

pytestmark = pytest.mark.slow
N = 3000


def _setup(tmp_path: Path, broker_port: int, redis_port: int):
    spec = load_spec(SPECS_DIR / "adlog.yaml")
    check = EventValidator(spec.events).check
    records = [orjson.dumps(sample_record(spec, f"ad-{k}", ev["ts_ms"], int(ev["is_attributed"]), ev))
               for k, row in enumerate(synthetic_rows(spec, N, seed=5, vocab=200))
               for ev in [check(row, now_ms=row["ts_ms"])[1]]]
    cfg = make_config(tmp_path, kafka={"bootstrap_servers": f"127.0.0.1:{broker_port}",
                                       "partitions": 1, "topic_prefix": f"rb{os.getpid()}{time.time_ns()}."},
                      redis={"port": redis_port},
                      trainer={"batch_size": 100, "max_batch_wait_ms": 200,
                               "frozen_baseline_after": None, "hidden_units": [16]})
    ensure_topics(cfg)
    return spec, records, cfg


def _send(cfg, records) -> None:
    prod = producer(cfg)
    for v in records:
        prod.send(names.topic(names.SAMPLES, cfg.kafka.topic_prefix), value=v)
    prod.flush()
    prod.close()


@pytest.mark.parametrize("skip_ahead", [False, True])
def test_rollback_replays_or_skips_ahead(tmp_path, broker_port, redis_port, skip_ahead):
    spec, records, cfg = _setup(tmp_path, broker_port, redis_port)
    _send(cfg, records[:1000])
    tr = StreamingTrainer(cfg, codec=SpecCodec(spec))
    _drain(tr, 1000)
    at = tr.checkpoint("full")
    probe = tr.codec.to_batch(tr.codec.decode_records([0] * 50, list(range(50)), records[:50]).rows)
    then = tr.model.predict(probe)
    _send(cfg, records[1000:2000])
    _drain(tr, 2000)
    tr.checkpoint("incr")
    assert tr.trained == 2000 and np.abs(tr.model.predict(probe) - then).max() > 1e-4

    out = tr.rollback_to(at.path.name, skip_ahead=skip_ahead)
    assert out["step"] == int(at.meta["step"]) and tr.trained == 1000
    np.testing.assert_allclose(tr.model.predict(probe), then, rtol=1e-5)
    assert tr.positions == ({0: 2000} if skip_ahead else {0: 1000})
    _send(cfg, records[2000:])
    _drain(tr, N)
    # replay: the 1,000 samples after the checkpoint train again, once (they are new to the
    # restored duplicate window); skip-ahead: they are never trained
    assert tr.trained == (N - 1000 if skip_ahead else N) and tr.duplicates == 0
    tr.close()
    # a restart resumes from the rolled-back state's own checkpoint, not the newer chain
    again = StreamingTrainer(cfg, codec=SpecCodec(spec))
    assert again.restored_from == out["written"] and again.model.step == out["step"]
    again.close()


def test_a_rollback_request_reaches_the_loop_once(tmp_path, broker_port, redis_port):
    from trainers.loop import TrainerLoop
    import redis
    redis.Redis(port=redis_port).flushall()
    spec, records, cfg = _setup(tmp_path, broker_port, redis_port)
    cfg = cfg.model_copy(update={"spec": SPECS_DIR / "adlog.yaml"})
    _send(cfg, records[:600])
    loop = TrainerLoop(cfg)
    _drain(loop.trainer, 600)
    at = loop.trainer.checkpoint("full")
    _send(cfg, records[600:900])
    _drain(loop.trainer, 900)
    cp = ControlPlane(cfg)
    rid = cp.request_trainer_rollback(at.path.name, skip_ahead=False, version="1")
    loop._follow_control_plane()
    done = cp.trainer_rolled_back()
    assert done["id"] == rid and done["ok"] and done["checkpoint"] == at.path.name
    assert loop.trainer.trained == 600
    written = done["written"]
    loop._follow_control_plane()                      # answered: not done twice
    assert cp.trainer_rolled_back()["written"] == written
    cp.request_trainer_rollback("ckpt-99999999-full", skip_ahead=False, version="1")
    loop._follow_control_plane()
    bad = cp.trainer_rolled_back()
    assert not bad["ok"] and "ckpt-99999999-full is not in" in bad["reason"]
    loop.trainer.close()
