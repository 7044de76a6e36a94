"""`odl bench <name>`: each benchmark is a module ``bench/<name with _>.py`` exposing
``DESCRIPTION`` and ``run(cfg) -> BenchResult``.  Output ends with one line
``RESULT <name> key=value ...``; ``--json`` prints the same figures as JSON."""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from dataclasses import dataclass, field
from typing import Any

import bench
from odl.config import Config

NOT_BENCHMARKS = {"registry", "common", "chaos_faults"}


@dataclass
class BenchResult:
    result: dict[str, Any]                          # the RESULT line: ratios first, then absolutes
    lines: list[str] = field(default_factory=list)  # human-readable figures printed above it


def available() -> dict[str, str]:
    out = {}
    for mod in pkgutil.iter_modules(bench.__path__):
        if mod.name in NOT_BENCHMARKS:
            continue
        m = importlib.import_module(f"bench.{mod.name}")
        out[mod.name.replace("_", "-")] = getattr(m, "DESCRIPTION", "")
    return out


def run(name: str, cfg: Config, **options: Any) -> BenchResult:
    """Run benchmark ``name``; ``options`` (e.g. ``scale``) go to its ``run`` as keywords, and a
    benchmark that takes none refuses them (TypeError)."""
    if name not in available():
        raise KeyError(name)
    fn = importlib.import_module(f"bench.{name.replace('-', '_')}").run
    unknown = set(options) - set(inspect.signature(fn).parameters)
    if unknown:
        raise TypeError(f"does not take {', '.join('--' + o for o in sorted(unknown))}")
    return fn(cfg, **options)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render(name: str, res: BenchResult, as_json: bool) -> str:
    if as_json:
        return json.dumps({"name": name, **res.result}, indent=1)
    return "\n".join(res.lines + [f"RESULT {name} " + " ".join(f"{k}={_fmt(v)}" for k, v in res.result.items())])
