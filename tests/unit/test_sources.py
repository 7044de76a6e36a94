import json
from pathlib import Path

import numpy as np
import pytest

from odl.config import SourceConfig
from odl.schemas import validate_event
from pipeline.generator import SyntheticSource, SyntheticWorld
from pipeline.movielens import MovieLensReplay, load_ratings

START = 1_800_000_000_000
ML_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens-small"


def test_synthetic_stream_is_ordered_valid_and_clicks_follow_impressions():
    cfg = SourceConfig(rate=1000, malformed_rate=0.0, max_events=5000)
    recs = list(SyntheticSource(cfg, START).records())
    assert [r.due_ms for r in recs] == sorted(r.due_ms for r in recs)
    shown = {}
    clicks = 0
    for r in recs:
        ev = json.loads(r.value)
        assert validate_event(r.value, now_ms=START) is None
        assert r.ts_ms == ev["ts_ms"] and r.key == str(ev["user_id"]).encode()
        key = (ev["request_id"], ev["item_id"])
        if ev["type"] == "impression":
            shown[key] = ev["ts_ms"]
        else:
            clicks += 1
            assert key in shown and ev["ts_ms"] > shown[key]
    ctr = clicks / len(shown)
    assert 0.03 < ctr < 0.5, ctr
    assert len({k[0] for k in shown}) == len(shown) // cfg.items_per_request


def test_malformed_events_are_generated_and_rejected():
    cfg = SourceConfig(rate=1000, malformed_rate=0.05, max_events=3000)
    bad = [r for r in SyntheticSource(cfg, START).records() if r.kind == "malformed"]
    assert bad and all(validate_event(r.value, now_ms=START) is not None for r in bad)


def test_preferences_drift():
    cfg = SourceConfig(drift_per_minute=1.0)
    w = SyntheticWorld(cfg)
    before = w.users.copy()
    w.drift(START)
    w.drift(START + 10 * 60_000)
    cos = np.sum(before * w.users, axis=1) / (np.linalg.norm(before, axis=1) * np.linalg.norm(w.users, axis=1))
    assert np.mean(cos) < 0.9
    assert np.allclose(np.linalg.norm(w.users, axis=1), np.sqrt(cfg.latent_dim), rtol=1e-4)


def test_request_ids_unique_across_restarts():
    cfg = SourceConfig(max_events=50, malformed_rate=0)
    a = {json.loads(r.value)["request_id"] for r in SyntheticSource(cfg, START).records()}
    b = {json.loads(r.value)["request_id"] for r in SyntheticSource(cfg, START + 1).records()}
    assert not a & b


@pytest.mark.skipif(not ML_DIR.is_dir(), reason="shared MovieLens data not present")
def test_movielens_replay_in_time_order_with_clicks_for_high_ratings():
    ratings = load_ratings(ML_DIR)
    assert len(ratings) == 100_004
    assert ratings == sorted(ratings)
    cfg = SourceConfig(kind="movielens", movielens_dir=ML_DIR, max_events=2000)
    recs = list(MovieLensReplay(cfg, START).records())
    imps = [json.loads(r.value) for r in recs if r.kind == "impression"]
    clicks = [json.loads(r.value) for r in recs if r.kind == "click"]
    assert len(imps) == 2000
    expected = sum(1 for _, _, _, rating in ratings[:2000] if rating >= 4.0)
    assert len(clicks) == expected
    assert all("rating" not in e["context"] for e in imps)  # the label never travels as a feature
    assert [r.due_ms for r in recs] == sorted(r.due_ms for r in recs)


def test_movielens_bad_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="movielens_dir"):
        load_ratings(tmp_path)
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,x,3\n")
    with pytest.raises(ValueError, match="ratings.csv:2"):
        load_ratings(tmp_path)
