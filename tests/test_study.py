"""``lutnn study``: config validation and a tiny end-to-end run on digits."""
import json

import pytest
import yaml

from lutnn.pipeline.config import ConfigError
from lutnn.tools.study import METHODS, job_groups, load_study, main
from pipeline_cfg import tiny_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _study(tmp_path, **over) -> dict:
    base = tiny_config(tmp_path / "unused")
    base.pop("output_dir")
    base["data"].update(image_size=8, train_limit=64, eval_limit=32)
    base["teacher"]["epochs"] = 1
    base["train"]["epochs"] = 1
    base["log"] = {"tensorboard": False, "plot": False}
    deit = {"model": base.pop("model"), "lut": base.pop("lut")}
    study = {
        "output_dir": str(tmp_path / "study"),
        "base": base,
        "maddness": {"max_rows": 256},
        "models": {
            "cnn": {"model": {"source": "lutnn", "name": "resnet9", "kwargs": {"width": 4}},
                    "lut": {"num_prototypes": 8, "layer_types": ["conv2d"], "include": ["layer*"]}},
            "vit": deit,
            "vit_v8": {**deit, "teacher_from": "vit", "lut": {**deit["lut"], "subvec_len": 8},
                       "methods": ["dense", "kmeans", "lutnn"]},
        },
    }
    study.update(over)
    return study


def _write(tmp_path, study: dict):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_study_config_file_validates():
    cfg, models = load_study(ROOT / "configs" / "study_fashion.yaml")
    assert [m.name for m in models] == ["resnet9", "deit_v4", "deit_v8"]
    assert all(m.methods == list(METHODS) and m.run["init"]["sequential"] for m in models)
    assert models[0].run["train"]["lr"] == 3e-3 and models[0].run["teacher"]["weight_decay"] == 5e-4  # base + model
    assert cfg.methods == list(METHODS)
    assert models[2].teacher_from == "deit_v4" and models[2].run["lut"]["subvec_len"] == 8
    assert models[0].run["data"]["name"] == "fashion_mnist"  # base merged under each model
    # a model's partial section overrides only its keys: the ResNet-9 trains 16 LUT epochs, the DeiTs the base 8
    assert models[0].run["data"]["eval_limit"] is None and models[0].run["data"]["train_limit"] == 30000
    assert models[0].run["train"]["epochs"] == 16 and models[0].run["train"]["lr"] == 3.0e-3
    assert models[1].run["train"]["epochs"] == 8


@pytest.mark.parametrize("change, message", [
    ({"methods": ["dense", "magic"]}, "methods: unknown ['magic']"),
    ({"recon_weight": 0}, "recon_weight: must be > 0"),
    ({"models": {}}, "models: give at least one model"),
    ({"extra": 1}, "unknown key extra"),
    ({"maddness": {"levels": 9}}, "maddness: need 1 <= levels <= 8"),
    ({"models": {"m": {"methods": ["dense", "x"]}}}, "models.m.methods: unknown ['x']"),
])
def test_study_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError) as info:
        load_study(_write(tmp_path, _study(tmp_path, **change)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_study_models_option_rejects_unknown_names(tmp_path, capsys):
    assert main(["--config", str(_write(tmp_path, _study(tmp_path))), "--models", "cnn", "vgg"]) == 2
    err = capsys.readouterr().err
    assert "--models: unknown ['vgg']; the config has ['cnn', 'vit', 'vit_v8']" in err and err.count("\n") == 1


def test_study_model_errors_name_the_model(tmp_path):
    study = _study(tmp_path)
    study["models"]["vit"]["lut"] = {"subvec_len": 5, "include": ["blocks.*"]}
    with pytest.raises(ConfigError, match=r"models\.vit: lut\.subvec_len"):
        load_study(_write(tmp_path, study))
    study = _study(tmp_path)
    study["models"]["vit_v8"]["teacher_from"] = "cnn"
    with pytest.raises(ConfigError, match=r"models\.vit_v8\.teacher_from: model section differs"):
        load_study(_write(tmp_path, study))


def test_study_smoke_on_digits(tmp_path, capsys):
    path = _write(tmp_path, _study(tmp_path))
    out = tmp_path / "study"
    assert main(["--config", str(path), "--models", "cnn"]) == 0  # one model only, as a parallel process would
    assert {r["model"] for r in json.loads((out / "study.json").read_text())["rows"]} == {"cnn"}
    assert not (out / "vit").exists()
    cnn_rows = (out / "cnn" / "rows.json").read_text()
    # the rest in two processes (cnn | vit with vit_v8, which shares vit's teacher), cnn's rows kept
    assert main(["--config", str(path), "--jobs", "2"]) == 0
    assert (out / "cnn" / "rows.json").read_text() == cnn_rows
    assert "[study] started vit vit_v8" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["study_cnn.log", "study_vit_vit_v8.log"]
    rows = json.loads((out / "study.json").read_text())["rows"]
    expected = [(m, k) for m in ("cnn", "vit") for k in METHODS] + [("vit_v8", k) for k in ("dense", "kmeans", "lutnn")]
    assert [(r["model"], r["method"]) for r in rows] == expected
    for r in rows:
        assert 0 <= r["top1"] <= r["top5"] <= 100 and r["images"] == 32 and r["split"] == "validation"
    by = {(r["model"], r["method"]): r for r in rows}
    assert by[("vit", "dense")]["top1"] == by[("vit_v8", "dense")]["top1"]  # shared teacher
    assert by[("cnn", "lutnn_recon_int8")]["bytes"] < by[("cnn", "lutnn_recon")]["bytes"]
    assert (out / "study.png").stat().st_size > 0
    md = (out / "study.md").read_text()
    assert "| cnn | MADDness (no retraining) |" in md and "reconstruction loss" in md
    # everything is kept: a second run measures nothing again
    mtime = (out / "cnn" / "rows.json").stat().st_mtime
    assert main(["--config", str(path)]) == 0
    assert (out / "cnn" / "rows.json").stat().st_mtime == mtime


def test_job_groups_keep_shared_teachers_together():
    _, models = load_study(ROOT / "configs" / "study_fashion.yaml")
    assert job_groups(models, 2) == [["deit_v4", "deit_v8"], ["resnet9"]]
    assert job_groups(models, 8) == [["deit_v4", "deit_v8"], ["resnet9"]]  # no more lanes than groups
    assert job_groups(models, 1) == [["deit_v4", "deit_v8", "resnet9"]]


def test_study_jobs_must_be_positive(tmp_path, capsys):
    assert main(["--config", str(_write(tmp_path, _study(tmp_path))), "--jobs", "0"]) == 2
    assert "--jobs: must be >= 1, got 0" in capsys.readouterr().err


def test_maddness_conv2d_is_maddness_over_im2col_rows():
    import torch

    from lutnn import LUTConv2d
    from lutnn.maddness import MaddnessConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, stride=2)
    x = torch.randn(8, 4, 9, 9)
    rows = LUTConv2d.from_dense(conv).rows(x)  # [8 * 5 * 5, 36], ordered (cin, kh, kw)
    layer = MaddnessConv2d.from_conv(conv, rows, subvec_len=9, levels=3)
    y = layer(x)
    exact = conv(x)
    assert y.shape == exact.shape == (8, 6, 5, 5)
    assert torch.allclose(y, layer.lut(rows).reshape(8, 25, 6).transpose(1, 2).reshape(8, 6, 5, 5))
    assert layer.lut.num_codebooks == 4 and layer.lut.num_prototypes == 8
    assert (y - exact).norm() < exact.norm()  # closer than no output at all (random 9-dim patches, 8 buckets)
