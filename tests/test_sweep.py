"""``lutnn sweep``: tiny sweeps on digits write their files with the right rows, one layer replaced
alone leaves the rest of the model alone, and ``--suggest`` writes a loadable ``lut:`` block."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from lutnn.convert import convert_
from lutnn.pipeline.models import create_model
from lutnn.pipeline.resolve import config_from_dict
from lutnn.tools.sweep import LayerResult, build_replacement, main, suggest, swapped
from pipeline_cfg import tiny_config, write_config

LAYERS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    """A tiny config whose teacher the first sweep trains (and the others reuse)."""
    root = tmp_path_factory.mktemp("sweep")
    cfg = tiny_config(root / "run", teacher={"epochs": 1}, train={"epochs": 1})
    return cfg, write_config(root / "cfg.yaml", cfg)


def test_layers_sweep_writes_one_row_per_layer_setting_and_method(run):
    cfg, path = run
    assert main(["layers", "--config", str(path), "--prototypes", "4", "--suggest", "50"]) == 0
    out = Path(cfg["output_dir"]) / "sweeps"
    data = json.loads((out / "layers.json").read_text())
    rows = data["layers"]
    assert len(rows) == 4 * 2 * 3  # layers x (config's K=8, K=4) x methods
    assert {r["name"] for r in rows} == set(LAYERS)
    assert {(r["method"], r["num_prototypes"]) for r in rows} == {
        (m, k) for m in ("kmeans", "maddness", "kmeans-int8") for k in (8, 4)}
    assert all(r["drop"] == pytest.approx(data["dense_top1"] - r["top1"]) for r in rows)
    assert all(0 < r["error"] < 1.5 for r in rows)
    macs = {r["name"]: r["macs"] for r in rows}
    assert macs["blocks.0.attn.qkv"] == 5 * 32 * 96  # 4 patches + cls token, D=32, M=96
    assert len([line for line in (out / "layers.md").read_text().splitlines() if line.startswith("| blocks.")]) == 24
    assert (out / "layers.png").stat().st_size > 1000

    # --suggest 50: a generous budget replaces every layer with its largest MAC saving
    block = yaml.safe_load((out / "suggest.yaml").read_text())["lut"]
    assert block["exclude"] == []
    loaded = config_from_dict({**cfg, "lut": block}, "suggest.yaml")
    model = create_model(loaded.model, 10)
    report = convert_(model, loaded.lut_config())
    assert sorted(report.names) == sorted(LAYERS)
    assert all(r.num_prototypes == 4 for r in report.converted)  # K=4 saves more MACs than K=8


def test_suggest_picks_the_largest_saving_within_budget_and_loads():
    def result(name, variant, k, drop, saved):
        return LayerResult(name, "Linear", "32x32", f"K={k}", variant, 8, k, 4, "kmeans", 1000, saved, 0.1,
                           90.0 - drop, drop, 0.1)

    results = [result("a", 0, 8, 0.5, 500), result("a", 1, 4, 2.0, 700),
               result("b", 0, 8, 1.0, 400), result("b", 1, 4, -0.2, 300),
               result("c", 0, 8, 3.0, 900)]
    s = suggest(results, 1.5, {"subvec_len": 4, "num_prototypes": 8, "exclude": ["head"]}, ["a", "b", "c"])
    # options within 1.5 points: a@K8 (0.5) + b@K8 (1.0) = 900 saved beats a@K8 + b@K4 (800) and c alone
    assert s.replaced == ["a", "b"] and s.macs_saved == 900 and s.predicted_drop == pytest.approx(1.5)
    assert s.lut["exclude"] == ["head", "c"] and s.lut["overrides"] == {}
    s = suggest(results, 0.0, {"subvec_len": 4}, ["a", "b", "c"])
    assert s.replaced == ["b"] and s.lut["overrides"] == {"b": {"subvec_len": 4, "num_prototypes": 4}}


def test_replacing_a_layer_alone_changes_only_that_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10)).eval()
    x = torch.randn(40, 16)
    rows = model[1](model[0](x))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def trace(m):
        outs = []
        hooks = [mod.register_forward_hook(lambda mod, a, y: outs.append((mod, a[0], y)))
                 for mod in m.children()]
        y = m(x)
        for h in hooks:
            h.remove()
        return y, outs

    dense_y, dense_outs = trace(model)
    for method in ("kmeans", "maddness", "kmeans-int8"):
        lut = build_replacement(method, model[2], rows, {"num_codebooks": 8, "num_prototypes": 16})
        with swapped(model, "2", lut):
            y, outs = trace(model)
            assert model[2] is lut
        assert [m for m, *_ in outs] == [model[0], model[1], lut, model[3], model[4]]
        for (m, a, out), (_, _, dense_out) in zip(outs[:2], dense_outs[:2]):
            assert torch.equal(out, dense_out)  # upstream: identical
        assert not torch.equal(outs[2][2], dense_outs[2][2])  # the replaced layer differs
        for m, a, out in outs[3:]:
            assert torch.equal(out, m(a))  # downstream modules are the original ones
        assert not torch.equal(y, dense_y)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing else touched
        assert torch.equal(model(x), dense_y)  # restored


def test_calibration_sweep_rows(run):
    cfg, path = run
    assert main(["calibration", "--config", str(path), "--images", "16", "40"]) == 0
    out = Path(cfg["output_dir"]) / "sweeps"
    rows = json.loads((out / "calibration.json").read_text())["rows"]
    assert [(r["images"], r["method"]) for r in rows] == [(16, "kmeans"), (16, "maddness"), (40, "kmeans"),
                                                        (40, "maddness")]
    assert rows[0]["rows"] == 16 * 5 and rows[2]["rows"] == 40 * 5  # 5 tokens per image
    assert (out / "calibration.png").stat().st_size > 1000
    assert len([line for line in (out / "calibration.md").read_text().splitlines()
                if line.startswith("| 16 ") or line.startswith("| 40 ")]) == 4


def test_progressive_steps_and_resume(run):
    cfg, path = run
    args = ["progressive", "--config", str(path), "--order", "front", "--group", "3", "--no-all-at-once"]
    assert main(args) == 0
    out = Path(cfg["output_dir"]) / "sweeps"
    steps = json.loads((out / "progressive.json").read_text())["steps"]
    assert [s["layers"] for s in steps] == [3, 4]
    assert steps[0]["replaced"] == LAYERS[:3] and steps[1]["replaced"] == LAYERS[3:]
    assert 0 < steps[0]["mac_fraction"] < steps[1]["mac_fraction"] <= 1
    last = out / "progressive" / "step_02" / "last.pt"
    stamp = last.stat().st_mtime_ns
    (out / "progressive" / "step_02" / "result.json").unlink()  # as if killed after training
    assert main(args) == 0
    assert last.stat().st_mtime_ns == stamp  # resumed: the finished step was not retrained
    assert json.loads((out / "progressive.json").read_text())["steps"][1]["top1"] == steps[1]["top1"]


def test_bad_input_is_one_line(run, capsys):
    _, path = run
    assert main(["progressive", "--config", str(path), "--group", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --group and --epochs must be >= 1"


def test_sensitivity_order_uses_the_configs_setting(tmp_path):
    from types import SimpleNamespace

    from lutnn.tools.sweep import progressive_order

    rows = [{"name": n, "method": "kmeans", "variant": v, "drop": d}
            for n, v, d in (("a", 0, 2.0), ("a", 1, -1.0), ("b", 0, 0.5), ("b", 1, 3.0), ("c", 0, 0.5))]
    rows.append({"name": "a", "method": "maddness", "variant": 0, "drop": -5.0})
    (tmp_path / "layers.json").write_text(json.dumps({"layers": rows}))
    setup = SimpleNamespace(out=tmp_path, names=["a", "b", "c"])
    assert progressive_order(setup, "sensitivity") == ["b", "c", "a"]  # least sensitive first, ties in model order
    assert progressive_order(setup, "front") == ["a", "b", "c"]
