"""Whole-model TVM compile: outputs equal the PyTorch LUT model (fp32 and int8 tables) and the dense model.

LUTConv2d models: tests/test_tvm_conv.py."""
import pytest
import timm
import torch
from torch import nn

import lutnn
from lutnn.tvm.kernels import EncodeSpec, LookupSpec
from lutnn.tvm.relax_model import compile_model, lut_kernel_specs
from lutnn.tvm.target import host_target

TARGET = host_target()


def _vit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=8, patch_size=4,
                             embed_dim=32, depth=1, num_heads=2).eval()


@pytest.fixture(scope="module")
def models():
    dense = _vit()
    lut, report = lutnn.convert(dense, lutnn.LUTConfig(subvec_len=4, include=["blocks.*"]))
    assert len(report.converted) == 4  # qkv, proj, fc1, fc2
    x = torch.randn(3, 3, 8, 8)
    # realistic prototypes: sub-vectors of the layer inputs themselves
    rows = lutnn.capture_rows(lut, [torch.randn(8, 3, 8, 8)], max_rows=64)
    lutnn.init_prototypes(lut, rows, backend="torch", niter=3, seed=0)
    return dense, lut.eval(), x


@pytest.mark.slow
def test_compiled_lut_vit_matches_pytorch_lut(models):
    _, lut, x = models
    compiled = compile_model(lut, x, TARGET)
    assert {type(s) for s in compiled.kernels} == {EncodeSpec, LookupSpec}
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lut(x), rtol=1e-4, atol=1e-4)


def test_compiled_dense_vit_matches_pytorch(models):
    dense, _, x = models
    with torch.no_grad():
        torch.testing.assert_close(compile_model(dense, x, TARGET)(x), dense(x), rtol=1e-4, atol=1e-4)


def test_int8_tables_match_quantized_pytorch_model():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    lut, _ = lutnn.convert(mlp, lutnn.LUTConfig(subvec_len=8))
    lutnn.quantize_tables_(lut, "output")
    lut.eval()
    x = torch.randn(20, 32)
    specs = lut_kernel_specs(lut, x)
    assert [s.table_dtype for s in specs if isinstance(s, LookupSpec)] == ["int8", "int8"]
    with torch.no_grad():
        torch.testing.assert_close(compile_model(lut, x, TARGET)(x), lut(x), rtol=1e-5, atol=1e-5)


def test_wrong_shape_is_rejected():
    lut, _ = lutnn.convert(nn.Sequential(nn.Linear(16, 8)), lutnn.LUTConfig(subvec_len=4))
    compiled = compile_model(lut.eval(), torch.randn(4, 16), TARGET)
    with pytest.raises(ValueError, match=r"compiled for input shape \(4, 16\)"):
        compiled(torch.randn(5, 16))


def test_profile_times_each_compiled_function():
    lut, _ = lutnn.convert(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), lutnn.LUTConfig(subvec_len=4))
    x = torch.randn(4, 16)
    compiled = compile_model(lut.eval(), x, TARGET)
    funcs = compiled.profile(x, calls=2)
    kernels = {name: calls for name, (calls, ms) in funcs.items() if name.startswith("lut_")}
    assert sorted(kernels) == sorted(spec.name for spec in compiled.kernels) and len(kernels) == 4
    assert set(kernels.values()) == {1} and all(ms >= 0 for _, ms in funcs.values())
    torch.testing.assert_close(compiled(x), lut(x), rtol=1e-5, atol=1e-5)  # the VM still runs normally after
