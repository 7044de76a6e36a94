"""The running moments of standardised inputs that a trainer checkpoints are those of the records
it has *taken*, not of the records decoded ahead of it (the prefetcher decodes up to its queue's
depth ahead).  With the decoder's moments, a restart re-decodes the prefetched records and counts
them twice, so a restored trainer standardises its inputs differently from one never stopped."""
import numpy as np

from odl.spec.sample import SampleReader
from tests.conftest import make_config
from tests.unit.test_spec_samples import standardized_docs
from trainers.spec_samples import SpecCodec
from trainers.streaming import StreamingTrainer


def _trainer(tmp_path, codec: SpecCodec) -> StreamingTrainer:
    cfg = make_config(tmp_path, trainer={"batch_size": 8, "frozen_baseline_after": None,
                                         "delayed_feedback": False, "align_labels": False,
                                         "hidden_units": [8]})
    return StreamingTrainer(cfg, codec=codec)


def test_a_checkpoint_carries_the_moments_of_the_records_taken(tmp_path):
    spec, docs = standardized_docs(60)
    bad = [b"{not json"]
    values = docs[:20] + bad + docs[20:40] + bad + docs[40:]
    codec = SpecCodec(spec)
    chunk = codec.decode_records([0] * len(values), list(range(len(values))), values)
    assert chunk.moments.shape == (len(values), 3)
    t = _trainer(tmp_path / "a", codec)
    # the trainer takes the records up to the second malformed one; the decoder has read all
    t.step(chunk[:41])
    info = t.checkpoint("full")
    up_to = SampleReader(spec)
    up_to.read(docs[:40])
    assert t.numeric_moments == up_to.moments != codec.numeric_moments()
    assert t.store.restore_chain()[-1][0].meta["numeric_moments"] == up_to.moments
    t.close()

    # a restore starts the next decoder there: the rest decodes as in an uninterrupted stream
    again = _trainer(tmp_path / "a", SpecCodec(spec))
    assert again.restored_from == info.path.name and again.numeric_moments == up_to.moments
    rest = again.codec.decode_records([0] * 19, list(range(41, 60)), values[41:])
    np.testing.assert_array_equal(rest.rows, chunk[41:].rows)
    again.close()


def test_a_malformed_record_carries_the_moments_before_it():
    spec, docs = standardized_docs(10)
    got = SampleReader(spec).read([b"[]", *docs[:5], b"{", *docs[5:]])
    first = SampleReader(spec)
    first.read(docs[:5])
    assert got.moments_after[0].tolist() == [0.0, 0.0, 0.0]
    assert first.moments_at(got.moments_after[6]) == first.moments == first.moments_at(
        got.moments_after[5])
    whole = SampleReader(spec)
    whole.read(docs)
    assert whole.moments_at(got.moments_after[-1]) == whole.moments
