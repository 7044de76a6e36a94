"""`odl bench serving-graph`: the optimised SavedModel (``exporters.graph``: folded constants and
BatchNorms, the weight-only cache, the XLA per-request function on batch buckets) vs the plain
Keras SavedModel of the same weights (``exporters.keras_reference``), both written to disk and
loaded with ``tf.saved_model.load(...).signatures["serving_default"]``, at batch 1, 64 and 512,
and candidate scoring (4 users x 100 candidates, rank-3 input: the dense-simplification pass)
against the plain TensorFlow SavedModel's ``score_candidates``.

Rounds alternate between the two models (this VM's neighbours move single figures by +-30%);
each figure is the median round.  A last pass repeats the optimised model while a thread applies
new weights every second through its ``apply_weights`` signature (the cache must keep the gain).
"""
from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from bench.registry import BenchResult
from exporters import keras_reference, savedmodel
from odl.config import Config
from odl.features import NUM_DENSE
from trainers.model import init_dense

DESCRIPTION = "optimised serving graph vs plain Keras SavedModel: throughput, p50/p99 at 1/64/512"
SPEC_HIDDEN = (512, 256, 128)     # --spec: a network of production width
BATCHES = (1, 64, 512)
ROUNDS = 7
CALLS = 150
NAMES = ("user_emb", "item_emb", "position", "hour", "features")
CAND_USERS, CANDIDATES = 4, 100


def _weights(cfg: Config) -> dict[str, np.ndarray]:
    """The configured network with trained-looking BatchNorm statistics."""
    return _trained_looking(init_dense(cfg.trainer))


