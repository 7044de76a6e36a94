"""Trainer checkpoints: full every few minutes, incremental (changed rows only) in between.

A checkpoint is a directory ``ckpt-<seq>-<full|incr>`` of ``.npz`` groups plus ``manifest.json``
(kind, seq, base = the checkpoint it extends, the caller's metadata, a sha256 per file).  It is
written under a temporary name, fsynced and renamed, so a crash leaves either the whole
checkpoint or nothing.  Restore reads the newest full checkpoint whose files verify and then
the increments that extend it, following each one's ``base`` (a damaged increment ends that
branch; a newer increment written after a restore may extend the same base); if the newest
full one is damaged, the one before it (with its increments) is used.  Retention keeps the last
``keep_full`` full checkpoints and the increments after the oldest of them.

In a training group (``trainers.group``) every participant's checkpoint carries the group's
``epoch`` in its metadata; the group restores the last *committed* epoch: ``discard_after``
removes what was written after it, ``restore_chain(epoch)`` insists the chain ends there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("odl.trainer.checkpoint")
Groups = dict[str, dict[str, np.ndarray]]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (missing file, checksum mismatch, bad manifest)."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    seq: int
    kind: str          # "full" | "incr"
    base: int | None   # seq of the checkpoint an increment extends
    meta: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def due_kind(full_interval_s: float, incremental_interval_s: float, have_any: bool,
             last_full: float, last_incr: float, now: float) -> str | None:
    """Which checkpoint is due: "full" first and every ``full_interval_s``, "incr" every
    ``incremental_interval_s`` in between, else None (monotonic seconds)."""
    if not have_any or now - last_full >= full_interval_s:
        return "full"
    return "incr" if now - last_incr >= incremental_interval_s else None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    _fsync(tmp)
    os.rename(tmp, path)
    _fsync(path.parent)


class CheckpointStore:
    def __init__(self, root: Path, keep_full: int = 3):
        self.root, self.keep_full = Path(root), keep_full
        self.root.mkdir(parents=True, exist_ok=True)

    # --- listing ----------------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint with a readable manifest, oldest first (files not yet verified)."""
        out = []
        for p in self.root.glob("ckpt-*"):
            try:
                m = json.loads((p / "manifest.json").read_text())
                out.append(CheckpointInfo(p, int(m["seq"]), m["kind"], m.get("base"), m["meta"]))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring checkpoint %s: %s", p.name, exc)
        return sorted(out, key=lambda c: c.seq)

    def latest_seq(self) -> int:
        seqs = [int(p.name.split("-")[1]) for p in self.root.glob("ckpt-*")
                if p.name.split("-")[1].isdigit()]
        return max(seqs, default=0)

    # --- writing ----------------------------------------------------------------------------
    def write(self, kind: str, groups: Groups, meta: dict[str, Any], base: int | None) -> CheckpointInfo:
        if kind not in ("full", "incr"):
            raise ValueError(f"kind must be full or incr, not {kind!r}")
        if kind == "incr" and base is None:
            raise ValueError("an incremental checkpoint needs the checkpoint it extends")
        seq = self.latest_seq() + 1
        tmp = self.root / f".tmp-{seq}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = {}
            for name, arrays in groups.items():
                for key, a in arrays.items():
                    if np.asarray(a).dtype == object:  # would be pickled: unsafe and unportable
                        raise TypeError(f"checkpoint array {name}/{key} has dtype object")
                path = tmp / f"{name}.npz"
                np.savez(path, **arrays)
                _fsync(path)
                files[path.name] = _sha256(path)
            manifest = {"seq": seq, "kind": kind, "base": base, "created": time.time(),
                        "files": files, "meta": meta}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync(tmp / "manifest.json")
            final = self.root / f"ckpt-{seq:08d}-{kind}"
            os.rename(tmp, final)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.retain()
        return CheckpointInfo(final, seq, kind, base, meta)

    def retain(self) -> list[Path]:
        """Delete what restore can no longer need; returns the removed paths."""
        cks = self.list()
        fulls = [c for c in cks if c.kind == "full"]
        if len(fulls) <= self.keep_full:
            removed = []
        else:
            oldest_kept = fulls[-self.keep_full].seq
            removed = [c.path for c in cks if c.seq < oldest_kept]
        for p in removed + [p for p in self.root.glob(".tmp-*")
                            if time.time() - p.stat().st_mtime > 3600]:
            shutil.rmtree(p, ignore_errors=True)
        return removed

    # --- reading ----------------------------------------------------------------------------
    def read(self, info: CheckpointInfo) -> Groups:
        """The checkpoint's arrays, after checking every file against its sha256."""
        try:
            manifest = json.loads((info.path / "manifest.json").read_text())
            groups = {}
            for fname, digest in manifest["files"].items():
                path = info.path / fname
                if _sha256(path) != digest:
                    raise CheckpointError(f"{info.path.name}/{fname}: checksum mismatch")
                with np.load(path, allow_pickle=False) as z:
                    groups[fname[:-len(".npz")]] = {k: z[k] for k in z.files}
            return groups
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{info.path.name}: {exc}") from exc

    def discard_after(self, epoch: int | None) -> list[Path]:
        """Delete the checkpoints of group epochs after ``epoch`` (written but never committed);
        ``None`` deletes every checkpoint (the group has committed none)."""
        gone = [c.path for c in self.list()
                if epoch is None or c.meta.get("epoch", 0) > epoch]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        return gone

    def restore_chain(self, epoch: int | None = None) -> list[tuple[CheckpointInfo, Groups]]:
        """[(full), (incr), ...] to apply in order; empty if no usable checkpoint exists.  With
        ``epoch``, the chain must end at that group epoch (or CheckpointError)."""
        chain = self._chain()
        if epoch is not None:
            end = chain[-1][0].meta.get("epoch") if chain else None
            if end != epoch:
                raise CheckpointError(f"{self.root}: the group committed epoch {epoch} but this "
                                      f"participant's newest usable checkpoint is epoch {end}")
        return chain

    def chain_to(self, name: str) -> list[tuple[CheckpointInfo, Groups]]:
        """The chain that ends at checkpoint ``name`` (its full base, then its increments in
        order), each verified; CheckpointError if it or a link is gone or damaged."""
        by_seq = {c.seq: c for c in self.list()}
        target = next((c for c in by_seq.values() if c.path.name == name), None)
        if target is None:
            raise CheckpointError(f"checkpoint {name} is not in {self.root} (retained: "
                                  f"{', '.join(c.path.name for c in by_seq.values()) or 'none'})")
        links = [target]
        while links[0].kind == "incr":
            base = by_seq.get(links[0].base)
            if base is None:
                raise CheckpointError(f"{links[0].path.name}: its base checkpoint "
                                      f"{links[0].base} is gone")
            links.insert(0, base)
        return [(c, self.read(c)) for c in links]

    def _chain(self) -> list[tuple[CheckpointInfo, Groups]]:
        cks = self.list()
        for full in reversed([c for c in cks if c.kind == "full"]):
            try:
                chain = [(full, self.read(full))]
            except CheckpointError as exc:
                log.error("full checkpoint unusable, trying an older one: %s", exc)
                continue
            prev = full.seq
            while True:  # follow base links; after a damaged increment a newer branch may exist
                nxt = None
                for inc in sorted((c for c in cks if c.kind == "incr" and c.base == prev),
                                  key=lambda c: -c.seq):
                    try:
                        nxt = (inc, self.read(inc))
                        break
                    except CheckpointError as exc:
                        log.error("skipping a damaged increment: %s", exc)
                if nxt is None:
                    break
                chain.append(nxt)
                prev = nxt[0].seq
            return chain
        return []
