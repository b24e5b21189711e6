"""MADDness hash-tree encoder: exact splits, lossless on grid data, and its place between
random and k-means encoders on real activations (digits MLP)."""
import itertools

import pytest
import torch

from lutnn.layers import functional as LF
from lutnn.maddness import HashTrees, MaddnessLinear, _optimal_split, learn_hash_tree
from lutnn.tools.maddness_compare import DigitsMLP, compare_encoders, digits_accuracy


def _sse(x: torch.Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).sum()) if len(x) else 0.0


def test_optimal_split_matches_brute_force():
    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    x[:10, 1] = 0.5  # ties must not be split apart
    for dim in range(3):
        thr, loss = _optimal_split(x, dim)
        values = sorted(set(x[:, dim].tolist()))
        brute = min(_sse(x[x[:, dim] < t]) + _sse(x[x[:, dim] >= t]) for t in values[1:])
        assert loss == pytest.approx(brute, rel=1e-9)
        assert _sse(x[x[:, dim] < thr]) + _sse(x[x[:, dim] >= thr]) == pytest.approx(loss, rel=1e-6)


def test_unsplittable_bucket_keeps_everything_left():
    assert _optimal_split(torch.ones(5, 2), 0) == (float("inf"), 0.0)


def test_tree_buckets_equal_encoder_codes():
    torch.manual_seed(1)
    x = torch.randn(300, 6)
    dims, thrs, buckets = learn_hash_tree(x, levels=4)
    codes = HashTrees(dims.unsqueeze(0), thrs.unsqueeze(0)).encode(x)
    assert codes.dtype == torch.uint8 and torch.equal(codes[:, 0].long(), buckets)
    assert len(buckets.unique()) == 16


def test_lossless_on_binary_grid_subvectors():
    """Sub-vectors from {0,1}^4 are 16 points: four levels splitting four distinct dims separate them."""
    grid = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)))
    torch.manual_seed(2)
    rows = torch.cat([grid[torch.randint(16, (200,))] * (c + 1) for c in range(3)], dim=1)  # [200, 12]
    w, b = torch.randn(5, 12), torch.randn(5)
    layer = MaddnessLinear.fit(rows, w, b, subvec_len=4)
    assert sorted(layer.split_dims[0].tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(layer(rows), rows @ w.T + b, rtol=1e-5, atol=1e-4)
    # the table has lutnn's layout: table_lookup on the tree codes is the layer
    assert layer.table.shape == (3, 16, 5)
    torch.testing.assert_close(LF.table_lookup(layer.trees.encode(rows), layer.table, layer.bias), layer(rows))


def test_ridge_prototypes_fit_the_calibration_rows_at_least_as_well():
    torch.manual_seed(3)
    x, w = torch.randn(400, 16), torch.randn(8, 16)
    exact = x @ w.T
    errors = [float((MaddnessLinear.fit(x, w, subvec_len=4, ridge=r)(x) - exact).norm()) for r in (None, 1e-6)]
    assert errors[1] <= errors[0] * (1 + 1e-4)


def test_input_errors():
    with pytest.raises(ValueError, match="levels"):
        MaddnessLinear.fit(torch.randn(10, 8), torch.randn(2, 8), levels=9)
    with pytest.raises(ValueError, match="D=8"):
        MaddnessLinear.fit(torch.randn(10, 8), torch.randn(2, 6))
    layer = MaddnessLinear.fit(torch.randn(50, 8), torch.randn(2, 8), subvec_len=4)
    with pytest.raises(ValueError, match="last dim 8"):
        layer(torch.randn(3, 6))


@pytest.fixture(scope="module")
def digits() -> DigitsMLP:
    return DigitsMLP.train(seed=0)


def test_between_random_and_kmeans_on_digits_activations(digits):
    x = digits.layer_rows()["2"]  # input of the 128 -> 64 layer
    err = compare_encoders(x[digits.fit], x[digits.held], digits.mlp[2].weight, subvec_len=8)
    maddness, kmeans = err["MADDness (bucket means)"], err["k-means (argmin, LUT-NN init)"]
    assert kmeans < maddness < err["random prototypes (argmin)"]
    assert maddness < 0.7 * err["random hash trees + bucket means"]
    assert err["MADDness + ridge 1"] < maddness


def test_replacing_every_layer_keeps_most_accuracy(digits):
    acc = digits_accuracy(digits, subvec_len=8)
    assert acc["dense"] > 0.9
    assert acc["dense"] >= acc["k-means LUT"] >= acc["MADDness"] > 0.7  # chance is 0.1