def _trained_looking(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """BatchNorm statistics moved off their initial values (else folding them is trivial)."""
    rng = np.random.default_rng(0)
    for k in w:
        if k.startswith("bn_"):
            w[k] = (w[k] + rng.random(w[k].shape)).astype(np.float32)
    return w


def _request(batch: int, dim: int, seed: int) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    return dict(zip(NAMES, [tf.constant(rng.normal(size=(batch, dim)).astype(np.float32)),
                            tf.constant(rng.normal(size=(batch, dim)).astype(np.float32)),
                            tf.constant(rng.integers(0, 100, batch)),
                            tf.constant(rng.integers(0, 24, batch)),
                            tf.constant(rng.normal(size=(batch, NUM_DENSE)).astype(np.float32))]))


def _candidates(users: int, candidates: int, dim: int) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(7)
    return dict(zip(NAMES, [tf.constant(rng.normal(size=(users, dim)).astype(np.float32)),
                            tf.constant(rng.normal(size=(users, candidates, dim)).astype(np.float32)),
                            tf.constant(rng.integers(0, 100, (users, candidates))),
                            tf.constant(rng.integers(0, 24, users)),
                            tf.constant(rng.normal(size=(users, candidates, NUM_DENSE)).astype(np.float32))]))


def _round(fn, req) -> list[float]:
    out = []
    for _ in range(CALLS):
        t = time.perf_counter()
        fn(**req)
        out.append(time.perf_counter() - t)
    return out


def _measure(models: dict, req, rounds: int = ROUNDS, min_s: float = 0.0,
             rows: int | None = None) -> dict[str, dict[str, float]]:
    """Alternating rounds of every model; at least ``rounds`` and at least ``min_s`` seconds."""
    for fn in models.values():
        for _ in range(30):
            fn(**req)
    lat: dict[str, list[float]] = {name: [] for name in models}
    rates: dict[str, list[float]] = {name: [] for name in models}
    start, done = time.monotonic(), 0
    while done < rounds or time.monotonic() - start < min_s:
        done += 1
        for name, fn in models.items():
            r = _round(fn, req)
            lat[name].extend(r)
            rates[name].append(len(r) / sum(r))
    batch = rows or int(req["user_emb"].shape[0])
    return {name: {"rows_per_s": float(np.median(rates[name])) * batch,
                   "p50_ms": float(np.percentile(lat[name], 50)) * 1000,
                   "p99_ms": float(np.percentile(lat[name], 99)) * 1000} for name in models}


def run(cfg: Config, spec: str | None = None) -> BenchResult:
    if spec is not None:
        return run_spec(cfg, spec)
    weights = _weights(cfg)
    dim = cfg.trainer.embedding_dim
    with tempfile.TemporaryDirectory(prefix="odl-bench-graph-") as tmp:
        keras_reference.export(weights, dim, Path(tmp) / "keras")
        full_report = savedmodel.save_optimised(weights, dim, Path(tmp) / "optimised")
        report = {**full_report["signatures"]["serve"], "xla": full_report["xla"]}
        savedmodel.save(weights, dim, Path(tmp) / "plain")
        # the other choice of XLA, for the record (the default is XLA only with a GPU)
        savedmodel.save_optimised(weights, dim, Path(tmp) / "other", jit=not report["xla"])
        keras_sig = tf.saved_model.load(str(Path(tmp) / "keras")).signatures["serving_default"]
        opt_model = tf.saved_model.load(str(Path(tmp) / "optimised"))
        opt_sig = opt_model.signatures["serving_default"]
        other = "optimised-xla" if not report["xla"] else "optimised-noxla"
        models = {"keras": keras_sig, "optimised": opt_sig,
                  other: tf.saved_model.load(str(Path(tmp) / "other")).signatures["serving_default"]}
        lines, result = [], {}
        check = _request(64, dim, 99)
        diff = float(np.abs(list(keras_sig(**check).values())[0].numpy().reshape(-1)
                            - opt_sig(**check)["probability"].numpy()).max())
        figures = {}
        for b in BATCHES:
            figures[b] = m = _measure(models, _request(b, dim, b))
            ratio = m["optimised"]["rows_per_s"] / m["keras"]["rows_per_s"]
            result[f"ratio{b}"] = round(ratio, 3)
            result[f"ratio{b}_{other}"] = round(m[other]["rows_per_s"] / m["keras"]["rows_per_s"], 3)
            for name in models:
                lines.append(f"batch {b:>3} {name:<10} {m[name]['rows_per_s']:>12,.0f} rows/s  "
                             f"p50 {m[name]['p50_ms']:.3f} ms  p99 {m[name]['p99_ms']:.3f} ms")
            lines.append(f"batch {b:>3} ratio optimised/keras {ratio:.2f}")

        # the optimised model while weights are applied every second
        apply = opt_model.signatures["apply_weights"]
        keys = sorted(weights)
        stop = threading.Event()
        applied = [0]

        def refresher():
            rng = np.random.default_rng(1)
            while not stop.wait(1.0):
                new = {k.replace("/", "_"): tf.constant(
                    (weights[k] * (1 + 0.01 * rng.standard_normal(weights[k].shape))).astype(np.float32))
                    for k in keys}
                apply(**new)
                applied[0] += 1
        t = threading.Thread(target=refresher, daemon=True)
        t.start()
        try:
            refreshed = {b: _measure({"optimised": opt_sig, "keras": keras_sig},
                                     _request(b, dim, b), rounds=3, min_s=4.0) for b in (64, 512)}
        finally:
            stop.set()
            t.join()
        for b, m in refreshed.items():
            ratio = m["optimised"]["rows_per_s"] / m["keras"]["rows_per_s"]
            result[f"ratio{b}_refreshing"] = round(ratio, 3)
            lines.append(f"batch {b:>3} with weights applied every second: optimised "
                         f"{m['optimised']['rows_per_s']:,.0f} rows/s, ratio {ratio:.2f}")

        # candidate scoring (rank-3 input: the tensordot dense layers the dense pass rewrites)
        plain_cand = tf.saved_model.load(str(Path(tmp) / "plain")).signatures["score_candidates"]
        opt_cand = opt_model.signatures["score_candidates"]
        creq = _candidates(CAND_USERS, CANDIDATES, dim)
        cand = _measure({"optimised": opt_cand, "plain": plain_cand}, creq, rows=CAND_USERS * CANDIDATES)
        ratio = cand["optimised"]["rows_per_s"] / cand["plain"]["rows_per_s"]
        result["ratio_candidates"] = round(ratio, 3)
        cand_report = full_report["signatures"]["score_candidates"]
        for name in ("optimised", "plain"):
            lines.append(f"{CAND_USERS} users x {CANDIDATES} candidates {name:<10} "
                         f"{cand[name]['rows_per_s']:>12,.0f} rows/s  p50 {cand[name]['p50_ms']:.3f} ms  "
                         f"p99 {cand[name]['p99_ms']:.3f} ms")
        lines.append(f"candidates ratio optimised/plain {ratio:.2f} ({cand_report['simplified_dense']} "
                     f"tensordot layers simplified, {cand_report['folded_batchnorms']} BatchNorms folded)")
    lines.insert(0, f"network: hidden {list(cfg.trainer.hidden_units)}, {cfg.trainer.cross_layers} "
                    f"cross layers, dim {dim}; passes: {report['folded_batchnorms']} BatchNorms and "
                    f"{report['folded_constants']} constants folded, {len(report['cached_tensors'])} "
                    f"cached tensors; XLA {'on' if report['xla'] else 'off'} (on with a GPU); "
                    f"max |optimised - keras| = {diff:.2e}")
    lines.append(f"weight refreshes applied during the last pass: {applied[0]}")
    for b in BATCHES:
        for name in ("optimised", "keras"):
            result[f"{name}{b}_rows_per_s"] = round(figures[b][name]["rows_per_s"])
            result[f"{name}{b}_p99_ms"] = round(figures[b][name]["p99_ms"], 3)
    result["max_abs_diff"] = diff
    return BenchResult(result, lines)


def run_spec(cfg: Config, spec_path: str) -> BenchResult:
    """The spec's serving graph (``exporters.spec_savedmodel``): optimised vs the project's own
    plain export of the same weights, both loaded from disk, at batch 64 and 512.  Each call
    starts from the per-input numpy arrays serving builds (``serving.spec_scoring``) and converts
    them as ``serving.model.LoadedModel.predict_inputs`` does; the packed signature's calls pack
    them first (``odl.spec.net.pack_request``), so the packing is paid where it is gained."""
    from exporters import spec_savedmodel
    from odl.spec import load_spec
    from odl.spec.net import PACKED_SIGNATURE, pack_request
    from trainers.spec_model import SpecModel
    spec = load_spec(spec_path)
    tc = cfg.trainer.model_copy(update={"hidden_units": list(SPEC_HIDDEN)})
    model = SpecModel(spec, tc)
    net, weights = model.net, _trained_looking(model.dense_weights())

    def per_input(sig):
        return lambda **r: sig(**{k: tf.constant(v) for k, v in r.items()})

    def packed(sig):
        return lambda **r: sig(**{k: tf.constant(v) for k, v in pack_request(net, r).items()})

    with tempfile.TemporaryDirectory(prefix="odl-bench-graph-") as tmp:
        report = spec_savedmodel.save_optimised(net, weights, Path(tmp) / "optimised")
        spec_savedmodel.save(net, weights, Path(tmp) / "plain")
        spec_savedmodel.save_optimised(net, weights, Path(tmp) / "other", jit=not report["xla"])
        bf16 = spec_savedmodel.save_optimised(net, weights, Path(tmp) / "bf16",
                                              precision="bfloat16")
        other = "optimised-xla" if not report["xla"] else "optimised-noxla"
        loaded = {d: tf.saved_model.load(str(Path(tmp) / d)).signatures
                  for d in ("plain", "optimised", "other", "bf16")}
        # "optimised" and "optimised-bf16": what a replica calls (the packed request);
        # "optimised-per-input": the same graph through the plain one's signature
        models = {"plain": per_input(loaded["plain"]["serving_default"]),
                  "optimised": packed(loaded["optimised"][PACKED_SIGNATURE]),
                  "optimised-per-input": per_input(loaded["optimised"]["serving_default"]),
                  other: packed(loaded["other"][PACKED_SIGNATURE]),
                  "optimised-bf16": packed(loaded["bf16"][PACKED_SIGNATURE])}
        check = _numpy(spec_savedmodel.probe_request(net, 512, 99))
        ref = models["plain"](**check)["probability"].numpy()
        diff = max(float(np.abs(ref - models[m](**check)["probability"].numpy()).max())
                   for m in ("optimised", "optimised-per-input"))
        diff16 = float(np.abs(ref - models["optimised-bf16"](**check)["probability"].numpy()).max())
        lines, result = [], {}
        for b in (64, 512):
            m = _measure(models, _numpy(spec_savedmodel.probe_request(net, b, b)), rows=b)
            base = m["plain"]["rows_per_s"]
            ratio = m["optimised"]["rows_per_s"] / base
            result[f"ratio{b}"] = round(ratio, 3)
            result[f"ratio{b}_per_input"] = round(m["optimised-per-input"]["rows_per_s"] / base, 3)
            result[f"ratio{b}_{other}"] = round(m[other]["rows_per_s"] / base, 3)
            result[f"ratio{b}_bf16"] = round(m["optimised-bf16"]["rows_per_s"] / base, 3)
            for name in models:
                lines.append(f"batch {b:>3} {name:<19} {m[name]['rows_per_s']:>12,.0f} rows/s  "
                             f"p50 {m[name]['p50_ms']:.3f} ms  p99 {m[name]['p99_ms']:.3f} ms")
                result[f"{name.replace('-', '_')}{b}_rows_per_s"] = round(m[name]["rows_per_s"])
            lines.append(f"batch {b:>3} ratio optimised/plain {ratio:.2f} (per-input request "
                         f"{result[f'ratio{b}_per_input']:.2f}), bfloat16 dense layers/plain "
                         f"{result[f'ratio{b}_bf16']:.2f}")
    lines.append(f"bfloat16 dense layers: {len(bf16['cached_tensors'])} cached tensors (the "
                 f"bfloat16 kernels); max |bf16 - plain| probability = {diff16:.2e} over "
                 f"{len(ref)} rows (mean probability {ref.mean():.3f})")
    lines.insert(0, f"spec {spec.name}: {len(net.inputs)} embedding inputs (dims "
                    f"{sorted(set(net.dims))}), {net.num_numeric} numeric; network: hidden "
                    f"{list(SPEC_HIDDEN)}, {tc.cross_layers} cross layers; passes: "
                    f"{report['folded_batchnorms']} BatchNorms and {report['folded_constants']} "
                    f"constants folded, {report['simplified_dense']} dense layers simplified, "
                    f"{len(report['cached_tensors'])} cached tensors; XLA "
                    f"{'on' if report['xla'] else 'off'} (on with a GPU); request: "
                    f"{len(net.request_shapes(packed=True))} tensors packed, "
                    f"{len(net.request_shapes())} per input; max |optimised - plain| = {diff:.2e}")
    result["max_abs_diff"] = diff
    result["max_abs_diff_bf16"] = diff16
    result["spec"] = spec.name
    return BenchResult(result, lines)


def _numpy(request: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in request.items()}
