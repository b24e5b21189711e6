"""Silent wrong answers: paths that bypass LUT layers, stale tables, crash windows, boundary inputs.

Each of the four defects of issue 10 has a test here that fails on the code before the fix:
``test_transformer_encoder_layer_runs_the_lut``, ``test_data_edits_rebuild_the_table``,
``test_kill_between_renames_never_leaves_best_stale`` and ``test_bad_v_in_override_names_the_override``.
"""
import os
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import lutnn
from lutnn import LUTConfig, LUTConv2d, LUTLinear, bypassed_lut_layers
from lutnn.layers import functional as LF

ROOT = Path(__file__).resolve().parents[1]


def _randomise_tables(model: nn.Module) -> None:
    """Prototypes far from the identity of a fresh init, so every layer's output visibly depends on them."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lutnn.lut_layers(model).values():
            layer.prototypes.copy_(torch.randn(layer.prototypes.shape, generator=gen))


# --------------------------------------------------------------------------- defect 1: fast paths

def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0).eval()


def test_transformer_encoder_layer_runs_the_lut():
    enc = _encoder_layer()
    report = lutnn.convert_(enc, LUTConfig(subvec_len=4))
    assert report.names == ["linear1", "linear2"]
    assert report.fast_paths_off == [("", "fused encoder-layer kernel reads linear1/linear2 weights")]
    assert "Fast paths turned off" in report.to_markdown()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        lut = enc(x)
        lutnn.set_mode(enc, "dense")
        dense = enc(x)
        lutnn.set_mode(enc, "auto")
        assert (lut - dense).abs().max() > 0.1  # 0.0 when the fused kernel read linear1/linear2.weight
        ref = enc(x)  # same result as the module's own (slow) path with grad enabled
    with torch.enable_grad():
        torch.testing.assert_close(enc(x), ref)
    assert bypassed_lut_layers(enc, x) == []


def test_transformer_encoder_nested_fast_path_is_off():
    torch.manual_seed(0)
    stack = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=True).eval()
    assert stack.use_nested_tensor
    report = lutnn.convert_(stack, LUTConfig(subvec_len=4))
    assert ("", "nested-tensor fast path") in report.fast_paths_off
    x = torch.randn(2, 5, 32)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])  # padding: the nested-tensor trigger
    with torch.no_grad():
        out = stack(x, src_key_padding_mask=mask)
    assert out.shape == x.shape
    assert bypassed_lut_layers(stack, x) == []


def test_fast_path_left_on_when_nothing_inside_was_converted():
    enc = _encoder_layer()
    report = lutnn.convert_(enc, LUTConfig(subvec_len=4, layer_types=["conv2d"]))
    assert not report.converted and not report.fast_paths_off
    assert enc.activation_relu_or_gelu == 1


def test_bypass_helper_finds_a_bypassed_layer():
    """The helper itself: a module reading its child's weight directly is reported by name."""
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return nn.functional.linear(self.a(x), self.b.weight, self.b.bias)

    model = Sneaky()
    lutnn.convert_(model, LUTConfig(subvec_len=4))
    assert bypassed_lut_layers(model, torch.randn(3, 8)) == ["b"]


def _deit(**kw):
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10,
                             **{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, **kw})


def _live_branches(model: nn.Module) -> nn.Module:
    """Undo zero-init of residual-branch norms (timm ResNet, LeViT): a zeroed branch really is bypassed."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
    return model


FAMILIES = {
    "timm_deit": (_deit, (1, 3, 16, 16)),
    "timm_levit": (lambda: timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64),
                   (1, 3, 64, 64)),
    "timm_resnet": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), (1, 3, 16, 16)),
    "tv_resnet": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), (1, 3, 16, 16)),
    "nn_transformer": (lambda: nn.TransformerEncoder(_encoder_layer(), 2, enable_nested_tensor=False), (2, 5, 32)),
}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "timm_levit" else f
                                    for f in sorted(FAMILIES)])
def test_every_lut_layer_is_on_the_eval_path(family):
    build, shape = FAMILIES[family]
    torch.manual_seed(0)
    model = _live_branches(build()).eval()
    report = lutnn.convert_(model, LUTConfig(num_prototypes=4, strict=False))
    assert report.converted
    assert bypassed_lut_layers(model, torch.randn(shape)) == []


def _config_runs() -> list[tuple[str, dict]]:
    """Every run config in configs/: plain ones, and each model of a study config (lutnn study)."""
    from lutnn.pipeline.config import read_config
    from lutnn.tools.study import load_study

    runs = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = read_config(path)
        if "models" in raw and "base" in raw:
            runs += [(f"{path.name}:{m.name}", m.run) for m in load_study(path)[1]]
        else:
            runs.append((path.name, raw))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name,raw", _config_runs(), ids=[n for n, _ in _config_runs()])
def test_config_models_use_every_lut_layer(name, raw):
    """The configs' own models and conversions; ViTs above 32 pixels are built for 32 (same layers, 17 tokens)."""
    from lutnn.pipeline.config import parse_config
    from lutnn.pipeline.models import create_model

    cfg = parse_config(raw, name)
    size = cfg.data.image_size
    if cfg.model.source == "timm" and size > 32:
        size, cfg.model.kwargs = 32, {**cfg.model.kwargs, "img_size": 32}
    torch.manual_seed(0)
    model = _live_branches(create_model(cfg.model, num_classes=10)).eval()
    lutnn.convert_(model, cfg.lut_config())
    assert bypassed_lut_layers(model, torch.randn(1, 3, size, size)) == []


