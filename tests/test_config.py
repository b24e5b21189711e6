"""Run-config schema: loading, overrides, and one-line errors that name the key and the file."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lutnn.pipeline import load_config
from lutnn.pipeline.config import ConfigError, RunConfig, save_config
from pipeline_cfg import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, **sections) -> Path:
    return write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run", **sections))


def _error(path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_default_config_loads():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "fashion_mnist" and cfg.data.root is None  # None: the Debian package's directory
    digits = load_config(ROOT / "configs" / "digits.yaml")
    assert digits.data.name == "digits"
    assert cfg.lut_config().num_prototypes == cfg.lut["num_prototypes"]


@pytest.mark.parametrize("name", ["resnet18_cifar10.yaml", "resnet9_cifar10.yaml", "deit_tiny_imagenet.yaml",
                                  "deit3_small_imagenet.yaml"])
def test_real_data_configs_validate_with_a_data_root(tmp_path, name):
    path = ROOT / "configs" / name
    assert "data.root" in _error(path)  # the shipped path does not exist here
    cfg = load_config(path, [f"data.root={tmp_path}"])
    assert cfg.data.root == str(tmp_path)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(_write(tmp_path), ["train.lr=1e-3", "distill.enabled=false", "lut.include=[blocks.0.*]",
                                         "model.kwargs.depth=1", "teacher.checkpoint=null"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.distill.enabled is False
    assert cfg.lut["include"] == ["blocks.0.*"]
    assert cfg.teacher.checkpoint is None


def test_yaml_exponent_floats(tmp_path):
    path = tmp_path / "cfg.yaml"
    text = yaml.safe_dump(tiny_config(tmp_path / "run")).replace("lr: 0.001", "lr: 1e-3")
    assert "lr: 1e-3" in text
    path.write_text(text)
    assert load_config(path).train.lr == pytest.approx(1e-3)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path), ["train.epochs=3"])
    saved = save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(saved) == cfg


def test_unknown_key(tmp_path):
    msg = _error(_write(tmp_path, train={"lrr": 0.1}))
    assert "train.lrr" in msg


def test_unknown_override_key(tmp_path):
    assert "data.batchsize" in _error(_write(tmp_path), ["data.batchsize=3"])


def test_bad_override_syntax(tmp_path):
    assert "KEY=VALUE" in _error(_write(tmp_path), ["train.lr"])


def test_wrong_type(tmp_path):
    msg = _error(_write(tmp_path, train={"lr": "fast"}))
    assert "train.lr" in msg and "fast" in msg
    assert "data.batch_size" in _error(_write(tmp_path, data={"batch_size": 1.5}))
    assert "distill.enabled" in _error(_write(tmp_path), ["distill.enabled=3"])


def test_bad_choice(tmp_path):
    assert "data.augment" in _error(_write(tmp_path, data={"augment": "mixup"}))


def test_v_not_dividing_d(tmp_path):
    msg = _error(_write(tmp_path, lut={"subvec_len": 5}))  # embed_dim 32
    assert "lut.subvec_len" in msg and "blocks.0" in msg


def test_k_above_256(tmp_path):
    msg = _error(_write(tmp_path, lut={"num_prototypes": 300}))
    assert "lut.num_prototypes" in msg and "256" in msg


def test_unknown_lut_key(tmp_path):
    assert "lut" in _error(_write(tmp_path, lut={"subvec": 4}))


def test_missing_data_path(tmp_path):
    msg = _error(_write(tmp_path, data={"name": "cifar10", "root": str(tmp_path / "nowhere")}))
    assert "data.root" in msg and "nowhere" in msg
    assert "data.root" in _error(_write(tmp_path, data={"name": "imagefolder"}))


def test_missing_teacher_checkpoint(tmp_path):
    assert "teacher.checkpoint" in _error(_write(tmp_path, teacher={"checkpoint": str(tmp_path / "t.pt")}))


def test_impossible_values(tmp_path):
    assert "distill.weight" in _error(_write(tmp_path, distill={"weight": 1.5}))
    assert "train.epochs" in _error(_write(tmp_path, train={"epochs": 0}))
    assert "data.val_fraction" in _error(_write(tmp_path, data={"val_fraction": 1.0}))
    assert "train.ema_decay: must be in (0, 1)" in _error(_write(tmp_path, train={"ema_decay": 1.0}))
    assert "train.early_stop_patience: must be > 0" in _error(_write(tmp_path, train={"early_stop_patience": 0}))
    assert "train.recon_weight: must be >= 0" in _error(_write(tmp_path, train={"recon_weight": -1.0}))
    assert "teacher.recon_weight: the dense teacher" in _error(_write(tmp_path, teacher={"recon_weight": 1.0}))
    assert "num_threads: must be > 0" in _error(_write(tmp_path, num_threads=0))


def test_unknown_model(tmp_path):
    assert "model" in _error(_write(tmp_path, model={"name": "no_such_net"}))


def test_cli_prints_one_line_error(tmp_path):
    path = _write(tmp_path, lut={"num_prototypes": 512})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "lut.num_prototypes" in proc.stderr
    assert "Traceback" not in proc.stderr


def _converted(cfg) -> dict:
    import torch

    from lutnn import convert_, lut_layers
    from lutnn.pipeline.models import create_model

    with torch.device("meta"):
        model = create_model(cfg.model, 10)
    convert_(model, cfg.lut_config())
    return {name: (m.subvec_len, m.num_prototypes) for name, m in lut_layers(model).items()}


def test_deit3_small_partial_recipe(tmp_path):
    cfg = load_config(ROOT / "configs" / "deit3_small_imagenet.yaml", [f"data.root={tmp_path}"])
    layers = _converted(cfg)
    assert sorted(layers) == sorted(f"blocks.{b}.{n}" for b in (9, 10, 11) for n in ("attn.qkv", "mlp.fc1"))
    assert set(layers.values()) == {(32, 16)}
    assert (cfg.model.name, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay) == \
        ("deit3_small_patch16_224", "adamw", 5e-4, 0.1)
    assert (cfg.train.ema_decay, cfg.train.label_smoothing, cfg.distill.weight) == (0.999, 0.1, 0.8)


def test_resnet9_every_conv_but_the_stem(tmp_path):
    cfg = load_config(ROOT / "configs" / "resnet9_cifar10.yaml", [f"data.root={tmp_path}"])
    layers = _converted(cfg)
    assert len(layers) == 7 and not any(name.startswith("stem") for name in layers)
    assert set(layers.values()) == {(9, 16)}
