"""`odl bench trainer`: the streaming trainer (consuming the samples topic of a private broker,
decoding, de-duplicating, aligning labels where the config does, checkpointing on its schedule)
vs an in-memory loop over the same samples, pre-decoded, with the same model config and batch
size, in one run.  Both score each batch before training on it.  Then the cost of a full and an
incremental checkpoint.

With ``--spec FILE`` the samples are the spec's (``odl.spec.sample`` records of a synthetic log
of that spec, ``odl.spec.synth``, each event validated by the spec as the feature job does) and
both sides train the spec's model (``trainers.spec_model``); without it, the default shape.

The ratio says whether the stream starves the model (goal >= 0.9).  Each round also runs the
trainer fed the decoded records directly (its own work without the broker and the decode), so a
gap splits into the trainer's part and the stream's, and streams with the fetch and decode in
the other place (``trainer.decode_process``: a child process or the prefetch thread), so the two
are compared side by side.  The clock starts at the first record, as the in-memory loop's starts at
its first batch: the consumer's one-off start (metadata, group coordinator) is not part of either
rate.

``--scale N`` instead runs, on a private Ray local cluster, broker and Redis: one trainer actor
with its tables in-process (the default deployment), a group of one trainer and one
parameter-server shard (the group's overhead), and a group of N trainers and N shards, each over
the same samples on a 4-partition topic from its own fresh state; samples/s of each counted from
the first trained sample to the last, and the ratio N-trainer group / single trainer.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import orjson

from bench.common import private_broker, synthetic_samples
from bench.registry import BenchResult
from odl import names
from odl.config import Config
from odl.kafka_util import ensure_topics, producer
from trainers.samples import DefaultCodec, Records, SampleCodec
from trainers.streaming import StreamingTrainer
from trainers.tf_threads import apply_intra_op_threads, intra_op_threads

DESCRIPTION = "streaming trainer vs in-memory loop: samples/s, checkpoint time and size"
SAMPLES = 100_000
INCREMENT_BATCHES = 20
RUNS = 3


def _in_memory(cfg: Config, codec: SampleCodec, rows: np.ndarray, warm) -> float:
    model = codec.new_model(cfg.trainer)
    model.predict(warm)   # trace both functions outside the timing
    model.train(warm)
    size = cfg.trainer.batch_size
    batches = [codec.to_batch(rows[k:k + size]) for k in range(0, len(rows), size)]
    t0 = time.perf_counter()
    for b in batches:
        model.predict(b)
        model.train(b)
    return len(rows) / (time.perf_counter() - t0)


def _fresh_trainer(cfg: Config, codec: SampleCodec, warm, name: str) -> StreamingTrainer:
    """A trainer of its own group and state, its functions traced and its first full checkpoint
    written (what a fresh trainer does first), all outside the timing."""
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"group_id": name})})
    tr = StreamingTrainer(cfg, shard=name, codec=codec)
    tr.model.predict(warm)
    tr.model.train(warm)
    tr.checkpoint("full")
    return tr


def _step(tr: StreamingTrainer, recs: Records) -> None:
    """One turn of the trainer's loop: the records, then a checkpoint if one is due."""
    tr.step(recs)
    kind = tr.due_checkpoint()
    if kind:
        tr.checkpoint(kind)


