"""`odl bench embedding-push`: rows/s the exporter pushes to Redis (``HotEmbeddings.push``: key
building, encoding, hot-set bookkeeping, the table meta, chunks pipelined) vs a bare chunked
MSET (one synchronous command per chunk, the same chunk size) of the same keys and bytes built
before the clock starts, against a private redis-server on loopback, for dim 16
and 64, in the same run.  Rounds alternate between the two (this VM's neighbours move single
figures by +-30%); each figure is the median round.  Also: float16 rows (half the bytes) and the
serving read path (``EmbeddingReader.fetch``) vs a bare chunked MGET."""
from __future__ import annotations

import statistics
import time

import numpy as np
import redis

from bench.common import private_redis
from bench.registry import BenchResult
from odl.embedding_store import (CHUNK, Codec, EmbeddingReader, HotEmbeddings, Pointer,
                                     chunk_rows)
from odl import names
from odl.config import Config

DESCRIPTION = "exporter's embedding push vs a bare chunked MSET of the same bytes (dim 16, 64)"
ROWS, DIMS, ROUNDS = 100_000, (16, 64), 5


def _rate(fn) -> float:
    t = time.perf_counter()
    fn()
    return ROWS / (time.perf_counter() - t)


def _one_dim(r: redis.Redis, dim: int) -> dict[str, float]:
    rng = np.random.default_rng(dim)
    ids = rng.choice(1 << 40, ROWS, replace=False).astype(np.int64)
    vecs = rng.normal(size=(ROWS, dim)).astype(np.float32)
    hot = HotEmbeddings(r, dim, "float32", max_rows=10 * ROWS)
    hot16 = HotEmbeddings(r, dim, "float16", max_rows=10 * ROWS)
    for h in (hot, hot16):
        h.begin()
        h.activate("bench")
    # the bare baseline: the same keys and bytes, prepared outside the clock
    prefix = names.emb_prefix("bench", hot.active)
    keys = [prefix + str(i) for i in ids.tolist()]
    values = Codec("float32", dim).encode(vecs)
    chunks, step = [], hot.chunk    # the same chunk size: the ratio is the exporter's overhead
    for s in range(0, ROWS, step):
        args: list = [None] * (2 * len(keys[s:s + step]))
        args[::2], args[1::2] = keys[s:s + step], values[s:s + step]
        chunks.append(args)

    def bare_mset():
        for args in chunks:
            r.execute_command("MSET", *args)

    def bare_mget():
        for s in range(0, ROWS, CHUNK):
            r.mget(keys[s:s + CHUNK])

    reader, id_list = EmbeddingReader(r, pointer_ttl_s=60), ids.tolist()
    # readers follow the float32 generation (hot16 was activated after it)
    r.set(names.EMB_CURRENT, Pointer(hot.active, dim, "float32", source="bench").to_json())
    rounds: dict[str, list[float]] = {k: [] for k in ("push", "bare", "push16", "fetch", "mget")}
    for _ in range(ROUNDS):
        rounds["push"].append(_rate(lambda: hot.push("bench", ids, vecs)))
        rounds["bare"].append(_rate(bare_mset))
        rounds["push16"].append(_rate(lambda: hot16.push("bench", ids, vecs)))
        rounds["fetch"].append(_rate(lambda: reader.fetch("bench", id_list, dim)))
        rounds["mget"].append(_rate(bare_mget))
    r.flushall()
    return {k: statistics.median(v) for k, v in rounds.items()}


def run(cfg: Config) -> BenchResult:
    lines = [f"rows={ROWS:,} per round, median of {ROUNDS} alternating rounds, "
             f"hiredis={redis.utils.HIREDIS_AVAILABLE}; MSET chunk rows: "
             + ", ".join(f"dim {d}: {chunk_rows(4 * d)}" for d in DIMS)]
    result: dict[str, float] = {}
    with private_redis() as port:
        r = redis.Redis(port=port)
        for dim in DIMS:
            f = _one_dim(r, dim)
            ratio = f["push"] / f["bare"]
            result[f"ratio{dim}"] = round(ratio, 2)
            result[f"push{dim}_rows_per_s"] = round(f["push"])
            result[f"mset{dim}_rows_per_s"] = round(f["bare"])
            result[f"push{dim}_f16_rows_per_s"] = round(f["push16"])
            result[f"read_ratio{dim}"] = round(f["fetch"] / f["mget"], 2)
            lines.append(f"dim {dim:>2}: exporter push {f['push']:>10,.0f} rows/s   bare MSET "
                         f"{f['bare']:>10,.0f} rows/s   ratio {ratio:.2f}   float16 push "
                         f"{f['push16']:>10,.0f} rows/s")
            lines.append(f"        serving fetch {f['fetch']:>10,.0f} rows/s   bare MGET "
                         f"{f['mget']:>10,.0f} rows/s   ratio {f['fetch'] / f['mget']:.2f}")
    result = {"ratio": min(result["ratio16"], result["ratio64"]), **result}
    return BenchResult(result, lines)
