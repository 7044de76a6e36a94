"""The one place that makes Redis clients: a single server, or a Redis Cluster.

``redis.cluster: true`` makes every component's client a ``RedisCluster``, which reads the slot
map from the node it is given and sends each command to the primary of its key's slot.  The key
layout (``odl.names``) puts every key that one command or one transaction touches under one hash
tag, so multi-key commands (a table's MGET/MSET chunk, a feature kind's Lua write, a control-plane
MULTI) stay within one slot.  Two things a cluster client does not do by itself, and this module
does: a MULTI/EXEC transaction (redis-py refuses ``pipeline(transaction=True)`` in cluster mode;
``atomic`` opens it on the slot's primary) and a raw connection to pipeline chunks on
(``node_client``).
"""
from __future__ import annotations

from typing import Union

import redis
from redis.client import Pipeline
from redis.cluster import RedisCluster

from odl.config import Config

Client = Union[redis.Redis, RedisCluster]


def redis_client(cfg: Config, decode: bool = True, timeout_s: float = 5.0) -> Client:
    r = cfg.redis
    common = dict(host=r.host, port=r.port, password=r.password, decode_responses=decode,
                  socket_timeout=timeout_s, socket_connect_timeout=min(3.0, timeout_s))
    if r.cluster:
        return RedisCluster(**common)
    return redis.Redis(db=r.db, **common)


def is_cluster(r: Client) -> bool:
    return isinstance(r, RedisCluster)


def node_client(r: Client, key: str | bytes) -> redis.Redis:
    """A plain client of the server that holds ``key``: ``r`` itself, or on a cluster the
    primary of the key's slot (commands sent through it must stay within that slot)."""
    if is_cluster(r):
        return r.get_redis_connection(r.get_node_from_key(key))
    return r


def atomic(r: Client, key: str | bytes) -> Pipeline:
    """A MULTI/EXEC pipeline for keys of ``key``'s slot (every key of one transaction shares a
    hash tag, ``odl.names``)."""
    return node_client(r, key).pipeline(transaction=True)


def used_memory(r: Client) -> int:
    """``used_memory`` of the server, or summed over a cluster's primaries."""
    if is_cluster(r):
        per_node = r.info("memory", target_nodes=RedisCluster.PRIMARIES)
        return sum(int(i.get("used_memory", 0)) for i in per_node.values())
    return int(r.info("memory").get("used_memory", 0))