def _streaming(cfg: Config, codec: SampleCodec, n: int, warm,
               run: int) -> tuple[float, float, StreamingTrainer]:
    """(samples/s, share of the time the trainer waited for records, the trainer)."""
    tr = _fresh_trainer(cfg, codec, warm, f"bench-{run}")
    tr.prefetcher()
    # the consumer's start (metadata, group, end offsets) is not timed
    end = tr.prefetcher().call("end_offsets")
    first = tr.poll_batch(timeout_s=60)
    waited0 = tr.prefetcher().waited_s
    t0 = time.perf_counter()
    tr.step(first)
    total = sum(end.values())
    while tr.trained < n:
        # the replay's tail is shorter than a batch: take it without waiting out
        # max_batch_wait_ms for records that will never come (the in-memory loop does not wait)
        left = total - sum(tr.positions.values())
        recs = tr.poll_batch(timeout_s=0.05 if left < cfg.trainer.batch_size else None)
        _step(tr, recs)
        if all(tr.positions.get(p, 0) >= o for p, o in end.items()):
            tr.step(None, flush=True)   # the replay is over: release what waits for labels
    elapsed = time.perf_counter() - t0
    return n / elapsed, (tr.prefetcher().waited_s - waited0) / elapsed, tr


def _fed(cfg: Config, codec: SampleCodec, rows: np.ndarray, warm, run: int) -> float:
    """samples/s of the streaming trainer handed the decoded records directly, in chunks of a
    batch as the prefetcher hands them: its own work (dedup, routing, validation, the ledger,
    scheduled checkpoints) without the broker and the decode."""
    tr = _fresh_trainer(cfg, codec, warm, f"bench-fed-{run}")
    size = cfg.trainer.batch_size
    chunks = [Records(np.zeros(len(r), np.int32), np.arange(k, k + len(r), dtype=np.int64), r,
                      np.ones(len(r), bool))
              for k, r in ((k, rows[k:k + size]) for k in range(0, len(rows), size))]
    t0 = time.perf_counter()
    for chunk in chunks:
        _step(tr, chunk)
    tr.step(None, flush=True)
    elapsed = time.perf_counter() - t0
    trained = tr.trained
    tr.close()
    return trained / elapsed


def _in_memory_own_process(cfg: Config, spec: str | None, rows: np.ndarray, tmp: str) -> list[float]:
    """The in-memory loop in a process of its own under TensorFlow's default threads (this one
    runs the trainer's, ``trainer.intra_op_threads``, and a process has one setting): the
    baseline is the better of the two, so the trainer's setting cannot flatter the ratio."""
    path = Path(tmp) / "rows.npy"
    np.save(path, rows)
    out = subprocess.run([sys.executable, "-m", "bench.trainer", str(path), spec or "",
                          cfg.trainer.model_dump_json()], capture_output=True, text=True,
                         timeout=1800, cwd=Path(__file__).resolve().parent.parent)
    line = [x for x in out.stdout.splitlines() if x.startswith("IN_MEMORY ")]
    if out.returncode or not line:
        raise RuntimeError(f"in-memory child failed ({out.returncode}): {out.stderr[-2000:]}")
    return [float(x) for x in line[-1].split()[1:]]


def _child(rows_path: str, spec: str, trainer_json: str) -> None:
    from odl.config import TrainerConfig
    if spec:
        from odl.spec import load_spec
        from trainers.spec_samples import SpecCodec
        make = lambda: SpecCodec(load_spec(spec))   # noqa: E731
    else:
        make = DefaultCodec
    cfg = Config(trainer=TrainerConfig.model_validate_json(trainer_json))
    rows = np.load(rows_path)
    warm = make().to_batch(rows[:cfg.trainer.batch_size])
    rates = [_in_memory(cfg, make(), rows, warm) for _ in range(RUNS)]
    print("IN_MEMORY " + " ".join(f"{r:.1f}" for r in rates), flush=True)


