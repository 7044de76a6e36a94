"""Topic names and Redis key layout: the seams between components, in one place.

Redis keys carry hash tags so that every multi-key command ODL issues stays inside one slot on
Redis Cluster: the control plane lives under ``{odl:cp}``; embedding rows of one table share
``{odl:emb:<table>}`` so a chunked MGET/MSET of a table is one slot; online features of one
entity kind share ``{odl:fs:<kind>}`` (serving reads a user and its candidate items in two MGETs).
"""
from __future__ import annotations

EVENTS = "events"
EVENTS_DLQ = "events.dlq"
SAMPLES = "samples"
FEATURES = "features"   # feature-state updates per entity, materialised into Redis
ALL_TOPICS = (EVENTS, EVENTS_DLQ, SAMPLES, FEATURES)


def topic(name: str, prefix: str = "") -> str:
    return f"{prefix}{name}"


# --- control plane --------------------------------------------------------------------------
CP = "{odl:cp}"
CP_COMPONENTS = f"{CP}:components"          # set of instance ids that ever heart-beat
CP_PAUSED = f"{CP}:paused"                  # set of paused component names
CP_PINNED_VERSION = f"{CP}:pinned_version"  # string: version serving must use (rollback)
CP_LATEST_VERSION = f"{CP}:latest_version"  # string: newest published version
CP_VERSIONS = f"{CP}:versions"              # hash version -> manifest JSON
CP_REFUSED = f"{CP}:refused"                # list of refused export JSON records
CP_PUBLISH_REQUEST = f"{CP}:publish_request"  # set by `odl publish`: export a version now
CP_RESTARTS = f"{CP}:restarts"              # hash instance -> restarts its supervisor made
CP_EMBEDDINGS = f"{CP}:embeddings"          # JSON: whose rows the active generation holds
CP_TRAINER_ROLLBACK = f"{CP}:trainer_rollback"        # JSON: `odl rollback --trainer`'s request
CP_TRAINER_ROLLED_BACK = f"{CP}:trainer_rolled_back"  # JSON: the trainer's answer to it
                                            # (the trainer's, or a version's snapshot) and
                                            # whether a version's restore succeeded
CP_FROZEN = f"{CP}:frozen"                  # JSON: why the exporter holds sparse and dense
                                            # publishing (the gate refused); absent = not frozen


def cp_heartbeat(instance: str) -> str:
    return f"{CP}:hb:{instance}"


# --- embeddings -------------------------------------------------------------------------------
# Rows live in generations (``odl.embedding_store``): readers follow EMB_CURRENT, a JSON
# pointer {generation, dim, dtype}; a generation's rows of one table share one hash tag.
EMB_CURRENT = "{odl:emb}:current"
EMB_NEXT_GENERATION = "{odl:emb}:next_generation"   # INCR counter
# Stream of in-place changes to the active generation (fields g, t, op, ids as int64 LE bytes):
# serving's local cache follows it to refresh or drop the rows it holds.
EMB_CHANGES = "{odl:emb}:changes"
EMB_CHANGES_MAXLEN = 10_000   # entries kept (approximate trim); a reader further behind resyncs


def emb_prefix(table: str, generation: int) -> str:
    """Every row key of ``table`` in ``generation`` is this prefix plus the decimal id."""
    return f"{{odl:emb:g{generation}:{table}}}:"


def emb_key(table: str, generation: int, entity_id: int | str) -> str:
    return f"{emb_prefix(table, generation)}{entity_id}"


def emb_meta(table: str, generation: int) -> str:
    """Hash with dim, dtype and row count of one table in one generation."""
    return f"{{odl:emb:g{generation}:{table}}}:meta"


EMB_META_PATTERN = "{odl:emb:g*:meta"   # SCAN pattern of every generation's table metas


def emb_generation_pattern(generation: int) -> str:
    """SCAN pattern of every key (rows and metas) of one generation."""
    return f"{{odl:emb:g{generation}:*"


def emb_generation_of(key: bytes | str) -> int:
    """The generation a row or meta key belongs to."""
    k = key.decode() if isinstance(key, bytes) else key
    return int(k.split(":")[2][1:])


# --- dense-weight refreshes --------------------------------------------------------------------
def dense_refresh(model: str) -> str:
    """Hash: seq, base_version, trainer_step, created_at, weights (npz bytes)."""
    return f"{CP}:dense:{model}"


# --- online feature store ------------------------------------------------------------------
def fs_key(kind: str, entity_id: int | str) -> str:
    """Feature state of one entity: kind is ``user`` or ``item`` (``odl.features``), or a
    spec's ``count.<name>`` / ``seq.<name>`` (``odl.spec.realtime``)."""
    return f"{{odl:fs:{kind}}}:{entity_id}"


# --- serving HTTP headers ------------------------------------------------------------------------
VERSION_HEADER = "X-ODL-Model-Version"
GENERATION_HEADER = "X-ODL-Embedding-Generation"   # with the version: what a replica serves
DEGRADED_HEADER = "X-ODL-Degraded"                  # set when Redis was out of reach
