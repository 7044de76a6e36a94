"""Why the exporter and serving move embeddings in chunked MSET/MGET: side by side, in one run,
against a private redis-server on loopback, chunked multi-key commands vs one command per key
in a pipeline, for the same rows."""
from __future__ import annotations

import time

import numpy as np
import redis

from bench.common import private_redis
from bench.registry import BenchResult
from exporters.embeddings import fetch_rows, push_rows
from odl import names
from odl.config import Config

DESCRIPTION = "chunked MSET/MGET vs per-key pipelined SET/GET of embedding rows (Redis)"
ROWS, DIM, REPEATS = 100_000, 16, 3


def _best(fn) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(cfg: Config) -> BenchResult:
    with private_redis() as port:
        r = redis.Redis(port=port)
        ids = np.arange(ROWS, dtype=np.int64)
        vecs = np.random.default_rng(0).normal(size=(ROWS, DIM)).astype(np.float32)

        def per_key_set():
            pipe = r.pipeline(transaction=False)
            for i in range(ROWS):
                pipe.set(names.emb_key("bench", i), vecs[i].tobytes())
            pipe.execute()

        def per_key_get():
            pipe = r.pipeline(transaction=False)
            for i in range(ROWS):
                pipe.get(names.emb_key("bench", i))
            pipe.execute()

        id_list = ids.tolist()
        t_mset = _best(lambda: push_rows(r, "bench", ids, vecs))
        t_set = _best(per_key_set)
        t_mget = _best(lambda: fetch_rows(r, "bench", id_list, DIM))
        t_get = _best(per_key_get)
    w_chunk, w_key = ROWS / t_mset, ROWS / t_set
    r_chunk, r_key = ROWS / t_mget, ROWS / t_get
    lines = [f"rows={ROWS} dim={DIM} float32, best of {REPEATS}, hiredis={redis.utils.HIREDIS_AVAILABLE}",
             f"write: chunked MSET {w_chunk:,.0f} rows/s   per-key SET pipeline {w_key:,.0f} rows/s",
             f"read:  chunked MGET {r_chunk:,.0f} rows/s   per-key GET pipeline {r_key:,.0f} rows/s"]
    return BenchResult({"write_ratio": round(w_chunk / w_key, 2), "read_ratio": round(r_chunk / r_key, 2),
                        "mset_rows_per_s": round(w_chunk), "set_rows_per_s": round(w_key),
                        "mget_rows_per_s": round(r_chunk), "get_rows_per_s": round(r_key)}, lines)