def _records(spec_path: str | None) -> tuple[list[tuple[bytes, bytes]], Callable[[], SampleCodec], str]:
    """(key, value) sample records, a maker of fresh codecs for them, and what they are."""
    if spec_path is None:
        data = synthetic_samples(SAMPLES)
        return ([(d["sample_id"].encode(), json.dumps(d).encode()) for d in data], DefaultCodec,
                "default shape")
    from odl.spec import EventValidator, load_spec
    from odl.spec.sample import sample_record
    from odl.spec.synth import synthetic_rows
    from trainers.spec_samples import SpecCodec
    spec = load_spec(spec_path)
    check = EventValidator(spec.events).check
    lab, out = spec.label, []
    for k, row in enumerate(synthetic_rows(spec, SAMPLES, seed=11)):
        reason, ev = check(row, now_ms=row[spec.events.time_field])
        if reason is not None:
            raise RuntimeError(f"synthetic row {k} refused by spec {spec.name}: {reason}")
        v = float(ev[lab.field])
        label = int(v >= lab.threshold if lab.threshold is not None else v > 0)
        rec = sample_record(spec, f"{spec.name}-{k}", ev[spec.events.time_field], label, ev)
        out.append((rec["sample_id"].encode(), orjson.dumps(rec)))
    return out, lambda: SpecCodec(spec), f"spec {spec.name}"


