"""The serving-graph passes, each on its own: what it promises (ops gone, tensors cached, cache
refreshed) and that predictions equal the plain model's within 1e-5."""
import numpy as np
import pytest
import tensorflow as tf

from exporters import savedmodel
from exporters.graph.analysis import cache_frontier, request_nodes, trace, weight_only
from exporters.graph.passes import (fold_batchnorm, fold_constants, graph_function, prune_dead,
                                    simplify_tensordot)
from odl.config import TrainerConfig
from odl.model_store import CachePolicy
from serving.graph_cache import CacheRefresher
from odl.features import NUM_DENSE
from trainers.model import init_dense

D = 8


@pytest.fixture(scope="module")
def weights():
    """Trained-looking weights: BatchNorm statistics away from their initial 0 / 1."""
    w = init_dense(TrainerConfig(tables={t: {"dim": D, "capacity": 1000} for t in ("user", "item")},
                                 batch_size=64, batch_norm=True))
    rng = np.random.default_rng(0)
    for k in w:
        if k.startswith("bn_"):
            w[k] = (w[k] + rng.random(w[k].shape)).astype(np.float32)
    return w


def requests(n: int, seed: int = 1) -> list[tf.Tensor]:
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=(n, D)).astype(np.float32)),
            tf.constant(rng.normal(size=(n, D)).astype(np.float32)),
            tf.constant(rng.integers(-3, 120, n)), tf.constant(rng.integers(0, 50, n)),
            tf.constant(rng.normal(size=(n, NUM_DENSE)).astype(np.float32))]


def run(tg, weights, req):
    f = graph_function(tg.graph_def, [f"{p}:0" for p in tg.weights + tg.requests], tg.outputs)
    return f(*[tf.constant(weights[k]) for k in tg.weight_keys], *req)[0].numpy()


@pytest.fixture(scope="module")
def traced(weights):
    return trace(savedmodel.serving_fn, weights, savedmodel.request_specs(D))


def test_analysis_finds_the_weight_only_subgraphs(traced):
    wo = weight_only(traced)
    nodes = traced.nodes()
    # the BatchNorm scale/offset arithmetic and the position table's size, not the matmuls
    assert {nodes[n].op for n in wo} >= {"Rsqrt", "Sub", "StridedSlice"}
    assert not any(nodes[n].op == "MatMul" for n in wo)
    assert all(n not in wo for n in traced.requests)
    frontier = cache_frontier(traced)
    assert len(frontier) >= 4 and all(t.endswith(":0") for t in frontier)


def test_fold_constants_turns_constant_subgraphs_into_constants(traced, weights):
    folded, n = fold_constants(traced)
    assert n >= 1          # the position table's size (a static shape, sliced and decremented)
    req = requests(50)
    np.testing.assert_allclose(run(folded, weights, req), run(traced, weights, req), atol=1e-6)


def test_fold_batchnorm_removes_two_request_ops_per_layer(traced, weights):
    folded, n = fold_batchnorm(traced)
    assert n == 2          # two dense layers with BatchNorm
    before, after = (g.op_counts(request_nodes(g)) for g in (traced, folded))
    assert after["Mul"] == before["Mul"] - 2 and after["AddV2"] == before["AddV2"] - 2
    assert after["MatMul"] == before["MatMul"]
    req = requests(300)
    np.testing.assert_allclose(run(folded, weights, req), run(traced, weights, req), atol=1e-5)
    # the folded kernels and biases are weight-only: the cache computes them
    assert sum("folded_kernel" in t for t in cache_frontier(folded)) == 2


def test_prune_dead_keeps_the_signature(traced):
    pruned, _ = prune_dead(traced)
    assert set(pruned.weights + pruned.requests) <= {n.name for n in pruned.graph_def.node}


@pytest.mark.parametrize("jit", [True, False])
def test_module_predicts_like_the_plain_model_at_every_bucket(weights, jit):
    plain = savedmodel.ServingModule(weights, D)
    opt = savedmodel.optimised_module(weights, D, jit=jit)
    for n in (1, 3, 64, 100, 512, 700):       # 700: beyond the largest bucket
        req = requests(n, seed=n)
        got = opt.serve(*req)["probability"].numpy()
        assert got.shape == (n,)
        np.testing.assert_allclose(got, plain.serve(*req)["probability"].numpy(), atol=1e-5)


def test_apply_weights_recomputes_the_cache_at_once(weights):
    opt = savedmodel.optimised_module(weights, D)
    req = requests(16)
    start = int(opt.refreshes.numpy())
    old_cache = [c.numpy() for c in opt.caches["serve"]]
    w2 = {k: (v * 1.1 if k.startswith(("bn_", "dense_")) else v).astype(np.float32)
          for k, v in weights.items()}
    opt.apply_weights(*[tf.constant(w2[k]) for k in opt.keys])
    assert int(opt.refreshes.numpy()) == start + 1
    want = savedmodel.ServingModule(w2, D).serve(*req)["probability"].numpy()
    np.testing.assert_allclose(opt.serve(*req)["probability"].numpy(), want, atol=1e-5)
    # the request path reads the cache: a stale cache serves stale folded weights ...
    for c, v in zip(opt.caches["serve"], old_cache):
        c.assign(v)
    assert np.abs(opt.serve(*req)["probability"].numpy() - want).max() > 1e-4
    opt.refresh_cache()                       # ... until it is recomputed
    np.testing.assert_allclose(opt.serve(*req)["probability"].numpy(), want, atol=1e-5)


