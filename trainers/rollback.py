"""Moving a live streaming trainer back in its own history (``odl rollback``): to a checkpoint,
then replaying the samples since or skipping ahead to the newest offsets.

Functions over a ``trainers.streaming.StreamingTrainer`` (its ``rollback_to`` and ``skip_ahead``
call them), kept apart from the training loop because they run rarely and only on an operator's
word, while the loop runs every batch.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.streaming import StreamingTrainer

log = logging.getLogger("odl.trainer")


def rollback_to(tr: StreamingTrainer, checkpoint: str, skip_ahead: bool = False) -> dict[str, Any]:
    """Roll the live trainer back to ``checkpoint`` (a version's manifest names the one it was
    cut from): model, duplicate window, progressive figures and stream position as they were
    then.  Then either replay the samples since (its positions) or, ``skip_ahead``, go on from
    the newest offsets (the samples between are never trained).  Replayed samples are new to the
    restored duplicate window and ledger, so they train again, once.  A full checkpoint of the
    rolled-back state is written at once, so a restart resumes from it, not from the newer
    chain.  Runs on the training thread, between batches."""
    if not tr.model.tables:
        raise RuntimeError("rolling back needs the tables in this process; a training group "
                           "with parameter-server shards restores through its coordinator")
    chain = tr.store.chain_to(checkpoint)
    ends = newest_positions(tr) if skip_ahead else None
    tr.drop_stream()
    tr.apply_chain(chain)
    if ends:
        tr.positions.update(ends)
    tr.ledger = []
    info = tr.checkpoint("full")
    log.warning("rolled back to %s (%s): step %d, positions %s, new checkpoint %s",
                checkpoint, "skipping ahead" if skip_ahead else "replaying",
                tr.model.step, tr.positions, info.path.name)
    return {"checkpoint": checkpoint, "step": tr.model.step, "written": info.path.name,
            "positions": {str(p): o for p, o in tr.positions.items()},
            "mode": "skip-ahead" if skip_ahead else "replay"}


def skip_ahead(tr: StreamingTrainer) -> dict[int, int]:
    """Go on from the newest offsets instead of the restored positions (a group member rebuilt
    by a rollback with skip-ahead; the coordinator checkpoints right after)."""
    ends = newest_positions(tr)
    tr.drop_stream()
    tr.positions.update(ends)
    log.warning("skipping ahead to the newest offsets %s", tr.positions)
    return dict(tr.positions)


def newest_positions(tr: StreamingTrainer) -> dict[int, int]:
    """The newest offsets, never behind what was consumed already (a broker's end offsets can
    lag what it has served: tansu reports short)."""
    ends = dict(tr.positions)
    for p, o in tr.prefetcher().call("end_offsets").items():
        ends[int(p)] = max(ends.get(int(p), 0), int(o))
    return ends