def run(cfg: Config, scale: int | None = None, spec: str | None = None) -> BenchResult:
    if scale is not None:
        if spec is not None:
            raise TypeError("--scale runs the default shape; give --scale or --spec")
        return run_scale(cfg, scale)
    # the trainer's, as it runs (0 if TensorFlow had started already: its default)
    threads = (intra_op_threads(cfg.trainer.intra_op_threads)
               if apply_intra_op_threads(cfg.trainer.intra_op_threads) else 0)
    records, make_codec, shape = _records(spec)
    values = [v for _, v in records]
    decoded = make_codec().decode_records([0] * len(values), list(range(len(values))), values)
    if not decoded.valid.all():
        raise RuntimeError(f"{int((~decoded.valid).sum())} benchmark samples did not decode")
    rows = decoded.rows
    warm = make_codec().to_batch(rows[:cfg.trainer.batch_size])
    with private_broker(cfg) as bootstrap, tempfile.TemporaryDirectory(prefix="odl-bench-tr-") as tmp:
        bcfg = cfg.model_copy(update={
            "kafka": cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap,
                                                  "topic_prefix": f"b{uuid.uuid4().hex[:6]}."}),
            "paths": cfg.paths.model_copy(update={"state_dir": Path(tmp)}),
            "trainer": cfg.trainer.model_copy(update={
                # final samples only (no provisional ones): every sample produced is trained
                "frozen_baseline_after": None, "delayed_feedback": False,
                "checkpoint": cfg.trainer.checkpoint.model_copy(update={"restore": False})})})
        _produce(bcfg, records)

        # best of RUNS each, alternating: this VM's neighbours make single runs vary by +-30%
        mem, fed, stream, starved, in_thread = [], [], [], [], []
        thread_cfg = bcfg.model_copy(update={"trainer": bcfg.trainer.model_copy(
            update={"decode_process": not bcfg.trainer.decode_process})})
        for run in range(RUNS):
            codec = make_codec()
            mem.append(_in_memory(bcfg, codec, rows, warm))
            fed.append(_fed(bcfg, make_codec(), rows, warm, run))
            # the other place to decode (trainer.decode_process), side by side
            rate, _, other = _streaming(thread_cfg, make_codec(), len(rows), warm, f"o{run}")
            in_thread.append(rate)
            other.close()
            rate, waited, tr = _streaming(bcfg, codec, len(rows), warm, run)
            stream.append(rate)
            starved.append(waited)
            if run < RUNS - 1:
                tr.close()
        stream_rate, other_rate = max(stream), max(in_thread)
        starved_share = starved[stream.index(stream_rate)]

        t = time.perf_counter()
        full = tr.checkpoint("full")
        full_s = time.perf_counter() - t
        rng = np.random.default_rng(0)
        for _ in range(INCREMENT_BATCHES):
            tr.model.train(codec.to_batch(rows[rng.integers(0, len(rows), bcfg.trainer.batch_size)]))
        t = time.perf_counter()
        inc = tr.checkpoint("incr")
        inc_s = time.perf_counter() - t
        full_mb, inc_mb = full.size_bytes / 1e6, inc.size_bytes / 1e6
        occ = tr.model.occupancy()
        tr_aligned = tr.aligner is not None
        tr.close()
        tf_default = _in_memory_own_process(bcfg, spec, rows, tmp)
        mem_rate = max(mem + tf_default)

    ratio = stream_rate / mem_rate
    fed_rate = max(fed)
    here, there = (("process", "prefetch thread") if bcfg.trainer.decode_process
                   else ("prefetch thread", "process"))
    lines = [f"{SAMPLES:,} samples ({shape}), batch {bcfg.trainer.batch_size}, "
             f"{sum(o['rows'] for o in occ.values()):,} embedding rows in {len(occ)} tables, "
             f"sparse optimizer {bcfg.trainer.sparse_optimizer}",
             f"in-memory loop:    {mem_rate:,.0f} samples/s (best of "
             f"{', '.join(f'{x:,.0f}' for x in mem)} at {threads} intra-op threads, the "
             f"trainer's; {', '.join(f'{x:,.0f}' for x in tf_default)} in a process of its own "
             "at TensorFlow's default)",
             f"trainer fed decoded records: {fed_rate:,.0f} samples/s (best of "
             f"{', '.join(f'{x:,.0f}' for x in fed)}; dedup, validation, scheduled checkpoints, "
             f"no broker or decode), ratio {fed_rate / mem_rate:.3f}",
             f"streaming trainer: {stream_rate:,.0f} samples/s (best of "
             f"{', '.join(f'{x:,.0f}' for x in stream)}; the same plus the broker and the "
             f"decode), ratio {ratio:.3f}, {stream_rate / fed_rate:.3f} of the fed trainer's"
             f"{'; label alignment on' if tr_aligned else ''}",
             f"  of which the trainer waited for records: {100 * starved_share:.1f}% of the time "
             "(the rest of the gap is the stream's work sharing the CPU with the model)",
             f"  fetching and decoding in a {here} (trainer.decode_process: "
             f"{bcfg.trainer.decode_process}); "
             f"in a {there} instead: {other_rate:,.0f} samples/s (best of "
             f"{', '.join(f'{x:,.0f}' for x in in_thread)}), ratio {other_rate / mem_rate:.3f}",
             f"full checkpoint:        {full_s * 1000:.0f} ms, {full_mb:.2f} MB",
             f"incremental checkpoint: {inc_s * 1000:.0f} ms, {inc_mb:.2f} MB "
             f"({INCREMENT_BATCHES} batches after the full one)"]
    return BenchResult({"ratio": round(ratio, 3), "starved_share": round(starved_share, 4),
                        "streaming_samples_per_s": round(stream_rate),
                        "decode_process": bcfg.trainer.decode_process,
                        "other_decode_ratio": round(other_rate / mem_rate, 3),
                        "in_memory_samples_per_s": round(mem_rate),
                        "fed_ratio": round(fed_rate / mem_rate, 3),
                        "fed_samples_per_s": round(fed_rate),
                        "intra_op_threads": threads,
                        "in_memory_tf_default_samples_per_s": round(max(tf_default)),
                        "full_ckpt_ms": round(full_s * 1000, 1), "full_ckpt_mb": round(full_mb, 2),
                        "incr_ckpt_ms": round(inc_s * 1000, 1), "incr_ckpt_mb": round(inc_mb, 3),
                        "samples": SAMPLES, "shape": shape}, lines)


def _produce(cfg: Config, records: list[tuple[bytes, bytes]]) -> None:
    ensure_topics(cfg)
    prod = producer(cfg, linger_ms=20, batch_size=256 * 1024)
    topic = names.topic(names.SAMPLES, cfg.kafka.topic_prefix)
    for key, value in records:
        prod.send(topic, key=key, value=value)
    prod.flush()
    prod.close()


