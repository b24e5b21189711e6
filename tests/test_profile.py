"""OpCounter: LUT rules against hand-computed counts, dense totals against thop, size formulas."""
import copy

import pytest
import torch
from torch import nn

import lutnn
from lutnn import LUTConv2d, LUTLinear
from lutnn.tools import profile as P


def _cost(prof: P.ModelProfile, name: str) -> P.LayerCost:
    return next(c for c in prof.layers if c.name == name)


def test_lut_linear_rule_hand_computed():
    # D=32, M=10, V=8 -> C=4, K=16; input [3, 5, 32] -> N=15 rows
    net = nn.Sequential(LUTLinear(32, 10, subvec_len=8)).eval()
    c = _cost(P.profile(net, torch.randn(3, 5, 32)), "0")
    assert (c.macs, c.compares, c.adds) == (15 * 4 * 16 * 8, 15 * 4 * 15, 15 * 4 * 10) == (7680, 900, 600)
    assert c.flops == 2 * 7680 + 900 + 600
    assert c.bytes_fp32 == 4 * (4 * 16 * 8 + 4 * 16 * 10 + 10) == 4648
    assert c.bytes_int8 == 4 * (4 * 16 * 8 + 10 + 10) + 4 * 16 * 10 == 2768
    assert c.code_bytes == 15 * 4 * 4 / 8  # 4-bit codes


