"""LUT layers: gradients, mode equivalence, tables, int8 error bound, input errors."""
import pytest
import torch
from torch import nn

from lutnn import LUTConv2d, LUTLinear
from lutnn.layers import functional as LF

torch.manual_seed(0)


def _linear(bias: bool = True, **kw) -> LUTLinear:
    torch.manual_seed(0)
    layer = LUTLinear(32, 12, bias=bias, **kw)
    # prototypes on the data's scale so assignments are non-trivial
    with torch.no_grad():
        layer.prototypes.normal_()
    return layer


@pytest.mark.parametrize("make", [
    lambda: _linear(subvec_len=4),
    lambda: LUTConv2d(4, 6, 3, stride=2, padding=1),
])
def test_gradients_reach_every_parameter(make):
    layer = make().train()
    x = torch.randn(2, 4, 7, 7) if isinstance(layer, LUTConv2d) else torch.randn(3, 5, 32)
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert x.grad.abs().sum() > 0


def test_soft_path_gradcheck_float64():
    torch.manual_seed(1)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    log_tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: LF.lut_matmul(*a, hard=False), (x, p, w, b, log_tau), eps=1e-6, atol=1e-5
    )


def test_ste_input_gradient_is_soft_argmin_gradient():
    """With a loss linear in the output, the STE gradient w.r.t. x equals the soft path's."""
    torch.manual_seed(2)
    layer = _linear(subvec_len=4)
    x = torch.randn(10, 32)
    r = torch.randn(10, 12)
    grads = []
    for hard in (True, False):
        xi = x.clone().requires_grad_(True)
        y = LF.lut_matmul(xi, layer.prototypes, layer.weight, layer.bias, layer.log_tau, hard=hard)
        (y * r).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_ste_forward_value_is_hard_assignment():
    layer = _linear(subvec_len=4)
    x = torch.randn(9, 32)
    codes = LF.encode(x, layer.prototypes).long()  # [N, C]
    x_hat = layer.prototypes[torch.arange(layer.num_codebooks), codes].reshape(9, 32)
    expected = x_hat @ layer.weight.T + layer.bias
    torch.testing.assert_close(layer.train()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_lut_mode_equals_training_forward(bias):
    layer = _linear(bias=bias, subvec_len=8)
    x = torch.randn(2, 3, 7, 32)
    y_train = layer.train()(x)
    y_lut = layer.eval()(x)
    assert y_lut.shape == (2, 3, 7, 12)
    torch.testing.assert_close(y_lut, y_train, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
    dict(kernel_size=(1, 3), stride=(2, 1), padding="same", subvec_len=1),
    dict(kernel_size=1, subvec_len=2),
])
def test_conv_modes_agree_and_dense_matches_conv2d(kwargs):
    torch.manual_seed(3)
    layer = LUTConv2d(4, 5, **kwargs)
    ref = nn.Conv2d(4, 5, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=layer.bias is not None)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")})
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(layer.set_mode("dense")(x), ref(x))
    # dense product over im2col rows == conv: checks the row layout LUT modes rely on
    layer.set_mode("auto")
    y_train, y_lut = layer.train()(x), layer.eval()(x)
    assert y_lut.shape == ref(x).shape
    torch.testing.assert_close(y_lut, y_train, rtol=1e-5, atol=1e-5)


def test_default_conv_subvector_is_one_channel_patch():
    layer = LUTConv2d(8, 4, 3)
    assert (layer.num_codebooks, layer.subvec_len) == (8, 9)


def test_table_is_cached_and_rebuilt_after_update():
    layer = _linear(subvec_len=4).eval()
    t1 = layer.table()
    assert layer.table() is t1
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()(torch.randn(4, 32)).sum().backward()
    opt.step()
    t2 = layer.table()
    assert t2 is not t1 and not torch.equal(t1, t2)
    torch.testing.assert_close(t2, LF.build_table(layer.prototypes.detach(), layer.weight.detach()))
    x = torch.randn(6, 32)
    torch.testing.assert_close(layer.eval()(x), layer.train()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["output", "codebook"])
def test_int8_tables_within_stated_bound(granularity):
    layer = _linear(subvec_len=4).eval()
    x = torch.randn(64, 32)
    y_fp32 = layer(x)
    report = layer.quantize_tables(granularity)
    y_int8 = layer(x)
    bound = layer.quantized_table.error_bound()
    err = (y_int8 - y_fp32).abs()
    assert (err <= bound + 1e-5).all()
    assert 0 < err.max() and report["table_rel_error"] < 0.02
    assert report["output_error_bound"] == pytest.approx(float(bound.max()))
    layer.quantize_tables(None)
    torch.testing.assert_close(layer(x), y_fp32)


def test_int8_tables_follow_parameter_updates():
    layer = _linear(subvec_len=4).eval()
    layer.quantize_tables("output")
    with torch.no_grad():
        layer.weight.mul_(2)
    x = torch.randn(16, 32)
    y = layer(x)
    layer.quantize_tables(None)
    assert (y - layer(x)).abs().max() <= layer.quantize_tables("output")["output_error_bound"] + 1e-5


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"D=30 is not C\*V.*divisors of 30"):
        LUTLinear(30, 4, subvec_len=8)
    with pytest.raises(ValueError, match=r"num_prototypes \(K\) must be in \[1, 256\]"):
        LUTLinear(32, 4, num_prototypes=300)
    with pytest.raises(ValueError, match="expects last dim 32"):
        LUTLinear(32, 4)(torch.randn(2, 31))
    with pytest.raises(ValueError, match="groups=2"):
        LUTConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        LUTConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="mode must be one of"):
        LUTLinear(32, 4).set_mode("fast")


def test_from_dense_copies_weights():
    dense = nn.Linear(16, 3)
    lut = LUTLinear.from_dense(dense, subvec_len=4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(lut.set_mode("dense")(x), dense(x))
    assert lut.weight is not dense.weight


def test_codes_under_bf16_autocast_match_fp32_inference():
    """Training under autocast must pick the same codes as the fp32 lookup at inference."""
    torch.manual_seed(4)
    layer = _linear(subvec_len=4)
    x = torch.randn(256, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp = layer.train()(x)
    assert y_amp.dtype == torch.float32
    torch.testing.assert_close(y_amp, layer.eval()(x), rtol=1e-5, atol=1e-5)
