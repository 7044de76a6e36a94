"""The feature spec (``odl.spec.model``), its loader and its generated event rules.

``load_spec(path)`` reads a YAML spec strictly -- duplicate keys are errors (YAML would keep the
last silently: two ``dim``s for one table), unknown keys are errors, every message names its
entry -- and returns a frozen ``FeatureSpec``.  ``default_spec()`` is ``specs/default.yaml``,
the shape the demo runs.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import ValidationError

from odl.spec.events import EventValidator
from odl.spec.model import FeatureSpec

SPECS_DIR = Path(__file__).resolve().parents[2] / "specs"
DEFAULT_SPEC_PATH = SPECS_DIR / "default.yaml"

__all__ = ["DEFAULT_SPEC_PATH", "SPECS_DIR", "EventValidator", "FeatureSpec", "SpecError",
           "SpecMismatch", "check_spec", "default_spec", "is_default", "load_spec", "parse_spec", "running_spec"]


class SpecError(ValueError):
    """A spec that cannot work; the message names each offending entry."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise SpecError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice")
        seen[key] = True
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def parse_spec(text: str, origin: str = "<spec>") -> FeatureSpec:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except SpecError as exc:
        raise SpecError(f"spec {origin}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec {origin} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec {origin} must hold a mapping at the top level")
    try:
        return FeatureSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"spec {origin} is invalid:"]
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "value_error" and where == "<root>":    # cross-references
                lines += [f"  {m}" for m in msg.splitlines()]
                continue
            got = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
            lines.append(f"  {where}: {msg}{got}")
        raise SpecError("\n".join(lines)) from None


def load_spec(path: str | Path) -> FeatureSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {p}") from None
    return parse_spec(text, str(p))


@lru_cache(maxsize=1)
def default_spec() -> FeatureSpec:
    return load_spec(DEFAULT_SPEC_PATH)


@lru_cache(maxsize=8)
def _spec_at(path: str, mtime_ns: int) -> FeatureSpec:
    return load_spec(path)


def running_spec(cfg=None) -> FeatureSpec:
    """The spec the pipeline runs: ``cfg.spec`` (``specs/default.yaml`` unless configured).
    The default shape runs every stage; another spec runs the source, the feature job
    (``pipeline.spec_sql``) and the trainer (``trainers.spec_samples``), not yet the exporter
    and serving (docs/features.md#running-a-spec)."""
    path = getattr(cfg, "spec", None)
    if path is None or Path(path).resolve() == DEFAULT_SPEC_PATH.resolve():
        return default_spec()
    p = Path(path)
    try:
        mtime = p.stat().st_mtime_ns
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {p}") from None
    return _spec_at(str(p), mtime)


def is_default(spec: FeatureSpec) -> bool:
    """Whether ``spec`` is the default shape, which the specialised stages implement."""
    return spec.hash == default_spec().hash


class SpecMismatch(RuntimeError):
    """State (a checkpoint, a served version) written under another spec than the one running."""


def check_spec(recorded: str | None, what: str, remedy: str = "",
               expected: str | None = None) -> None:
    """Refuse ``what`` when it records a spec hash other than ``expected`` (default: the running
    spec's).  State written before specs existed records none and is accepted (it has the
    default shape)."""
    running = running_spec()
    want = expected or running.hash
    if recorded is not None and recorded != want:
        name = f"spec {running.name!r} ({want})" if want == running.hash else f"spec {want}"
        raise SpecMismatch(f"{what} was written under feature spec {recorded}; this process runs "
                           f"{name}. {remedy}".rstrip())
