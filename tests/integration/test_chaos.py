"""The chaos run, short: one fault of each kind (trainer actor, feature job, exporter, a serving
replica, Redis) at random moments of a two-and-a-half-minute window under serving load and a
CPU-burning neighbour, against a private `odl up` stack; then the drain and the ledger audit.
`odl bench chaos` is the same run with more faults (docs/operations.md)."""
import pytest

from bench.chaos import RECOVER_GOAL_S, ChaosPlan, run_chaos
from odl.config import load_config

pytestmark = pytest.mark.slow


def test_one_fault_of_each_kind_loses_nothing(tmp_path):
    plan = ChaosPlan(faults={"trainer": 1, "feature-job": 1, "exporter": 1, "replica": 1, "redis": 1},
                     window_s=150, seed=5)
    rep = run_chaos(load_config(None, env={}), plan, print, keep_dir=tmp_path / "stack")
    r = rep.result
    print("\n".join(rep.lines))
    assert r["faults"] == 5 and r["gave_up"] == 0, rep.lines
    assert r["samples_trained"] > 1000 and r["requests"] > 500, rep.lines
    # nothing lost, nothing trained twice, no valid event judged late, every request answered
    assert (r["lost"], r["dup"], r["unexpected"], r["late"], r["failed"]) == (0, 0, 0, 0, 0), rep.lines
    assert r["max_recover_s"] <= RECOVER_GOAL_S, rep.lines
