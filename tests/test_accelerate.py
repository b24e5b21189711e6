"""accelerate_: a converted model whose LUT layers run TVM kernels equals the PyTorch LUT model."""
import copy

import pytest
import timm
import torch
from torch import nn

import lutnn
from lutnn.tvm import AccelerateConfig, accelerate_, unaccelerate_
from lutnn.tvm.accelerate import _LAYERS


def _lut_vit(int8: bool = False) -> nn.Module:
    """Tiny DeiT (17 tokens: N = 17 * batch exercises the encode's row tail) with real prototypes."""
    torch.manual_seed(0)
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                            embed_dim=32, depth=2, num_heads=2).eval()
    lut, report = lutnn.convert(vit, lutnn.LUTConfig(subvec_len=4, include=["blocks.*"]))
    assert len(report.converted) == 8
    rows = lutnn.capture_rows(lut, [torch.randn(8, 3, 16, 16)], max_rows=64)
    lutnn.init_prototypes(lut, rows, backend="torch", niter=3, seed=0)
    if int8:
        lutnn.quantize_tables_(lut, "output")
    return lut.eval()


def _record_codes(model: nn.Module, accelerated: bool) -> tuple[dict, list]:
    """Hooks filling ``codes[name]``: the PyTorch encoder's codes of each layer input, or (accelerated)
    the codes the TVM encode kernel wrote in that call."""
    codes, hooks = {}, []
    handles = {acc.name: acc for acc in _LAYERS.values()} if accelerated else {}

    def hook(name, layer, args, _out):
        if accelerated:
            codes[name] = handles[name].runners[tuple(args[0].shape)].codes.clone()
        else:
            codes[name] = layer.encode(layer.rows(args[0]))

    for name, layer in lutnn.lut_layers(model).items():
        hooks.append(layer.register_forward_hook(lambda m, a, o, name=name: hook(name, m, a, o)))
    return codes, hooks


@pytest.mark.parametrize("int8", [False, True], ids=["fp32-tables", "int8-tables"])
def test_accelerated_vit_equals_pytorch_lut(int8):
    lut = _lut_vit(int8)
    acc = copy.deepcopy(lut)
    report = accelerate_(acc)
    assert len(report.accelerated) == 8 and not report.skipped
    ref_codes, ref_hooks = _record_codes(lut, accelerated=False)
    got_codes, got_hooks = _record_codes(acc, accelerated=True)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            got, ref = acc(x), lut(x)
        assert got_codes.keys() == ref_codes.keys() and len(got_codes) == 8
        for name in ref_codes:
            assert torch.equal(got_codes[name], ref_codes[name]), f"{name} batch {batch}: codes differ"
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for h in ref_hooks + got_hooks:
        h.remove()


