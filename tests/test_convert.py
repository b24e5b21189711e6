"""convert_/convert on real timm and torchvision architectures."""
import pytest
import timm
import torch
import torchvision
from torch import nn

import lutnn
from lutnn import LUTConfig, LUTConfigError, LUTConv2d, LUTLinear


def _dense_counts(model: nn.Module) -> dict[str, int]:
    return {
        "linear": sum(type(m) is nn.Linear for m in model.modules()),
        "conv2d": sum(type(m) is nn.Conv2d for m in model.modules()),
    }


@pytest.mark.parametrize("name, build, input_size", [
    ("deit_tiny", lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False), 224),
    ("levit_128s", lambda: timm.create_model("levit_128s", pretrained=False), 224),
    ("timm_resnet18", lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), 64),
    ("tv_resnet18", lambda: torchvision.models.resnet18(weights=None, num_classes=10), 64),
])
def test_convert_real_models_forward(name, build, input_size):
    torch.manual_seed(0)
    model = build().eval()
    counts = _dense_counts(model)
    x = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        dense_out = model(x)
    report = lutnn.convert_(model, LUTConfig())
    assert len(report.converted) == counts["linear"] + counts["conv2d"]
    assert not report.skipped
    assert _dense_counts(model) == {"linear": 0, "conv2d": 0}
    with torch.no_grad():
        lut_out = model(x)  # eval -> lut mode
        lutnn.set_mode(model, "dense")
        torch.testing.assert_close(model(x), dense_out, rtol=1e-4, atol=1e-4)
    assert lut_out.shape == dense_out.shape and torch.isfinite(lut_out).all()


def test_deit_excludes_and_overrides():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    cfg = LUTConfig(
        subvec_len=4,
        exclude=["patch_embed.*", "head"],
        overrides={"blocks.*.mlp.fc2": {"subvec_len": 16}, "blocks.11.*": {"num_codebooks": 24, "num_prototypes": 8}},
    )
    report = lutnn.convert_(model, cfg)
    assert len(report.converted) == 12 * 4  # qkv, proj, fc1, fc2 per block
    assert type(model.head) is nn.Linear and type(model.patch_embed.proj) is nn.Conv2d
    by_name = {r.name: r for r in report.converted}
    assert (by_name["blocks.0.attn.qkv"].subvec_len, by_name["blocks.0.attn.qkv"].num_prototypes) == (4, 16)
    assert by_name["blocks.0.mlp.fc2"].subvec_len == 16 and by_name["blocks.0.mlp.fc2"].num_codebooks == 48
    # later override wins: blocks.11.mlp.fc2 is C=24 (V=32), K=8
    assert (by_name["blocks.11.mlp.fc2"].num_codebooks, by_name["blocks.11.mlp.fc2"].num_prototypes) == (24, 8)
    assert by_name["blocks.11.attn.qkv"].subvec_len == 8
    fc1 = model.blocks[0].mlp.fc1
    assert isinstance(fc1, LUTLinear) and by_name["blocks.0.mlp.fc1"].params_after == (
        fc1.weight.numel() + fc1.bias.numel() + fc1.prototypes.numel() + 1
    )
    assert "48 layers converted" in report.to_markdown()


def test_include_selects_by_name_and_type():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report = lutnn.convert_(model, LUTConfig(include=["layer4.*"], layer_types=["conv2d"]))
    assert report.names == [
        "layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
    ]
    assert isinstance(model.layer4[0].conv1, LUTConv2d) and model.layer4[0].conv1.subvec_len == 9
    assert model.layer4[0].downsample[0].subvec_len == 8  # 1x1 conv uses the linear default
    assert type(model.fc) is nn.Linear and type(model.layer3[0].conv1) is nn.Conv2d


def test_convert_copy_leaves_original():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    converted, report = lutnn.convert(model, {"subvec_len": 4})
    assert len(report.converted) == 2
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert isinstance(converted[0], LUTLinear)


def test_multihead_attention_projection_is_left_alone():
    """nn.MultiheadAttention reads out_proj.weight directly, so swapping it would be silently ignored."""
    model = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    report = lutnn.convert_(model, LUTConfig(subvec_len=4))
    assert sorted(report.names) == ["linear1", "linear2"]
    model(torch.randn(2, 5, 16))


def test_indivisible_layers_error_or_skip():
    model = nn.Sequential(nn.Linear(30, 8), nn.Linear(8, 4))
    with pytest.raises(LUTConfigError, match=r"layer '0' \(linear\): .*D=30 is not C\*V"):
        lutnn.convert(model, LUTConfig(subvec_len=4))
    _, report = lutnn.convert(model, LUTConfig(subvec_len=4, strict=False))
    assert report.names == ["1"] and report.skipped[0][0] == "0"


def test_grouped_conv_skipped_when_not_strict():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1))
    with pytest.raises(LUTConfigError, match="groups=4"):
        lutnn.convert(model)
    _, report = lutnn.convert(model, LUTConfig(strict=False))
    assert report.names == ["1"] and "groups=4" in report.skipped[0][1]


@pytest.mark.parametrize("cfg, match", [
    (dict(include=["blocks.*"]), "include pattern 'blocks.*' matched no convertible layer; layers: 0, 2"),
    (dict(exclude=["head"]), "exclude pattern 'head' matched no"),
    (dict(overrides={"fc9": {"subvec_len": 2}}), "overrides pattern 'fc9' matched no"),
    (dict(overrides={"0": {"V": 2}}), r"overrides\['0'\]: unknown keys \['V'\]"),
    (dict(subvec_len=4, num_codebooks=2), "give num_codebooks or subvec_len, not both"),
    (dict(num_prototypes=512), r"num_prototypes \(K\) must be an integer in \[1, 256\], got 512"),
    (dict(subvec_len=0), "subvec_len must be a positive integer, got 0"),
    (dict(layer_types=["lstm"]), r"layer_types: unknown \['lstm'\]"),
    (dict(include="0"), "include must be a list of strings"),
    (dict(kmeans=3), r"unknown keys \['kmeans'\]"),
])
def test_bad_configs_give_clear_errors(cfg, match):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(LUTConfigError, match=match):
        lutnn.convert(model, cfg)


def test_quantize_tables_on_a_whole_model():
    model, report = lutnn.convert(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), {"subvec_len": 4})
    model.eval()
    x = torch.randn(5, 16)
    y_fp32 = model(x)
    errors = lutnn.quantize_tables_(model)
    assert list(errors) == report.names and all(e["table_rel_error"] < 0.02 for e in errors.values())
    assert all(layer.quantized_table is not None for layer in lutnn.lut_layers(model).values())
    assert not torch.equal(model(x), y_fp32)
    lutnn.quantize_tables_(model, None)
    torch.testing.assert_close(model(x), y_fp32)
