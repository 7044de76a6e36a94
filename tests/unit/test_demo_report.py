"""The demo's report: the frozen-copy line says which samples its figures come from, or that
no copy exists yet; the report files are written either way."""
import json
import math

import pytest

from odl.demo import _write_report


def _report(**over) -> dict:
    rep = {"duration_s": 60.0, "wall_s_total": 95.0, "events_in": 1000, "dlq": 3, "samples": 1500,
           "samples_trained": 900, "progressive_auc": 0.62, "frozen_baseline_auc": 0.6348,
           "frozen_at_step": 157, "live_auc_vs_frozen": 0.6333, "progressive_logloss": 0.45,
           "progressive_calibration": 1.0, "versions_exported": 2, "versions_retained": 2,
           "embeddings_in_redis": {"user": 5, "item": 5}, "exporter": {"generation": 1},
           "requests_ok": 10, "request_errors": 0, "status_codes": {200: 10},
           "versions_served": {"1": 10}, "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
           "degraded": 0, "recommend_latency_ms": {"p50": 1.0, "p99": 2.0, "candidates": 50},
           "replicas": {}, "auc_over_time": [(5, math.nan), (25, 0.6)], "crashed": []}
    return {**rep, **over}


@pytest.mark.parametrize("step", [157, None])
def test_the_frozen_line_names_its_samples_or_says_there_is_no_copy(tmp_path, step):
    rep = _report(frozen_at_step=step, **({} if step else {"frozen_baseline_auc": math.nan,
                                                           "live_auc_vs_frozen": math.nan}))
    _write_report(rep, tmp_path)
    line = next(ln for ln in (tmp_path / "report.md").read_text().splitlines()
                if "vs a frozen copy" in ln)
    if step:
        assert "0.6333" in line and "0.6348" in line and "step 157, on the same samples" in line
    else:
        assert "none yet" in line and "nan" not in line
    assert json.loads((tmp_path / "report.json").read_text().replace("NaN", "null"))[
        "frozen_at_step"] == step
    assert (tmp_path / "auc.svg").read_text().startswith("<svg")
