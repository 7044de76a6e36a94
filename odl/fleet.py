"""Fleet-wide version changes: pin, unpin, promote, rollback -- and waiting until every serving
replica reports the version it was told to serve.

The control plane holds the *desired* version (a pin, or the newest registered version); each
replica polls it, loads and warms the version in the background, swaps it in, and reports the
version it serves in its heartbeat.  So "done" is observable: every live replica's heartbeat
names the target, and the exporter has recorded that Redis holds the rows the target must be
served with (its own embedding snapshot when it is held -- pinned, or promoted over a newer
version -- else the trainer's rows).  What a replica serves is the pair (dense version, embedding
generation): once the exporter has put the wanted rows in a generation, a replica counts as
there only when its heartbeat reports both.  A replica whose heartbeat is older than
``stale_after_s`` is not waited for (it is down; it will load the desired version when it comes
back) but is listed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from odl.control import ControlPlane, Heartbeat

ROLLBACK_PAUSES = "exporter"   # a rollback stops publishing until `odl resume exporter`


class FleetError(Exception):
    pass


@dataclass(frozen=True)
class EmbeddingsWanted:
    """Whose rows Redis must hold once the change is done: a version's snapshot (``source:
    version``) or the trainer's (``source: trainer``).  The exporter records each restore and
    resync as it makes it, so its newest record is what Redis holds now."""
    source: str
    version: str | None

    def met_by(self, rec: dict | None) -> bool | None:
        """True: done; False: the exporter tried and failed; None: not yet."""
        if rec is None:
            return None
        if self.source == "version" and rec.get("version") == self.version:
            return bool(rec.get("ok")) and rec.get("source") == "version"
        if self.source == "trainer" and rec.get("source") == "trainer" and rec.get("ok"):
            return True
        return None


@dataclass
class Rollout:
    target: str
    reached: dict[str, str] = field(default_factory=dict)    # instance -> "version/g<gen>"
    lagging: dict[str, str | None] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)            # no recent heartbeat: not waited for
    waited_s: float = 0.0
    embeddings: bool | None = True   # the rows Redis must hold: True held, False failed, None not yet
    embeddings_record: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.lagging and self.embeddings is True


def known_versions(cp: ControlPlane) -> list[str]:
    return [m["version"] for m in cp.versions()]


def _check_known(cp: ControlPlane, version: str) -> None:
    known = known_versions(cp)
    if version not in known:
        raise FleetError(f"unknown version {version}; registered: {', '.join(known) or 'none'}")


def rollback_target(cp: ControlPlane, to: str | None = None) -> str:
    """``to``, or the registered version before the one served now."""
    if to is not None:
        _check_known(cp, to)
        return to
    known, served = known_versions(cp), cp.served_version()
    if served not in known:
        raise FleetError("no version is served yet: nothing to roll back from")
    k = known.index(served)
    if k == 0:
        raise FleetError(f"version {served} is the oldest registered version: nothing to roll back to")
    return known[k - 1]


def embeddings_wanted(cp: ControlPlane, target: str | None) -> EmbeddingsWanted | None:
    """After a fleet change: a held version (pinned, or promoted over a newer one) must be
    served with its own embedding snapshot; otherwise with the trainer's rows."""
    if target is None:
        return None
    known = known_versions(cp)
    held = cp.pinned_version() == target or (known and target != known[-1])
    return EmbeddingsWanted("version" if held else "trainer", target if held else None)


def pin(cp: ControlPlane, version: str) -> str:
    """Serve ``version`` until unpinned; returns it."""
    _check_known(cp, version)
    cp.pin_version(version)
    return version


def unpin(cp: ControlPlane) -> str | None:
    """Follow the newest version again; returns it."""
    cp.pin_version(None)
    return cp.latest_version()


def promote(cp: ControlPlane, version: str) -> str:
    """Serve ``version`` as the newest (no pin: later versions roll forward as usual); returns it."""
    _check_known(cp, version)
    cp.promote(version)
    return version


def rollback(cp: ControlPlane, to: str | None = None) -> str:
    """Pin the fleet to the previous (or given) version and pause publishing."""
    target = rollback_target(cp, to)
    cp.pin_version(target)
    cp.pause(ROLLBACK_PAUSES)
    return target


def served_pair(hb: Heartbeat) -> str:
    """A replica's (dense version, embedding generation), as ``odl`` prints it: ``5/g12``."""
    gen = hb.metrics.get("generation")
    return f"{hb.version or '-'}/g{gen if gen is not None else '-'}"


def rollback_trainer(cp: ControlPlane, version: str, skip_ahead: bool, timeout_s: float = 60.0,
                     poll_s: float = 0.5) -> dict:
    """Ask the trainer to go back to the checkpoint ``version`` was cut from and wait for its
    answer (``trainers.loop``); raises FleetError when it cannot or does not answer."""
    manifest = next((m for m in cp.versions() if m["version"] == version), None)
    ckpt = (manifest or {}).get("trainer_checkpoint")
    if ckpt is None:
        raise FleetError(f"version {version} records no trainer checkpoint (published before "
                         "versions recorded one, or before the trainer's first checkpoint)")
    rid = cp.request_trainer_rollback(ckpt, skip_ahead, version)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = cp.trainer_rolled_back()
        if done is not None and done.get("id") == rid:
            if not done.get("ok"):
                raise FleetError(f"the trainer did not roll back to {ckpt}: {done.get('reason')}")
            return done
        time.sleep(poll_s)
    raise FleetError(f"the trainer did not answer within {timeout_s:g} s (is it running, or "
                     "paused? a paused trainer answers at its next heartbeat)")


def replicas(cp: ControlPlane) -> list[Heartbeat]:
    return [hb for hb in cp.heartbeats() if hb.component == "serving" and hb.state != "stopped"]


def wait_for(cp: ControlPlane, target: str, timeout_s: float = 60.0, poll_s: float = 0.5,
             stale_after_s: float | None = None,
             progress: Callable[[Rollout], None] | None = None,
             embeddings: EmbeddingsWanted | None = None) -> Rollout:
    """Until every live serving replica reports ``target`` and, with ``embeddings``, the
    exporter has put the wanted rows in Redis (or failed to, or ``timeout_s``)."""
    stale_after = stale_after_s if stale_after_s is not None else 3 * cp.cfg.control.heartbeat_interval_s
    t0 = time.monotonic()
    while True:
        out = Rollout(target)
        gen = None
        if embeddings is not None:
            out.embeddings_record = cp.embeddings()
            out.embeddings = embeddings.met_by(out.embeddings_record)
            if out.embeddings:
                gen = out.embeddings_record.get("generation")
        for hb in replicas(cp):
            served = served_pair(hb)
            if hb.age_s > stale_after:
                out.stale.append(hb.instance)
            elif hb.version == target and (gen is None or hb.metrics.get("generation") == gen):
                out.reached[hb.instance] = served
            else:
                out.lagging[hb.instance] = served
        out.waited_s = time.monotonic() - t0
        if progress:
            progress(out)
        if (not out.lagging and out.embeddings is not None) or out.waited_s >= timeout_s:
            return out    # done, or decided: a failed restore is final
        time.sleep(poll_s)
