"""`odl bench serving`: one replica with request batching vs one without, same model, same load.

Set-up: a private redis-server; the configured network with random weights exported as the
optimised SavedModel (what the exporter publishes); 20k user and 5k item rows in Redis.  Two
replicas run as real ``odl run serving`` processes (batching on / off, otherwise the same
config, two inference workers each).  A closed-loop load generator in this process keeps
``CONCURRENCY`` predict requests (``ROWS`` instances each, random ids) in flight against one
replica at a time; rounds alternate between the two replicas (this VM's neighbours move single
figures by +-30%) and QPS and latency percentiles are taken over every round of a replica.
Last, ``CONCURRENCY_REC`` clients send 100-candidate recommendation requests to the batched
replica: its p50/p99.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import aiohttp
import numpy as np
import redis
import yaml

from bench.common import free_port, managed_process, private_redis
from bench.registry import BenchResult
from exporters import savedmodel
from odl.embedding_store import HotEmbeddings
from odl.model_store import Manifest, ModelStore
from odl.config import Config
from odl.control import ControlPlane
from trainers.model import init_dense

DESCRIPTION = "batched vs unbatched serving replica under the same load: QPS, p50/p99; 100-candidate p99"
CONCURRENCY, ROWS = 32, 2
CONCURRENCY_REC, CANDIDATES = 8, 100
ROUNDS, ROUND_S, WARM_S = 3, 4.0, 1.0
USERS, ITEMS = 20_000, 5_000


def _publish(cfg: Config, r: redis.Redis) -> None:
    dim = cfg.trainer.embedding_dim
    rng = np.random.default_rng(0)
    hot = HotEmbeddings(r, dim)
    hot.begin()
    for table, n in (("user", USERS), ("item", ITEMS)):
        hot.push(table, np.arange(n), rng.normal(0, 0.1, (n, dim)).astype(np.float32))
    gen = hot.activate("bench")
    weights = init_dense(cfg.trainer)
    report: dict = {}

    def write(path: Path) -> None:
        report.update(savedmodel.save_optimised(weights, dim, path))

    m = Manifest(version="1", parent=None, trainer_step=0, kafka_offsets={}, metrics={},
                 embedding_generation=gen, embedding_dim=dim)
    ModelStore(cfg.paths.model_store, cfg.serving.model_name).publish(1, write, m)
    ControlPlane(cfg).register_version(m.to_dict())


@contextlib.contextmanager
def _replica(cfg: Config, state: Path, batching: bool) -> Iterator[str]:
    """A real `odl run serving` process with batching on or off; yields its URL once it serves."""
    port = free_port()
    raw = cfg.model_dump(mode="json")
    raw["serving"].update(ports=[port], batching=batching)
    raw["metrics"]["enabled"] = False
    path = state / f"serving-{'batched' if batching else 'unbatched'}.yaml"
    path.write_text(yaml.safe_dump(raw))
    url = f"http://127.0.0.1:{port}"

    def serving() -> bool:   # /healthz is 200 once the model is loaded and warm
        try:
            return urllib.request.urlopen(f"{url}/healthz", timeout=2).status == 200
        except OSError:
            return False

    with open(state / f"{path.stem}.log", "w") as log, managed_process(
            [sys.executable, "-m", "odl.cli", "run", "serving", "--config", str(path)], serving,
            "serving replica", timeout_s=90, stdout=log):
        yield url


def _predict_body(rng: np.random.Generator) -> dict:
    return {"instances": [{"user_id": int(u), "item_id": int(i), "position": 1, "hour": 12}
                          for u, i in zip(rng.integers(0, USERS, ROWS), rng.integers(0, ITEMS, ROWS))]}


def _recommend_body(rng: np.random.Generator) -> dict:
    return {"user_id": int(rng.integers(0, USERS)),
            "candidates": rng.choice(ITEMS, CANDIDATES, replace=False).tolist(), "context": {"hour": 12}}


async def _load(url: str, path: str, make_body, clients: int, seconds: float, warm_s: float,
                seed: int) -> tuple[list[float], int]:
    """Closed loop: ``clients`` requests in flight; latencies (s) after ``warm_s``, and errors."""
    lat: list[float] = []
    errors = 0
    t_start = time.perf_counter()
    t_end = t_start + warm_s + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as s:
        async def client(k: int) -> None:
            nonlocal errors
            rng = np.random.default_rng(seed * 1000 + k)
            while (t0 := time.perf_counter()) < t_end:
                async with s.post(f"{url}{path}", json=make_body(rng)) as resp:
                    await resp.read()
                    ok = resp.status == 200
                if not ok:
                    errors += 1
                elif t0 >= t_start + warm_s:
                    lat.append(time.perf_counter() - t0)
        await asyncio.gather(*(client(k) for k in range(clients)))
    return lat, errors


def _summary(lat: list[float], seconds: float) -> dict[str, float]:
    a = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {"qps": len(lat) / seconds, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def run(cfg: Config) -> BenchResult:
    lines: list[str] = []
    with private_redis() as port, tempfile.TemporaryDirectory() as d:
        state = Path(d)
        cfg = cfg.model_copy(update={
            "redis": cfg.redis.model_copy(update={"host": "127.0.0.1", "port": port, "password": None}),
            "paths": cfg.paths.model_copy(update={"state_dir": state})})
        _publish(cfg, redis.Redis(port=port))
        path = f"/v1/models/{cfg.serving.model_name}:predict"
        with _replica(cfg, state, True) as batched, _replica(cfg, state, False) as unbatched:
            lat = {"batched": [], "unbatched": []}
            errors = 0
            for k in range(ROUNDS):
                for mode, url in (("batched", batched), ("unbatched", unbatched)):
                    got, err = asyncio.run(_load(url, path, _predict_body, CONCURRENCY, ROUND_S, WARM_S, k))
                    lat[mode] += got
                    errors += err
                    lines.append(f"round {k + 1} {mode:<9} {len(got) / ROUND_S:8.0f} req/s")
            figures = {m: _summary(v, ROUNDS * ROUND_S) for m, v in lat.items()}
            rec_path = f"/v1/models/{cfg.serving.model_name}:recommend"
            rec_lat, rec_err = asyncio.run(_load(batched, rec_path, _recommend_body, CONCURRENCY_REC,
                                                 ROUND_S, WARM_S, 99))
            rec = _summary(rec_lat, ROUND_S)
    b, u = figures["batched"], figures["unbatched"]
    for mode, f in figures.items():
        lines.append(f"{mode:<9} {f['qps']:8.0f} req/s  p50 {f['p50_ms']:6.2f} ms  p99 {f['p99_ms']:6.2f} ms "
                     f"({CONCURRENCY} clients, {ROWS} rows a request)")
    lines.append(f"recommend {rec['qps']:8.0f} req/s  p50 {rec['p50_ms']:6.2f} ms  p99 {rec['p99_ms']:6.2f} ms "
                 f"({CONCURRENCY_REC} clients, {CANDIDATES} candidates, batched replica)")
    return BenchResult({"ratio": round(b["qps"] / u["qps"], 3),
                        "p99_ratio": round(b["p99_ms"] / u["p99_ms"], 3),
                        "batched_qps": round(b["qps"]), "unbatched_qps": round(u["qps"]),
                        "batched_p50_ms": round(b["p50_ms"], 2), "batched_p99_ms": round(b["p99_ms"], 2),
                        "unbatched_p50_ms": round(u["p50_ms"], 2), "unbatched_p99_ms": round(u["p99_ms"], 2),
                        "rec100_p50_ms": round(rec["p50_ms"], 2), "rec100_p99_ms": round(rec["p99_ms"], 2),
                        "rec100_qps": round(rec["qps"]), "errors": errors + rec_err}, lines)