def test_inference_mode_and_undo_restore_eager_forward():
    lut = _lut_vit(int8=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = lut(x)
    accelerate_(lut)
    layers = lutnn.lut_layers(lut).values()
    assert all("forward" in layer.__dict__ for layer in layers)
    with torch.inference_mode():
        torch.testing.assert_close(lut(x), ref, rtol=1e-4, atol=1e-4)
    unaccelerate_(lut)
    assert not any("forward" in layer.__dict__ for layer in layers)
    with torch.no_grad():
        assert torch.equal(lut(x), ref)


def test_deepcopy_of_an_accelerated_model_runs_its_own_tables():
    lut = _lut_vit()
    accelerate_(lut)
    x = torch.randn(1, 3, 16, 16)
    twin = copy.deepcopy(lut)
    with torch.no_grad():
        for layer in lutnn.lut_layers(twin).values():
            layer.weight.mul_(2)
        got = twin(x)
        unaccelerate_(twin)
        torch.testing.assert_close(got, twin(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, lut(x))


def _compile_recording_graphs(model):
    """``torch.compile(model, fullgraph=True)`` with a backend that keeps each traced graph."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(model, backend=backend, fullgraph=True), graphs


def test_torch_compile_calls_the_custom_op():
    lut = _lut_vit(int8=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = lut(x)
    accelerate_(lut)
    compiled, graphs = _compile_recording_graphs(lut)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
    op = torch.ops.lutnn.accelerated_lut
    calls = [n for gm in graphs for n in gm.graph.nodes if n.target in (op, op.default)]
    assert len(graphs) == 1 and len(calls) == 8


def test_training_mode_uses_the_ste_path():
    lut = _lut_vit()
    acc = copy.deepcopy(lut)
    accelerate_(acc)
    lut.train(), acc.train()
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    ref = lut(x)
    torch.manual_seed(1)
    got = acc(x)
    torch.testing.assert_close(got, ref)
    got.sum().backward()
    assert acc.blocks[0].attn.qkv.prototypes.grad is not None


def test_unsupported_layers_stay_pytorch_with_a_warning_naming_them():
    class OtherLUT(lutnn.LUTLinear):
        pass

    lut = _lut_vit()
    fc1 = lut.blocks[0].mlp.fc1
    odd = OtherLUT(fc1.in_features, fc1.out_features, subvec_len=4)
    odd.load_state_dict(fc1.state_dict())
    lut.blocks[0].mlp.fc1 = odd.eval()
    lut.blocks[1].attn.proj.quantize_tables("codebook")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = lut(x)
    with pytest.warns(UserWarning, match=r"blocks\.0\.mlp\.fc1: stays PyTorch: no TVM runner for OtherLUT"):
        report = accelerate_(lut)
    assert list(report.skipped) == ["blocks.0.mlp.fc1"] and len(report.accelerated) == 7
    with pytest.warns(UserWarning, match=r"blocks\.1\.attn\.proj: stays PyTorch for input shape .*'codebook'"):
        with torch.no_grad():
            got = lut(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_bench_model_quick_writes_markdown_and_png(tmp_path):
    from lutnn.cli import main

    assert main(["bench-model", "--quick", "--models", "deit_tiny_patch16_224", "--batch", "1", "--threads", "1",
                 "--rows", "torch-fp32", "accelerate", "accelerate-tvm1", "non-lut", "--breakdown",
                 "--out", str(tmp_path)]) == 0
    md = (tmp_path / "bench_model.md").read_text()
    assert "### deit_tiny_patch16_224, batch 1, 1 thread" in md
    assert "| PyTorch dense fp32 (best dense) |" in md and "| 1.00x | 1.00x |" in md
    assert "| PyTorch LUT + accelerate_ (TVM kernels) |" in md and "failed" not in md
    assert "| accelerate_, TVM kernels on 1 thread |" in md
    assert "Where the time goes, PyTorch LUT + accelerate_" in md and "| fc2 | 12 |" in md
    assert (tmp_path / "bench_model.png").stat().st_size > 0


def test_bench_model_reports_a_failed_row_with_its_reason():
    from lutnn.tools.bench_model import Case, to_markdown

    case = Case("resnet18", 1, 1, ms={"torch-fp32": 10.0, "ort-fp32": 5.0, "torch-lut": 20.0},
                failed={"accelerate": "UserWarning: layer1.0.conv1: stays PyTorch: no TVM runner for LUTConv2d"})
    md = to_markdown([case], "## t")
    assert "| ONNX Runtime dense fp32 (best dense) | 5.00 | 1.00x | 2.00x |" in md
    assert "| PyTorch LUT eager | 20.00 | 0.25x | 0.50x |" in md
    assert "| PyTorch LUT + accelerate_ (TVM kernels) | failed: UserWarning: layer1.0.conv1" in md


@pytest.mark.parametrize("int8,fold_bn", [(False, False), (True, False), (True, True)],
                         ids=["fp32-tables", "int8-tables", "int8-tables-bn-folded"])
def test_accelerated_resnet_equals_pytorch_lut(int8, fold_bn):
    """A torchvision ResNet (3x3 V=9 convs with stride 2, 1x1 V=4 downsamples) through conv_runner;
    with ``fold_bn`` each conv's BatchNorm runs in its epilogue (the hooked conv output is then ``bn(conv(x))``).

    Compared layer by layer on the inputs the accelerated model feeds each layer: the kernel's
    ``|p|^2 - 2 x.p`` rounds differently from PyTorch's distances, so a sub-vector whose two nearest
    prototypes are within float rounding may pick the other one (tests/test_tvm_conv.py checks codes
    with that rule). Here: every output pixel equal but at most one or two such near-tie pixels a layer.
    """
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    lut, report = lutnn.convert(net, lutnn.LUTConfig(exclude=["conv1"], layer_types=["conv2d"],
                                                     overrides={"*downsample.0": {"subvec_len": 4}}))
    assert len(report.converted) == 19
    lutnn.init_prototypes(lut, lutnn.capture_rows(lut, [torch.randn(4, 3, 64, 64)], max_rows=256),
                          backend="torch", niter=2, seed=0)
    if int8:
        lutnn.quantize_tables_(lut, "output")
    lut.eval()
    for bn in (m for m in lut.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics to fold
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    acc = copy.deepcopy(lut)
    report = accelerate_(acc, AccelerateConfig(fold_bn=fold_bn))
    assert sorted(report.accelerated) == sorted([*lutnn.lut_layers(acc), "maxpool"])  # + the stem pool
    bn_of = {conv: bn for bn, conv in report.folded.items()}
    assert len(bn_of) == (19 if fold_bn else 0)
    assert not fold_bn or (bn_of["layer2.0.downsample.0"], bn_of["layer4.1.conv2"]) == ("layer2.0.downsample.1",
                                                                                         "layer4.1.bn2")
    modules = dict(lut.named_modules())
    seen = {}
    for name, layer in lutnn.lut_layers(acc).items():
        layer.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (a[0].clone(), o.clone())))
    eager = lutnn.lut_layers(lut)
    for batch in (1, 3):
        seen.clear()
        with torch.no_grad():
            acc(torch.randn(batch, 3, 64, 64))
            assert len(seen) == 19
            for name, (x, y) in seen.items():
                layer = eager[name]
                ref = modules[bn_of[name]](layer(x)) if fold_bn else layer(x)
                assert y.shape == ref.shape
                differ = ~torch.isclose(y, ref, rtol=1e-4, atol=1e-4).all(1)  # [B, H, W] output pixels
                assert int(differ.sum()) <= max(2, differ.numel() // 100), f"{name} batch {batch}: {differ.sum()}"
    runners = {name: dict(acc_state.runners) for name, acc_state in
               ((a.name, a) for a in _LAYERS.values() if a.layer_ref() in set(lutnn.lut_layers(acc).values()))}
    with torch.no_grad():
        acc(torch.randn(3, 3, 64, 64))  # a repeated shape reuses its runners (no refreeze per call)
    for a in _LAYERS.values():
        if a.name in runners:
            assert all(a.runners[shape] is fn for shape, fn in runners[a.name].items()), a.name
    x = torch.randn(1, 3, 64, 64)
    if fold_bn:  # training mode: the convs run the STE path and the BatchNorms run themselves
        acc.train(), lut.train()
        torch.testing.assert_close(acc(x), lut(x), rtol=1e-4, atol=1e-4)
        acc.eval(), lut.eval()
    unaccelerate_(acc)
    assert not any(k.startswith("_lutnn") or k == "forward" for m in acc.modules() for k in m.__dict__)
    with torch.no_grad():
        assert torch.equal(acc(x), lut(x))


def test_torch_compile_of_a_cnn_with_folded_bn_and_pool_kernel():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 16, 3, padding=1),
                        nn.BatchNorm2d(16), nn.ReLU()).eval()
    net[3].running_mean.uniform_(-0.5, 0.5), net[3].running_var.uniform_(0.5, 2)
    lut, _ = lutnn.convert(net, lutnn.LUTConfig(exclude=["0"], layer_types=["conv2d"]))
    lutnn.init_prototypes(lut, lutnn.capture_rows(lut, [torch.randn(4, 3, 16, 16)], max_rows=256),
                          backend="torch", niter=2, seed=0)
    lut.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = lut(x)
    report = accelerate_(lut)
    assert report.accelerated == ["1", "2"] and report.folded == {"3": "2"}
    compiled, graphs = _compile_recording_graphs(lut)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lut(x), ref, rtol=1e-4, atol=1e-4)
    op = torch.ops.lutnn.accelerated_lut
    assert len([n for gm in graphs for n in gm.graph.nodes if n.target in (op, op.default)]) == 2
    assert not [n for gm in graphs for n in gm.graph.nodes if "batch_norm" in str(n.target)]  # folded away
