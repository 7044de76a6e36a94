"""The layout contract: ``odl/`` is the core every stage imports; serving reads what the exporter
writes only through it, never through the exporter's package; the core's contract modules import
no stage."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("pipeline", "trainers", "exporters", "serving")
ON_TOP = {"cli.py", "cli_spec.py", "launcher.py", "demo.py", "fleet.py"}  # the CLI and its helpers


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "serving").glob("*.py")), ids=lambda p: p.name)
def test_serving_never_imports_the_exporter(path):
    assert "exporters" not in imported_packages(path)


def test_core_contracts_import_no_stage():
    core = [p for p in (ROOT / "odl").rglob("*.py") if p.name not in ON_TOP]
    assert len(core) > 10
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & set(STAGES)) for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}
