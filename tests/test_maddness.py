"""MADDness hash-tree encoder: exact splits, lossless on grid data, and its place between
random and k-means encoders on real activations (digits MLP)."""
import itertools

import pytest
import torch

from lutnn.layers import functional as LF
from lutnn.maddness import HashTrees, MaddnessConv2d, MaddnessLinear, best_splits, learn_hash_tree, learn_hash_trees
from lutnn.tools.maddness_compare import DigitsMLP, compare_encoders, digits_accuracy


def _sse(x: torch.Tensor) -> float:
    return float(((x - x.mean(0)) ** 2).sum()) if len(x) else 0.0


def _brute_split(x: torch.Tensor, dim: int) -> float:
    values = sorted(set(x[:, dim].tolist()))
    return min((_sse(x[x[:, dim] < t]) + _sse(x[x[:, dim] >= t]) for t in values[1:]), default=_sse(x))


def test_best_splits_match_brute_force_per_bucket():
    torch.manual_seed(0)
    x = torch.randn(2, 60, 3, dtype=torch.float64)
    x[:, :15, 1] = 0.5  # ties must not be split apart
    x[1, :, 2] = 1.0  # a dimension that cannot split anything
    buckets = torch.randint(3, (2, 60))  # bucket 3 stays empty
    dims = torch.tensor([[0, 1, 2], [2, 1, 0]])
    thresholds, loss = best_splits(x, buckets, 4, dims)
    for c in range(2):
        for p in range(3):
            dim, expected = int(dims[c, p]), 0.0
            for b in range(4):
                xb = x[c][buckets[c] == b]
                expected += _brute_split(xb, dim)
                thr = float(thresholds[c, p, b])
                assert _sse(xb[xb[:, dim] < thr]) + _sse(xb[xb[:, dim] >= thr]) == pytest.approx(
                    _brute_split(xb, dim), rel=1e-9, abs=1e-9)
            assert float(loss[c, p]) == pytest.approx(expected, rel=1e-9)
    assert torch.isinf(thresholds[1, 0]).all()  # dim 2 of codebook 1 is constant
    assert torch.isinf(thresholds[:, :, 3]).all()  # empty bucket


def test_unsplittable_bucket_keeps_everything_left():
    thresholds, loss = best_splits(torch.ones(1, 5, 2), torch.zeros(1, 5, dtype=torch.long), 1,
                                   torch.tensor([[0]]))
    assert thresholds.item() == float("inf") and loss.item() == 0.0


def test_trees_learned_together_equal_trees_learned_alone():
    torch.manual_seed(4)
    x = torch.randn(256, 24) * torch.rand(24)
    trees = learn_hash_trees(x, num_codebooks=3)
    for c in range(3):
        dims, thrs, _ = learn_hash_tree(x[:, 8 * c: 8 * c + 8])
        assert torch.equal(trees.split_dims[c], dims) and torch.equal(trees.thresholds[c], thrs)


def test_fit_restores_the_thread_count():
    before = torch.get_num_threads()
    MaddnessLinear.fit(torch.randn(64, 8), torch.randn(3, 8), subvec_len=4, num_threads=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=1), dict(padding="same", dilation=2, bias=False),
                                    dict(kernel_size=1)])
def test_maddness_conv_equals_maddness_linear_on_im2col_rows(kwargs):
    from lutnn.layers import LUTConv2d

    torch.manual_seed(5)
    conv = torch.nn.Conv2d(4, 6, **{"kernel_size": 3, **kwargs})
    x = torch.randn(3, 4, 9, 9)
    rows = LUTConv2d.from_dense(conv).rows(x)
    for fit_kwargs in ({}, {"subvec_len": 4, "ridge": 1.0}):
        mconv = MaddnessConv2d.from_conv(conv, rows, **fit_kwargs)
        subvec = fit_kwargs.get("subvec_len", 9 if conv.kernel_size == (3, 3) else 4)
        linear = MaddnessLinear.fit(rows, conv.weight.reshape(6, -1), conv.bias, subvec_len=subvec,
                                    ridge=fit_kwargs.get("ridge"))
        y = mconv(x)
        assert y.shape == conv(x).shape
        expected = linear(rows).reshape(3, -1, 6).transpose(1, 2).reshape(y.shape)
        assert torch.equal(y, expected)
        dense = conv(x).detach()
        assert float((y - dense).norm() / dense.norm()) < 0.9


def test_maddness_conv_rejects_grouped_convs():
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        MaddnessConv2d.from_conv(conv, torch.randn(10, 18))


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
