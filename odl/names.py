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


def cp_heartbeat(instance: str) -> str:
    return f"{CP}:hb:{instance}"


# --- embeddings -------------------------------------------------------------------------------
def emb_key(table: str, entity_id: int | str) -> str:
    return f"{{odl:emb:{table}}}:{entity_id}"


def emb_meta(table: str) -> str:
    """Hash with dim, dtype, generation and row count of one embedding table."""
    return f"{{odl:emb:{table}}}:meta"


# --- online feature store ------------------------------------------------------------------
def fs_key(kind: str, entity_id: int | str) -> str:
    """Feature state of one entity: kind is ``user`` or ``item`` (``odl.features``)."""
    return f"{{odl:fs:{kind}}}:{entity_id}"
