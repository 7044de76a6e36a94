"""The exporter, the online feature store, the control plane and serving on a real Redis Cluster
of three primaries (``redis.cluster: true``).  What it proves is the key layout: every command
and transaction ODL sends touches one hash tag (``odl.names``), so none is refused as CROSSSLOT,
while the keys spread over the primaries.  The fleet-wide rollback through the CLI runs on the
cluster too (``test_serving.py``'s ``redis-cluster`` case)."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest
import requests
from redis.cluster import RedisCluster

from odl import dense_channel, names
from odl.embedding_store import EmbeddingReader, HotEmbeddings, drop_generation
from odl.redis_conn import redis_client
from tests.conftest import make_config
from tests.integration.test_serving import (ITEMS, USERS, Stack, predict, scores, seed_features,
                                            served_from_redis)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _keys_by_node(r: RedisCluster) -> dict[str, list[bytes]]:
    return {node.name: list(r.get_redis_connection(node).scan_iter(count=1000))
            for node in r.get_primaries()}


def test_parts_on_a_cluster(tmp_path, redis_cluster):
    cfg = make_config(tmp_path, redis={"port": redis_cluster, "cluster": True})
    r = redis_client(cfg, decode=False)
    assert isinstance(r, RedisCluster) and len(r.get_primaries()) == 3
    r.flushall()
    # embeddings: pipelined MSET chunks on the table's primary, MGET reads, UNLINK, SCAN
    hot = HotEmbeddings(r, 8)
    ids = np.arange(5_000, dtype=np.int64) * 3
    vecs = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    hot.begin()
    for table in ("user", "item", "category"):
        hot.push(table, ids, vecs)
    gen = hot.activate()
    reader = EmbeddingReader(r, pointer_ttl_s=0)
    got, found = reader.fetch("item", ids.tolist() + [1], 8)
    np.testing.assert_array_equal(got[:-1], vecs)
    assert found[:-1].all() and not found[-1]
    assert reader.count("user") == len(ids)
    hot.delete("user", [0, 3])
    assert reader.fetch("user", [0, 3, 6], 8)[1].tolist() == [False, False, True]
    assert hot.memory()["redis_used_memory_bytes"] > 0
    # the dense channel's MULTI on the control plane's primary
    seq = dense_channel.publish(r, "ctr", "1", 7, {"w": np.ones((2, 2), np.float32)})
    refresh = dense_channel.read(r, "ctr")
    assert refresh.seq == seq and refresh.trainer_step == 7
    # each table's rows in one slot, the tables and the control plane spread over the primaries
    slots = defaultdict(set)
    for node, keys in _keys_by_node(r).items():
        for k in keys:
            tag = k[k.index(b"{"):k.index(b"}") + 1]
            slots[tag].add(r.keyslot(k))
    assert all(len(s) == 1 for s in slots.values()), slots
    on = {node for node, keys in _keys_by_node(r).items() if keys}
    assert len(on) >= 2, f"every key on one primary: {on}"
    # a retired generation is dropped from every primary
    hot.begin()
    hot.push("user", ids[:10], vecs[:10])
    hot.activate()
    assert drop_generation(r, gen) >= 3 * len(ids) - 2      # its rows left, from every primary
    assert not list(r.scan_iter(match=names.emb_generation_pattern(gen)))


def test_exporter_and_replicas_on_a_cluster(tmp_path, redis_cluster):
    with Stack(tmp_path, redis_cluster, replicas=2, cluster=True) as s:
        seed_features(s.ex.r)          # the feature store's Lua write, one call per entity kind
        s.ex.publish_version()
        s.wait_version("1")
        for rep in s.replicas:
            rows = scores(rep.url)
            np.testing.assert_allclose(rows, served_from_redis(s), atol=1e-6)
            assert np.abs(rows - served_from_redis(s, features=False)).max() > 1e-5
        rec = requests.post(
            f"{s.replicas[0].url}/v1/models/ctr:recommend", timeout=10,
            json={"user_id": USERS[2], "candidates": ITEMS[:10], "top_k": 3}).json()
        assert rec["model_version"] == "1" and len(rec["items"]) == 3
        # deltas reach both replicas' caches through the change stream
        before = scores(s.replicas[1].url)
        s.trainer.train()
        assert s.ex.push_deltas() > 0
        want = served_from_redis(s)
        assert np.abs(want - before).max() > 1e-5
        deadline = time.monotonic() + 5
        while any(np.abs(scores(rep.url) - want).max() > 1e-6 for rep in s.replicas):
            assert time.monotonic() < deadline, "replica caches did not follow the change stream"
            time.sleep(0.05)
        # a dense refresh is applied without a reload
        assert s.ex.publish_dense() == 1
        deadline = time.monotonic() + 5
        while any(rep.holder.current.refresh_seq != 1 for rep in s.replicas):
            assert time.monotonic() < deadline, "dense refresh not applied"
            time.sleep(0.05)
        assert predict(s.replicas[0].url).status_code == 200
        # the heartbeats (one MULTI each on the control plane's primary) name both replicas
        assert {hb.instance for hb in s.cp.heartbeats()} >= {"serving-0", "serving-1"}