def test_cache_refresher_by_count_and_by_time():
    now = [0.0]
    calls = []
    r = CacheRefresher(lambda: calls.append(now[0]), CachePolicy(every_n_calls=5, every_s=10.0),
                       clock=lambda: now[0])
    assert [r.on_call() for _ in range(5)] == [False] * 4 + [True]   # due at the 5th call
    assert calls == []                        # request threads only count
    assert r.run_due() and calls == [0.0] and not r.run_due()
    now[0] = 10.0
    assert r.on_call() and r.run_due() and calls == [0.0, 10.0]     # 10 s later
    assert not r.on_call()
    r.refreshed()                             # a weight refresh recomputed it: count restarts
    assert [r.on_call() for _ in range(4)] == [False] * 4


FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
with np.load(sys.argv[2]) as z:
    req = {k: tf.constant(z[k]) for k in z.files}
np.save(sys.argv[3], loaded.signatures["serving_default"](**req)["probability"].numpy())
print(sorted(loaded.signatures))
"""


def test_optimised_savedmodel_loads_in_a_fresh_plain_tensorflow_process(tmp_path, weights):
    import subprocess
    import sys
    report = savedmodel.save_optimised(weights, D, tmp_path / "opt")
    assert report["signatures"]["serve"]["folded_batchnorms"] == 2
    assert report["signatures"]["score_candidates"]["simplified_dense"] == 5  # 2 cross, 2 deep, out
    req = dict(zip(savedmodel.request_specs(D), [t.numpy() for t in requests(64)]))
    np.savez(tmp_path / "req.npz", **req)
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "opt"),
                          str(tmp_path / "req.npz"), str(tmp_path / "got.npy")],
                         capture_output=True, text=True, timeout=120, check=True)
    for name in ("apply_weights", "refresh_cache", "score_candidates", "serving_default"):
        assert name in out.stdout
    want = savedmodel.ServingModule(weights, D).serve(*[tf.constant(v) for v in req.values()])
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want["probability"].numpy(), atol=1e-5)


def candidate_requests(b: int, c: int, seed: int = 3) -> list[tf.Tensor]:
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.normal(size=(b, D)).astype(np.float32)),
            tf.constant(rng.normal(size=(b, c, D)).astype(np.float32)),
            tf.constant(rng.integers(-3, 120, (b, c))), tf.constant(rng.integers(0, 50, b)),
            tf.constant(rng.normal(size=(b, c, NUM_DENSE)).astype(np.float32))]


def test_simplify_tensordot_rewrites_rank3_dense_layers(weights):
    traced = trace(savedmodel.candidates_fn, weights, savedmodel.candidate_specs(D))
    folded, _ = fold_constants(traced)
    simple, n = simplify_tensordot(folded)
    assert n == 5                        # 2 cross layers, 2 deep layers, the output layer
    before, after = (g.op_counts(request_nodes(g)) for g in (folded, simple))
    assert before["Transpose"] == 5 and after.get("Transpose", 0) == 0
    assert after.get("Prod", 0) == before["Prod"] - 10 and after.get("Pack", 0) == before["Pack"] - 5
    assert after["MatMul"] == before["MatMul"] and after["Reshape"] == before["Reshape"]
    req = candidate_requests(7, 30)
    np.testing.assert_allclose(run(simple, weights, req), run(traced, weights, req), atol=1e-5)
    # BatchNorm folding still finds both deep layers through the output Reshape
    bn, k = fold_batchnorm(simple)
    assert k == 2
    np.testing.assert_allclose(run(bn, weights, req), run(traced, weights, req), atol=1e-5)
    # the pairwise (rank-2) serving function has no tensordot: nothing to rewrite
    assert simplify_tensordot(fold_constants(trace(savedmodel.serving_fn, weights,
                                                   savedmodel.request_specs(D)))[0])[1] == 0


def test_candidate_scoring_equals_pairwise_scoring(weights):
    """Scoring C candidates of a user in one rank-3 call equals C pairwise rows."""
    opt = savedmodel.optimised_module(weights, D)
    plain = savedmodel.ServingModule(weights, D)
    u, items, pos, hour, feats = candidate_requests(3, 12)
    got = opt.score_candidates(u, items, pos, hour, feats)["probability"].numpy()
    np.testing.assert_allclose(got, plain.score_candidates(u, items, pos, hour, feats)["probability"].numpy(),
                               atol=1e-5)
    pair = plain.serve(tf.repeat(u, 12, axis=0), tf.reshape(items, [-1, D]), tf.reshape(pos, [-1]),
                       tf.repeat(hour, 12), tf.reshape(feats, [-1, NUM_DENSE]))["probability"].numpy()
    np.testing.assert_allclose(got.reshape(-1), pair, atol=1e-5)


def test_keras_reference_is_the_same_model(weights):
    """The benchmark's baseline must compute what the trainer's forward pass computes."""
    from exporters import keras_reference
    model = keras_reference.build(weights, D)
    req = requests(40)
    got = np.asarray(model(req)).reshape(-1)
    want = savedmodel.ServingModule(weights, D).serve(*req)["probability"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
