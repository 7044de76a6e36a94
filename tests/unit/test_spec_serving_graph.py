"""The serving graph of a spec's model (``exporters.spec_savedmodel``): loaded from disk, plain
and optimised give the trainer's own predictions; bfloat16 dense layers stay close."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import tensorflow as tf

from exporters import spec_savedmodel
from odl.config import TrainerConfig
from odl.spec import SPECS_DIR, EventValidator, load_spec
from odl.spec.net import PACKED_SIGNATURE, pack_request
from odl.spec.sample import sample_record
from odl.spec.synth import synthetic_rows
from trainers.spec_samples import SpecCodec


@pytest.mark.parametrize("name", ["movielens", "criteo"])
def test_exported_graphs_score_as_the_trainer_does(name, tmp_path: Path):
    spec = load_spec(SPECS_DIR / f"{name}.yaml")
    check = EventValidator(spec.events).check
    lab = spec.label
    recs = []
    for k, row in enumerate(synthetic_rows(spec, 600, seed=2)):
        ev = check(row, now_ms=row[spec.events.time_field])[1]
        v = float(ev[lab.field])
        y = int(v >= lab.threshold if lab.threshold is not None else v > 0)
        seq = {s: [row.get(x.value) for _ in range(2)] for s, x in spec.realtime.sequences.items()}
        recs.append(orjson.dumps(sample_record(spec, f"s{k}", ev[spec.events.time_field], y, ev,
                                               sequences=seq)))
    codec = SpecCodec(spec)
    rows = codec.decode_records([0] * len(recs), list(range(len(recs))), recs).rows
    model = codec.new_model(TrainerConfig(hidden_units=[32, 16]))
    for k in range(0, 512, 128):
        model.train(codec.to_batch(rows[k:k + 128]))
    batch = codec.to_batch(rows[512:])
    want = model.predict(batch)

    # the request serving would build: each input's vectors (row 0 where a key is unknown)
    r, mask = model._rows(batch, False, model.step)
    req = {f"{i.name}_emb": tf.gather(model.tables[i.table].var, r[:, a:b])
           for i, (a, b) in zip(model.net.inputs, model.net.spans)}
    req.update(mask=mask, numeric=tf.constant(batch.numeric))
    weights = model.dense_weights()
    spec_savedmodel.save(model.net, weights, tmp_path / "plain")
    report = spec_savedmodel.save_optimised(model.net, weights, tmp_path / "opt")
    spec_savedmodel.save_optimised(model.net, weights, tmp_path / "bf16", precision="bfloat16")
    sigs = {d: tf.saved_model.load(str(tmp_path / d)).signatures for d in ("plain", "opt", "bf16")}
    got = {d: s["serving_default"](**req)["probability"].numpy() for d, s in sigs.items()}
    # the packed request (what a replica sends the optimised graph) scores the same
    packed = pack_request(model.net, {k: np.asarray(v) for k, v in req.items()})
    assert set(packed) == set(model.net.request_shapes(packed=True))
    if name == "criteo":     # 26 single-valued inputs of one dim: 3 tensors instead of 28
        assert sorted(packed) == ["mask", "numeric", "singles_16"] and len(req) == 28
    for d in ("opt", "bf16"):
        got[f"{d}-packed"] = sigs[d][PACKED_SIGNATURE](**packed)["probability"].numpy()
    assert PACKED_SIGNATURE not in sigs["plain"]
    np.testing.assert_allclose(got["plain"], want, atol=1e-6)
    np.testing.assert_allclose(got["opt"], want, atol=1e-6)
    np.testing.assert_allclose(got["opt-packed"], want, atol=1e-6)
    assert np.abs(got["bf16"] - want).max() < 0.02
    np.testing.assert_allclose(got["bf16-packed"], got["bf16"], atol=1e-6)
    assert report["precision"] == "float32"


def test_a_reduced_precision_is_published_only_within_its_tolerance(tmp_path: Path):
    spec = load_spec(SPECS_DIR / "criteo.yaml")
    model = SpecCodec(spec).new_model(TrainerConfig(hidden_units=[64, 32]))
    net, weights = model.net, model.dense_weights()
    err = spec_savedmodel.precision_error(net, weights, "bfloat16")
    assert 0 < err < 0.02
    ok = spec_savedmodel.save_published(net, weights, tmp_path / "a", True, "bfloat16", 0.02)
    assert ok["precision"] == "bfloat16" and ok["precision_check"]["max_diff"] == err
    strict = spec_savedmodel.save_published(net, weights, tmp_path / "b", True, "bfloat16", err / 2)
    assert strict["precision"] == "float32" and strict["precision_check"]["wanted"] == "bfloat16"
    req = spec_savedmodel.probe_request(net, 64, seed=3)
    fp32, bf16 = (tf.saved_model.load(str(tmp_path / d)).signatures["serving_default"](**req)
                  ["probability"].numpy() for d in ("b", "a"))
    assert np.abs(fp32 - bf16).max() <= err * 1.5 and not np.array_equal(fp32, bf16)
    assert spec_savedmodel.save_published(net, weights, tmp_path / "c", False) is None


def test_a_reduced_precision_for_the_default_shape_is_refused(tmp_path: Path):
    from exporters.exporter import Exporter
    from odl.control import ControlPlane
    from tests.conftest import make_config
    cfg = make_config(tmp_path, exporter={"precision": "bfloat16"})
    with pytest.raises(ValueError, match="exporter.precision bfloat16 applies to a declared spec"):
        Exporter(cfg, None, ControlPlane(cfg), None, r=object())
