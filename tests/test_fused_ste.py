"""Fused straight-through estimator: same forward values and gradients as the reference path."""
import pytest
import torch

import lutnn.pipeline.train.loop as loop
from lutnn import LUTConv2d, LUTLinear
from lutnn.convert import lut_layers
from lutnn.layers import fused, native
from lutnn.layers.functional import encode, squared_distances
from lutnn.pipeline import Pipeline, load_config
from pipeline_cfg import tiny_config, write_config

NAMES = ("x", "prototypes", "weight", "bias", "log_tau")


@pytest.fixture
def small_chunks(monkeypatch):
    """Seven rows (or one image) per chunk, so every test crosses several ragged chunks."""
    monkeypatch.setattr(fused, "chunk_rows", lambda num_codebooks, num_prototypes: 7)


@pytest.fixture(params=["native", "eager"])
def backend(request, monkeypatch):
    """Both CPU paths of the fused STE: the native kernels and the eager fallback without them."""
    if request.param == "eager":
        monkeypatch.setitem(native._state, "lib", None)
    else:
        assert native.available(), "the native kernels did not build (is a C compiler installed?)"
    return request.param


def _init(layer, rows: torch.Tensor):
    """Prototypes drawn from the data and tau on the distances' scale: assignments are soft but not flat."""
    torch.manual_seed(1)
    c, k, v = layer.prototypes.shape
    pick = rows[torch.randint(0, rows.shape[0], (k,))].reshape(k, c, v).transpose(0, 1)
    with torch.no_grad():
        layer.prototypes.copy_(pick + 0.1 * torch.randn(c, k, v, device=rows.device))
        layer.log_tau.fill_(float(torch.log(torch.tensor(2.0 * v))))
    return layer


def _run(layer, x, impl, autocast=False):
    """Forward value and the gradients of all five inputs under a non-trivial loss."""
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer.set_ste_impl(impl).train()(xi)
    torch.manual_seed(2)
    (y * torch.randn(y.shape, device=y.device)).sum().backward()  # not randn_like: it follows y's strides
    grads = {"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return y.detach(), grads


def _assert_parity(layer, x, autocast=False, impl="fused"):
    y_ref, g_ref = _run(layer, x, "reference", autocast)
    y_fused, g_fused = _run(layer, x, impl, autocast)
    # the fused forward is the table lookup: inference's output to the bit, the reference's x̂ Wᵀ
    # within rounding
    assert torch.equal(y_fused, layer.eval()(x).detach())
    torch.testing.assert_close(y_fused, y_ref, rtol=1e-5, atol=1e-5)
    assert set(g_fused) == set(g_ref) and all(g_fused[n] is not None for n in g_fused)
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1e-3)
        torch.testing.assert_close(g_fused[name] / scale, g_ref[name] / scale, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("k", [2, 16, 256])
@pytest.mark.parametrize("v", [1, 2, 4, 8, 9, 16])
def test_linear_gradients_match_reference(v, k, small_chunks, backend):
    torch.manual_seed(0)
    x = torch.randn(2, 19, 144)  # D=144 is divisible by every V here; 38 rows
    layer = _init(LUTLinear(144, 10, subvec_len=v, num_prototypes=k), x.reshape(-1, 144))
    _assert_parity(layer, x)


@pytest.mark.parametrize("rows_per_chunk", [7, 1000])  # one image per group; all five images in one group
@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=0),
    dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
    dict(kernel_size=(1, 3), stride=(2, 1), padding="same", subvec_len=1),
    dict(kernel_size=1, subvec_len=2),
])
def test_conv_gradients_match_reference(kwargs, rows_per_chunk, monkeypatch, backend):
    monkeypatch.setattr(fused, "chunk_rows", lambda num_codebooks, num_prototypes: rows_per_chunk)
    torch.manual_seed(0)
    x = torch.randn(5, 4, 9, 8)
    layer = LUTConv2d(4, 6, **kwargs)
    _assert_parity(_init(layer, layer.rows(x)), x)


@pytest.mark.parametrize("make", [
    lambda: LUTLinear(32, 12, subvec_len=4),
    lambda: LUTConv2d(4, 6, 3, padding=1),
])
def test_bf16_autocast_matches_reference(make, small_chunks, backend):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(4, 4, 6, 6) if isinstance(layer, LUTConv2d) else torch.randn(40, 32)
    rows = layer.rows(x)
    _assert_parity(_init(layer, rows), x, autocast=True)