# --------------------------------------------------------------------------- audit: other bypass routes

def _small_lut_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    lutnn.convert_(model, LUTConfig(num_prototypes=8))
    _randomise_tables(model)
    return model


def test_torch_export_traces_the_lut_forward():
    model, x = _small_lut_model(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        eager = model(x)
    ep = torch.export.export(model, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("embedding_bag" in op for op in ops) and not any("conv2d" in op for op in ops)
    torch.testing.assert_close(ep.module()(x), eager)
    assert "0.prototypes" in ep.state_dict and "3.prototypes" in ep.state_dict


def test_torch_compile_traces_the_lut_forward():
    model, x = _small_lut_model(), torch.randn(2, 3, 6, 6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(compiled(x), eager)
        model[3].prototypes.mul_(-1)  # the compiled graph reads the live parameters, no baked-in table
        torch.testing.assert_close(compiled(x), model(x))
        assert not torch.allclose(compiled(x), eager)


def test_load_state_dict_refreshes_tables():
    a, b = _small_lut_model(), _small_lut_model()
    with torch.no_grad():
        for layer in lutnn.lut_layers(b).values():
            layer.prototypes.mul_(2)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        a(x)  # tables cached
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x))
        a.load_state_dict(_small_lut_model().state_dict(), assign=True)
        torch.testing.assert_close(a(x), _small_lut_model()(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_compute_the_fp32_codes(dtype):
    model, x = _small_lut_model(), torch.randn(2, 3, 6, 6)
    low = model.to(dtype)
    ref = _small_lut_model().to(dtype).float()  # same rounded parameters, computed in fp32
    with torch.no_grad():
        out = low(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref(x.to(dtype).float()).to(dtype), rtol=0, atol=0)
    low.train()
    out = low(x.to(dtype))
    out.float().sum().backward()
    assert low[0].prototypes.grad.dtype == dtype and torch.isfinite(low[0].prototypes.grad).all()


def test_channels_last_conv_keeps_its_table_cache():
    torch.manual_seed(0)
    conv = LUTConv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        ref = conv(x)
        conv.to(memory_format=torch.channels_last)
        assert not conv.weight.is_contiguous()
        out = conv(x.to(memory_format=torch.channels_last))
        table = conv._table_cache[1]
        conv(x)
        assert conv._table_cache[1] is table  # keyed on the parameter, not on weight_2d()'s fresh copy
    torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- defect 2: .data edits

@pytest.mark.parametrize("param", ["weight", "prototypes"])
@pytest.mark.parametrize("int8", [False, True])
def test_data_edits_rebuild_the_table(param, int8):
    torch.manual_seed(0)
    layer = LUTLinear(16, 8, subvec_len=4).eval()
    if int8:
        layer.quantize_tables("output")
    x = torch.randn(5, 16)
    with torch.no_grad():
        before = layer(x)
        version = getattr(layer, param)._version
        getattr(layer, param).data.mul_(2)  # does not bump the version counter
        assert getattr(layer, param)._version == version
        fresh = LUTLinear(16, 8, subvec_len=4).eval()
        fresh.load_state_dict(layer.state_dict())
        if int8:
            fresh.quantize_tables("output")
        after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh(x))


def test_pruning_a_single_weight_is_seen():
    torch.manual_seed(0)
    layer = LUTLinear(16, 8, subvec_len=4).eval()
    with torch.no_grad():
        layer(torch.randn(1, 16))
        key = layer._params_key()
        layer.weight.data[3, 5] = 0.0
        assert layer._params_key() != key


# --------------------------------------------------------------------------- defect 3: checkpoint pair

def test_kill_between_renames_never_leaves_best_stale(tmp_path, monkeypatch):
    """Die at every rename of a best-epoch save: last.pt must never be newer than best.pt."""
    from lutnn.pipeline.train.checkpoint import load_checkpoint, save_checkpoint

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint(last, {"epoch": 1}, best)
    real_replace = os.replace

    class Killed(Exception):
        pass

    for survive in range(2):  # how many renames get through before the "kill"
        calls = []

        def replace(src, dst):
            if len(calls) == survive:
                raise Killed
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            save_checkpoint(last, {"epoch": 2}, best)
        monkeypatch.setattr(os, "replace", real_replace)
        assert load_checkpoint(best)["epoch"] >= load_checkpoint(last)["epoch"], f"after {survive} renames"
    save_checkpoint(last, {"epoch": 2}, best)
    assert load_checkpoint(best)["epoch"] == load_checkpoint(last)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp files left


# --------------------------------------------------------------------------- defect 4: override keys

def test_bad_v_in_override_names_the_override(tmp_path):
    from lutnn.pipeline.config import ConfigError
    from lutnn.pipeline.resolve import load_config
    from pipeline_cfg import tiny_config, write_config

    def error(lut):
        path = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run", lut=lut))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        return str(info.value)

    msg = error({"overrides": {"blocks.0.mlp.fc2": {"subvec_len": 5}}})  # fc2: D=128
    assert "lut.overrides['blocks.0.mlp.fc2'].subvec_len" in msg and "blocks.0.mlp.fc2" in msg
    msg = error({"overrides": {"blocks.*": {"num_codebooks": 0}}})
    assert "lut.overrides['blocks.*'].num_codebooks" in msg
    msg = error({"overrides": {"blocks.*": {"num_prototypes": 300}}})
    assert "lut.overrides['blocks.*'].num_prototypes" in msg
    # later overrides win, and so does the key they name
    msg = error({"subvec_len": 4, "overrides": {"blocks.*": {"subvec_len": 8}, "blocks.0.attn.*": {"subvec_len": 3}}})
    assert "lut.overrides['blocks.0.attn.*'].subvec_len" in msg
    assert "lut.subvec_len:" in error({"subvec_len": 5})


# --------------------------------------------------------------------------- boundary inputs

@pytest.mark.parametrize("make, shape", [
    (lambda: LUTLinear(16, 8, subvec_len=4), (0, 16)),
    (lambda: LUTLinear(16, 8, subvec_len=4), (0, 3, 16)),
    (lambda: LUTConv2d(3, 4, 3, padding=1), (0, 3, 6, 6)),
])
@pytest.mark.parametrize("mode", ["lut", "ste", "dense"])
def test_empty_batches(make, shape, mode):
    layer = make().set_mode(mode)
    out = layer(torch.randn(shape))
    assert out.shape[0] == 0 and out.dim() == len(shape)


def _codes_after(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The codes a layer's eval forward computes for ``x`` (captured from the encode call)."""
    seen = []
    real = layer.encode
    layer.encode = lambda rows: seen.append(real(rows)) or seen[-1]
    try:
        with torch.no_grad():
            layer(x)
    finally:
        del layer.encode
    return seen[0]


def test_batch_one_noncontiguous_and_channels_last_give_the_same_codes():
    torch.manual_seed(0)
    lin = LUTLinear(16, 8, subvec_len=4).eval()
    x = torch.randn(16, 6)
    codes = _codes_after(lin, x.t().contiguous())
    assert torch.equal(_codes_after(lin, x.t()), codes)  # non-contiguous view
    assert torch.equal(_codes_after(lin, x.t()[2:3]), codes[2:3])  # batch of one
    conv = LUTConv2d(3, 4, 3, padding=1).eval()
    xi = torch.randn(2, 3, 6, 6)
    codes = _codes_after(conv, xi)
    assert torch.equal(_codes_after(conv, xi.to(memory_format=torch.channels_last)), codes)
    assert torch.equal(_codes_after(conv, xi[1:]), codes[36:])
    assert torch.equal(_codes_after(conv, xi[:, :, ::1, :].transpose(2, 3).transpose(2, 3)), codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_the_fp32_codes(dtype):
    torch.manual_seed(0)
    lin = LUTLinear(16, 8, subvec_len=4).eval()
    x = torch.randn(64, 16).to(dtype)
    assert torch.equal(_codes_after(lin, x), _codes_after(lin, x.float()))
    with torch.no_grad():
        out = lin(x)
        assert out.dtype == torch.float32  # fp32 parameters: fp32 tables and output
        torch.testing.assert_close(out, lin(x.float()), rtol=0, atol=0)


@pytest.mark.parametrize("k, v", [(1, 4), (256, 4), (16, 16), (16, 1)])
def test_extreme_codebook_shapes(k, v):
    """K=1, K=256 (codes fill uint8), V=D (one codebook), V=1: all modes agree and gradients flow."""
    torch.manual_seed(0)
    layer = LUTLinear(16, 8, subvec_len=v, num_prototypes=k)
    assert layer.prototypes.shape == (16 // v, k, v)
    x = torch.randn(300, 16)
    if k == 256:
        with torch.no_grad():  # prototypes = the input's own sub-vectors: every code appears
            layer.prototypes.copy_(LF.split_subvectors(x[:256], 16 // v))
    ste = layer.set_mode("ste")(x)
    ste.sum().backward()
    assert torch.isfinite(layer.prototypes.grad).all() and torch.isfinite(layer.log_tau.grad).all()
    with torch.no_grad():
        lut = layer.set_mode("lut")(x)
        codes = layer.encode(x)
    torch.testing.assert_close(lut, ste.detach(), rtol=1e-5, atol=1e-5)
    assert codes.dtype == torch.uint8 and int(codes.max()) == k - 1
    if k == 1:
        assert torch.equal(lut, lut[:1].expand_as(lut))  # one prototype: a constant output


def test_k_above_256_is_a_clear_error():
    with pytest.raises(ValueError, match=r"num_prototypes \(K\) must be in \[1, 256\]"):
        LUTLinear(16, 8, num_prototypes=257)
    with pytest.raises(ValueError, match="V must divide D"):
        LUTLinear(16, 8, subvec_len=5)
