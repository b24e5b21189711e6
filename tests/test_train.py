"""End-to-end pipeline on real digits data: outputs, load_run, skip/refuse logic and exact resume."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import lutnn.pipeline.train.loop as loop
from lutnn.pipeline import load_config
from lutnn.pipeline.config import OptimConfig
from lutnn.convert import lut_layers
from lutnn.pipeline.evaluate import evaluate
from lutnn.pipeline import Pipeline, RunError
from lutnn.pipeline.runs import load_run
from lutnn.pipeline.train import WarmupCosine, kd_loss, param_groups, total_loss
from pipeline_cfg import tiny_config, write_config


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    path = write_config(tmp / "cfg.yaml", tiny_config(tmp / "run"))
    cfg = load_config(path)
    results = Pipeline(cfg).run()
    return cfg, Path(cfg.output_dir), results


def test_pipeline_writes_the_run_dir(base_run):
    cfg, run, results = base_run
    for name in ("config.yaml", "teacher.pt", "prototypes.safetensors", "checkpoints/last.pt", "checkpoints/best.pt",
                 "checkpoints/teacher_last.pt", "results.json", "results.md", "init_report.md", "curves.png"):
        assert (run / name).is_file(), name
    assert load_config(run / "config.yaml") == cfg
    stored = json.loads((run / "results.json").read_text())
    assert set(stored) == {"teacher", "kmeans_init", "retrained", "meta"}
    for key in ("teacher", "kmeans_init", "retrained"):
        assert stored[key]["count"] == 64 and 0 <= stored[key]["top1"] <= stored[key]["top5"] <= 100
    table = (run / "results.md").read_text()
    assert "dense teacher" in table and "k-means init" in table and "retrained" in table
    ckpt = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8  # 128 samples / batch 32 = 4 steps per epoch
    assert [r["steps"] for r in ckpt["history"]] == [4, 4]
    assert all(0 < r["train_seconds"] < r["seconds"] for r in ckpt["history"])


def test_tensorboard_scalars(base_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = base_run
    assert list((run / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"teacher/loss", "lut/loss", "lut/lr/prototypes", "lut/lr/weights", "lut/epoch/val_top1"} <= tags
    assert "lut/tau/blocks.0.attn.qkv" in tags
    assert len(acc.Scalars("lut/loss")) == 8


def test_load_run_reproduces_the_results(base_run):
    _, run, results = base_run
    loaded = load_run(run)
    assert loaded.num_classes == 10 and loaded.input_size == (3, 8, 8)
    assert not loaded.lut_model.training and not loaded.dense_model.training
    layers = lut_layers(loaded.lut_model)
    assert layers and all(m.effective_mode() == "lut" for m in layers.values())
    assert not lut_layers(loaded.dense_model)
    acc = evaluate(loaded.lut_model, loaded.eval_loader, torch.device("cpu"))
    assert acc.top1 == pytest.approx(results["retrained"].top1)
    dense = evaluate(loaded.dense_model, loaded.eval_loader, torch.device("cpu"))
    assert dense.top1 == pytest.approx(results["teacher"].top1)


def test_rerun_skips_and_refuses_mixed_configs(base_run, capsys):
    cfg, run, _ = base_run
    best_mtime = (run / "checkpoints/best.pt").stat().st_mtime
    Pipeline(cfg).run()
    assert (run / "checkpoints/best.pt").stat().st_mtime == best_mtime
    assert capsys.readouterr().out.count("skipping") == 4
    with pytest.raises(RunError, match="--resume"):
        Pipeline(cfg).run(["train"], resume=False)
    other = load_config(write_config(run.parent / "other.yaml", tiny_config(run, train={"lr": 5e-4})))
    with pytest.raises(RunError, match="train.lr"):
        Pipeline(other).run()


class _Crash(Exception):
    pass


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_resume_continues_exactly(base_run, tmp_path, monkeypatch, device):
    """Crash after epoch 1, resume: same parameters and optimiser state as an uninterrupted run.
    On CUDA (dropout draws from the CUDA generator) in fp32 and up to rounding: the fused attention
    backward accumulates with atomics; bf16 autocast would turn that rounding into flipped LUT codes."""
    _, base, _ = base_run
    # dropout, shift augmentation and distillation all consume RNG or teacher state across the resume
    sections = dict(data={"augment": "shift"}, distill={"enabled": True, "weight": 0.5},
                    model={"kwargs": {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2,
                                      "drop_rate": 0.2}},
                    train={"amp": False})
    runs = {}
    for name in ("straight", "crashed"):
        out = tmp_path / name
        out.mkdir()
        for f in ("teacher.pt", "prototypes.safetensors"):
            shutil.copy(base / f, out / f)
        runs[name] = load_config(write_config(tmp_path / f"{name}.yaml", tiny_config(out, device=device, **sections)))

    Pipeline(runs["straight"]).run(["train"], resume=False)

    real_save = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        Pipeline(runs["crashed"]).run(["train"], resume=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "crashed/checkpoints/last.pt", weights_only=False)["epoch"] == 1
    Pipeline(runs["crashed"]).run(["train"], resume=True)

    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "crashed/checkpoints/last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    same = torch.equal if device == "cpu" else (
        lambda x, y: torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-4))
    for k in a["model"]:
        assert same(a["model"][k], b["model"][k]), (k, float((a["model"][k] - b["model"][k]).abs().max()))
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(same(pa[k], pb[k]) for k in pa)
    if device == "cpu":
        assert [r["val_top1"] for r in a["history"]] == [r["val_top1"] for r in b["history"]]


def test_kd_loss():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, -logits, 4.0).item() > 0
    labels = torch.randint(10, (8,))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(total_loss(logits, labels), ce)
    assert torch.allclose(total_loss(logits, labels, logits, weight=0.5, temperature=2.0), 0.5 * ce, atol=1e-6)


def test_warmup_cosine():
    f = WarmupCosine(total_steps=100, warmup_steps=10, floor=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_param_groups_separate_prototypes():
    from lutnn import LUTConfig, convert

    model, _ = convert(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)), LUTConfig(subvec_len=4))
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(lr=1e-3, proto_lr=1e-2, weight_decay=0.1))}
    assert groups["prototypes"]["lr"] == 1e-2 and groups["prototypes"]["weight_decay"] == 0
    assert len(groups["prototypes"]["params"]) == 2  # prototypes + log_tau
    assert groups["weights"]["weight_decay"] == 0.1 and len(groups["weights"]["params"]) == 1
    assert len(groups["weights_no_decay"]["params"]) == 3  # linear bias, norm weight and bias


def test_teacher_from_checkpoint(base_run, tmp_path):
    _, base, _ = base_run
    cfg = load_config(write_config(tmp_path / "cfg.yaml", tiny_config(
        tmp_path / "run", teacher={"checkpoint": str(base / "teacher.pt"), "epochs": 0})))
    Pipeline(cfg).run(["teacher"])
    a = torch.load(base / "teacher.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "run/teacher.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "run/checkpoints/teacher_last.pt").exists()  # loaded, not trained