def test_codes_are_encode_argmin_with_ties(small_chunks, backend):
    """The fused path's codes are ``encode``'s and the eager argmin's to the index, ties (first index)
    included, in row-major and D-major layouts."""
    torch.manual_seed(0)
    x = torch.randint(-1, 2, (40, 12)).float()  # integer data: many exactly equal distances
    prototypes = torch.randint(-1, 2, (3, 16, 4)).float()
    dist = squared_distances(x, prototypes)
    assert (dist == dist.amin(-1, keepdim=True)).sum(-1).gt(1).any()
    expected = dist.argmin(-1).T
    assert torch.equal(encode(x, prototypes).long(), expected)
    assert torch.equal(fused.codes_of(x, prototypes), expected)
    assert torch.equal(fused.codes_of(x.T.contiguous().T, prototypes), expected)


@pytest.mark.parametrize("v", [1, 4, 9])
def test_fusable_chunk_backward_is_the_same_math(v):
    """The broadcast form that torch.compile fuses computes what the bmm form computes."""
    torch.manual_seed(0)
    x, dx_hat = torch.randn(23, 36), torch.randn(23, 36)
    prototypes, inv_tau = torch.randn(36 // v, 16, v), torch.tensor(0.7)
    for a, b in zip(fused.soft_backward_chunk(x.T, dx_hat.T, prototypes, inv_tau),
                    fused.soft_backward_fusable(x.T, dx_hat.T, prototypes, inv_tau)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda: LUTLinear(32, 12, subvec_len=4),
    lambda: LUTConv2d(4, 6, 3, stride=2, padding=1),
])
def test_compiled_impl_matches_reference(make, small_chunks):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(3, 4, 9, 9) if isinstance(layer, LUTConv2d) else torch.randn(40, 32)
    _assert_parity(_init(layer, layer.rows(x)), x, impl="compiled")


def test_frozen_inputs_get_no_gradient():
    layer = _init(LUTLinear(16, 4, subvec_len=4), torch.randn(20, 16))
    layer.weight.requires_grad_(False)
    layer(torch.randn(20, 16)).sum().backward()  # x does not require grad
    assert layer.weight.grad is None and layer.prototypes.grad is not None and layer.log_tau.grad is not None


def test_fused_ste_keeps_no_im2col_copy():
    """The conv Function saves the input and one byte per (row, codebook), not the patches."""
    layer = LUTConv2d(8, 4, 3, padding=1)
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    y = layer.train()(x)
    saved = y.grad_fn.saved_tensors
    assert any(t is x for t in saved)
    codes = [t for t in saved if t.dtype == torch.uint8]
    assert len(codes) == 1 and codes[0].shape == (2 * 10 * 10, 8)
    params = sum(p.numel() for p in layer.parameters()) - layer.bias.numel()
    assert sum(t.numel() for t in saved) == x.numel() + codes[0].numel() + params  # im2col: 14400


def test_bad_ste_impl_raises():
    with pytest.raises(ValueError, match="ste_impl must be one of"):
        LUTLinear(8, 2).set_ste_impl("fast")


def test_resume_continues_exactly_with_fused_ste(tmp_path, monkeypatch):
    """Mirror of test_train's resume test with the fused STE asserted on: crash after epoch 1, resume."""
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    sections = dict(teacher={"epochs": 1}, data={"augment": "shift"},
                    model={"kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                      "drop_rate": 0.2}})
    cfg = {name: load_config(write_config(tmp_path / f"{name}.yaml", tiny_config(tmp_path / name, **sections)))
           for name in ("straight", "crashed")}
    seen = []
    real_fit = loop.fit

    def fit_checking_impl(model, *args, **kwargs):
        seen.extend(layer.ste_impl for layer in lut_layers(model).values())
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr("lutnn.pipeline.runner.fit", fit_checking_impl)
    Pipeline(cfg["straight"]).run(["teacher", "prototypes", "train"], resume=False)
    assert seen and set(seen) == {"fused"}
    for f in ("teacher.pt", "prototypes.safetensors"):
        (tmp_path / "crashed").mkdir(exist_ok=True)
        (tmp_path / "crashed" / f).write_bytes((tmp_path / "straight" / f).read_bytes())
    real_save = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg["crashed"]).run(["train"], resume=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    Pipeline(cfg["crashed"]).run(["train"], resume=True)

    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "crashed/checkpoints/last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[key], pb[key]) for key in pa)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["fused", "compiled"])
@pytest.mark.parametrize("make", [
    lambda: LUTLinear(192, 96, subvec_len=4, num_prototypes=16),
    lambda: LUTConv2d(16, 32, 3, stride=2, padding=1),
])
def test_cuda_fused_matches_reference(make, impl):
    torch.manual_seed(0)
    layer = make().cuda()
    x = torch.randn(8, 16, 20, 20) if isinstance(layer, LUTConv2d) else torch.randn(8, 197, 192)
    x = x.cuda()
    _init(layer, layer.rows(x))
    _assert_parity(layer, x, impl=impl)