def _actor_rate(ray, cfg: Config, n: int) -> float:
    """Start the trainer actor (``odl run trainer``'s, single or group) and time it from its
    first trained sample to its n-th."""
    from trainers.actor import TrainerActorImpl
    from trainers.coordinator import TrainingGroupImpl
    scale = cfg.trainer.scale
    impl = TrainingGroupImpl if scale.grouped else TrainerActorImpl
    actor = ray.remote(impl).options(max_concurrency=4,
                                     num_cpus=0 if scale.grouped else 1).remote(cfg.model_dump_json())
    run_ref = actor.run.remote()
    try:
        t0 = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            trained = ray.get(actor.samples_trained.remote(), timeout=60)
            if trained and t0 is None:
                t0, first = time.perf_counter(), trained
            if trained >= n:
                return (n - first) / (time.perf_counter() - t0)
            time.sleep(0.05)
        raise TimeoutError(f"{n} samples not trained in 600 s")
    finally:
        ray.get(actor.stop.remote(), timeout=30)
        ray.get(run_ref, timeout=120)
        ray.kill(actor)


def run_scale(cfg: Config, scale: int) -> BenchResult:
    import os
    from bench.common import private_redis
    from odl.ray_util import LOOPBACK_ENV
    setups = [("1 trainer, in-process tables", 1, 0), ("1 trainer + 1 ps shard", 1, 1),
              (f"{scale} trainers + {scale} ps shards", scale, scale)]
    partitions = max(4, scale)
    os.environ.update(LOOPBACK_ENV)
    import ray
    rates = []
    with private_broker(cfg) as bootstrap, private_redis() as redis_port, \
            tempfile.TemporaryDirectory(prefix="odl-bench-scale-") as tmp:
        ray.init(num_cpus=max(2, scale), include_dashboard=False, log_to_driver=False,
                 _temp_dir=f"/tmp/odl-ray-bench-{os.getpid()}", _node_ip_address="127.0.0.1",
                 namespace="odl-bench")
        try:
            base = cfg.model_copy(update={
                "kafka": cfg.kafka.model_copy(update={"bootstrap_servers": bootstrap,
                                                      "partitions": partitions,
                                                      "topic_prefix": f"s{uuid.uuid4().hex[:6]}."}),
                "redis": cfg.redis.model_copy(update={"port": redis_port}),
                "metrics": cfg.metrics.model_copy(update={"enabled": False})})
            _produce(base, _records(None)[0])
            for k, (_, n, s) in enumerate(setups):
                tc = base.trainer.model_copy(update={
                    "group_id": f"bench-scale-{k}", "frozen_baseline_after": None,
                    "align_labels": False, "delayed_feedback": False, "max_batch_wait_ms": 200,
                    "scale": base.trainer.scale.model_copy(update={"trainers": n, "ps_shards": s})})
                rcfg = base.model_copy(update={
                    "trainer": tc,
                    "paths": base.paths.model_copy(update={"state_dir": Path(tmp) / f"run{k}"})})
                rates.append(_actor_rate(ray, rcfg, SAMPLES))
        finally:
            ray.shutdown()
    single, group1, group_n = rates
    lines = [f"{SAMPLES:,} samples on {partitions} partitions, batch {cfg.trainer.batch_size}, "
             f"{os.cpu_count()} CPUs; each from its first trained sample to the last"]
    lines += [f"{name + ':':<32} {r:,.0f} samples/s" for (name, _, _), r in zip(setups, rates)]
    return BenchResult({"ratio": round(group_n / single, 3),
                        "ratio_vs_group1": round(group_n / group1, 3),
                        f"trainers{scale}_samples_per_s": round(group_n),
                        "group1_samples_per_s": round(group1),
                        "single_samples_per_s": round(single), "samples": SAMPLES,
                        "cpus": os.cpu_count()}, lines)


if __name__ == "__main__":      # the in-memory loop's own process (_in_memory_own_process)
    _child(*sys.argv[1:4])