def test_layer_called_twice_counts_twice():
    layer = LUTLinear(32, 32, subvec_len=8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = layer

        def forward(self, x):
            return self.fc(self.fc(x))

    c = _cost(P.profile(Twice().eval(), torch.randn(15, 32)), "fc")
    assert (c.macs, c.compares, c.adds) == (2 * 15 * 4 * 16 * 8, 2 * 15 * 4 * 15, 2 * 15 * 4 * 32)


def test_lut_conv_rule_hand_computed():
    # D = 3*3*3 = 27, V = kh*kw = 9 -> C=3, K=16, M=4; [2, 3, 8, 8] with padding 1 -> N = 2*8*8
    net = nn.Sequential(LUTConv2d(3, 4, 3, padding=1)).eval()
    c = _cost(P.profile(net, torch.randn(2, 3, 8, 8)), "0")
    assert (c.macs, c.compares, c.adds) == (128 * 3 * 16 * 9, 128 * 3 * 15, 128 * 3 * 4) == (55296, 5760, 1536)
    assert c.bytes_fp32 == 4 * (3 * 16 * 9 + 3 * 16 * 4 + 4) == 2512
    assert c.bytes_int8 == 4 * (3 * 16 * 9 + 4 + 4) + 3 * 16 * 4 == 1952


def test_int8_size_follows_the_quantized_granularity():
    layer = LUTLinear(32, 10, subvec_len=8, bias=False)
    layer.quantize_tables("codebook")  # one scale per codebook instead of per output
    assert P.table_layer_bytes(layer) == (4 * (512 + 640), 4 * (512 + 4) + 640)


def test_maddness_layer_counts_compares_and_adds_but_no_multiplies():
    from lutnn.maddness import MaddnessLinear

    torch.manual_seed(0)
    layer = MaddnessLinear.fit(torch.randn(200, 32), torch.randn(10, 32), torch.randn(10), subvec_len=8)
    c = _cost(P.profile(nn.Sequential(layer), torch.randn(15, 32)), "0")  # C=4, L=4, K=16, M=10, N=15
    assert (c.macs, c.compares, c.adds) == (0, 15 * 4 * 4, 15 * 4 * 10)
    assert c.bytes_fp32 == 4 * 4 * 15 + 4 * 4 + 4 * (4 * 16 * 10) + 4 * 10
    assert c.bytes_int8 == 4 * 4 * 15 + 4 * 4 + 4 * 16 * 10 + 4 * 10 + 4 * 10


def test_dense_mode_lut_layer_counts_like_the_dense_layer():
    dense = nn.Sequential(nn.Linear(32, 10)).eval()
    lut, _ = lutnn.convert(dense)
    lutnn.set_mode(lut, "dense")
    x = torch.randn(7, 32)
    assert _cost(P.profile(lut, x), "0").macs == P.thop_macs(copy.deepcopy(dense), (x,)) == 7 * 32 * 10


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


@pytest.mark.parametrize("make", [_small_cnn, lambda: __import__("timm").create_model("resnet18", pretrained=False)])
def test_dense_totals_match_thop_and_state_is_untouched(make):
    model = make().eval()
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    prof = P.profile(model, x)
    assert list(model.state_dict()) == keys, "thop's temporary buffers leaked into the model"
    assert prof.macs == P.thop_macs(copy.deepcopy(model), (x,)) > 0
    assert prof.total("adds") == prof.total("compares") == 0


def test_dense_size_is_fp32_params_and_float_buffers():
    model = _small_cnn()
    params = sum(p.numel() for p in model.parameters())
    bn_stats = 2 * 16  # running_mean/var; num_batches_tracked is an integer counter
    assert P.profile(model, torch.zeros(1, 3, 8, 8)).bytes_fp32 == 4 * (params + bn_stats)


def test_lut_size_replaces_weights_by_prototypes_and_tables():
    model = _small_cnn()
    lut, report = lutnn.convert(model)
    assert len(report.converted) == 3
    dense_bytes = P.profile(model, torch.zeros(1, 3, 8, 8)).bytes_fp32
    expected = dense_bytes
    for layer, dense_layer in ((lut[0], model[0]), (lut[3], model[3]), (lut[7], model[7])):
        expected += P.table_layer_bytes(layer)[0] - 4 * sum(p.numel() for p in dense_layer.parameters())
    assert P.profile(lut.eval(), torch.zeros(1, 3, 8, 8)).bytes_fp32 == expected


def test_converted_model_has_fewer_multiplies_and_nonzero_lut_work():
    dense, lut = P.profile_pair("resnet18", input_size=(3, 32, 32))
    assert lut.macs < dense.macs / 2
    assert lut.total("adds") > 0 and lut.total("compares") > 0
    assert lut.bytes_int8 < dense.bytes_fp32
    # the stem and the classifier stay dense
    assert _cost(lut, "conv1").kind == "Conv2d" and _cost(lut, "fc").kind == "Linear"
    assert _cost(lut, "layer1.0.conv1").kind == "LUTConv2d"


def test_ends_to_keep_dense_reads_timm_cfg():
    import timm

    assert P.ends_to_keep_dense(timm.create_model("deit_tiny_patch16_224", pretrained=False)) == [
        "patch_embed.proj", "head"]


def test_cli_prints_markdown_and_per_layer(capsys, tmp_path):
    out = tmp_path / "p.md"
    assert P.main(["--model", "resnet18", "--input-size", "3", "32", "32", "--subvec-len", "4",
                   "--per-layer", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| resnet18 (dense) | 1x3x32x32 |" in text and "| resnet18 (LUT) |" in text
    assert "| layer1.0.conv1 | LUTConv2d |" in text
    assert out.read_text().strip() == text.strip()


def test_cli_bad_inputs_are_one_line_errors(capsys, tmp_path):
    assert P.main(["--model", "no_such_model_xyz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model 'no_such_model_xyz'") and "\n" not in err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("lut:\n  subvec_len: 8\n  prototypes: 16\n")
    assert P.main(["--model", "resnet18", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(cfg) in err and "prototypes" in err and "\n" not in err


def test_cli_config_file_is_applied(capsys, tmp_path):
    cfg = tmp_path / "k8.yaml"
    cfg.write_text("lut:\n  num_prototypes: 8\n")
    assert P.main(["--model", "resnet18", "--input-size", "3", "32", "32", "--config", str(cfg), "--per-layer"]) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| layer1.0.conv1 | LUTConv2d"))
    # 32x32 -> stride-2 stem and max-pool -> 8x8 = 64 rows; D = 64*9, V = 9 -> C = 64; K = 8
    assert row.split("|")[5].strip() == f"{64 * 64 * 7:,}"


def test_opcounter_notebook_executes_in_the_venv_kernel(tmp_path, monkeypatch):
    """Runs notebooks/OpCounter.ipynb end to end (so it cannot rot) in a kernel of *this* interpreter."""
    import json
    import sys
    from pathlib import Path

    import nbformat
    from nbclient import NotebookClient

    spec_dir = tmp_path / "kernels" / "lutnn-test"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lutnn test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    path = Path(__file__).resolve().parents[1] / "notebooks" / "OpCounter.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    NotebookClient(nb, kernel_name="lutnn-test", timeout=300,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.executable
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    table = next(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    for row in ("deit_tiny_patch16_224 (dense)", "deit_tiny_patch16_224 (LUT)", "resnet18 (dense)", "resnet18 (LUT)"):
        assert f"| {row} |" in table
    assert any("image/png" in o.get("data", {}) for o in outputs), "the bar chart was not drawn"


def test_cli_reads_a_run_config_model_and_input_size(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  name: resnet18\n  kwargs: {num_classes: 10, in_chans: 1}\n"
                   "data:\n  image_size: 16\nlut:\n  subvec_len: 4\n  exclude: [fc]\n")
    assert P.main(["--config", str(cfg), "--per-layer"]) == 0
    out = capsys.readouterr().out
    assert "| resnet18 (LUT) | 1x1x16x16 |" in out
    assert "| conv1 | Conv2d |" in out and "| fc | Linear |" in out  # stem and head stay dense
    # 16x16 -> stem stride 2 and max-pool -> 4x4 = 16 rows; D = 64*9, V = 4 -> C = 144
    row = next(r for r in out.splitlines() if r.startswith("| layer1.0.conv1 | LUTConv2d"))
    assert row.split("|")[5].strip() == f"{16 * 144 * 15:,}"
