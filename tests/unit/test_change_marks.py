"""Readers of embedding changes (the exporter) and restores: a mark from before a restore must
never let rows the restore rolled back stay in Redis, whatever the step numbers say."""
import numpy as np

from tests.unit.helpers import small_cfg
from trainers.model import Batch, CTRModel


def _train(model: CTRModel, steps: int, users: range, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        u = rng.choice(np.asarray(users), 64)
        model.train(Batch(u, rng.integers(0, 50, 64), np.zeros(64, np.int64),
                          np.zeros(64, np.int64), (rng.random(64) < 0.3).astype(np.float32)))


def test_a_mark_from_before_a_restore_gets_every_row_incomplete():
    model = CTRModel(small_cfg(4096, 8, (8,)))
    _train(model, 5, range(100))
    saved = model.state()                      # the checkpoint: step 5
    _train(model, 5, range(100, 200))          # steps 6-10 admit users 100..199
    mark, _ = model.embedding_changes(0)       # the exporter has pushed up to step 10
    model.load(saved)                          # crash, restore to step 5
    _train(model, 8, range(300, 320), seed=1)  # the new incarnation passes step 10
    assert model.step == 13
    mark2, changes = model.embedding_changes(mark)
    user = changes["user"]
    assert not user["complete"]                # the reader must replace its whole set
    ids = set(user["ids"].tolist())
    assert set(range(300, 320)) <= ids and not ids & set(range(100, 200))
    # from the new mark on, deltas are incremental again
    _train(model, 1, range(5), seed=2)
    _, more = model.embedding_changes(mark2)
    assert more["user"]["complete"] and set(more["user"]["ids"].tolist()) <= set(range(5))


def test_an_unrestored_model_answers_incrementally():
    model = CTRModel(small_cfg(4096, 8, (8,)))
    _train(model, 3, range(50))
    mark, first = model.embedding_changes(0)
    _train(model, 1, range(60, 70), seed=3)
    _, changes = model.embedding_changes(mark)
    assert changes["user"]["complete"]
    assert set(changes["user"]["ids"].tolist()) <= set(range(60, 70))
