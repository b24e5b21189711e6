"""Training-recipe knobs: per-layer reconstruction loss, weight EMA and early stopping (with exact resume)."""
import shutil

import pytest
import torch

import lutnn
import lutnn.pipeline.train.loop as loop
from lutnn.pipeline import Pipeline, load_config
from lutnn.pipeline.evaluate import Accuracy
from lutnn.pipeline.models import load_state
from lutnn.pipeline.train.ema import ModelEma
from lutnn.pipeline.train.loop import epochs_since_best
from lutnn.pipeline.train.recon import ReconstructionLoss, reconstruction_error
from pipeline_cfg import tiny_config, write_config


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")


def _lut_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    lutnn.convert_(model, lutnn.LUTConfig(subvec_len=4, num_prototypes=4))
    return model.train()


def test_reconstruction_error_value_and_gradient():
    layer = lutnn.LUTLinear(4, 3, subvec_len=2, num_prototypes=2)
    with torch.no_grad():
        layer.prototypes.copy_(torch.tensor([[[0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [2.0, 0.0]]]))
    rows = torch.tensor([[0.9, 1.0, 2.0, 0.5]])  # codes (1, 1): errors (0.01 + 0) + (0 + 0.25)
    err = reconstruction_error(layer, rows)
    assert err.item() == pytest.approx(0.26 / rows.pow(2).sum().item())
    err.backward()
    # d/dP of |x - P|^2 = -2 (x - P) / |x|^2, only for the chosen prototypes
    expected = torch.zeros(2, 2, 2)
    expected[0, 1] = -2 * torch.tensor([-0.1, 0.0]) / rows.pow(2).sum()
    expected[1, 1] = -2 * torch.tensor([0.0, 0.5]) / rows.pow(2).sum()
    assert torch.allclose(layer.prototypes.grad, expected)


def test_reconstruction_loss_hooks_every_layer_in_training_only():
    model = _lut_mlp()
    recon = ReconstructionLoss(model)
    x = torch.randn(5, 8)
    model(x)
    loss = recon.pop()
    assert loss.item() > 0
    loss.backward()
    for layer in lutnn.lut_layers(model).values():
        assert layer.prototypes.grad is not None and layer.prototypes.grad.abs().sum() > 0
    model.eval()
    model(x)
    with pytest.raises(RuntimeError, match="no LUT layer ran in training mode"):
        recon.pop()
    recon.remove()
    model.train()
    model(x)
    assert recon.terms == []


def _train_run(tmp_path, name, base, **train):
    out = tmp_path / name
    out.mkdir()
    for f in ("teacher.pt", "prototypes.safetensors"):
        shutil.copy(base / f, out / f)
    cfg = tiny_config(out, train={"epochs": 2, "lr": 1e-3, "proto_lr": 3e-3, "warmup_epochs": 0.5, **train},
                      log={"tensorboard": False, "plot": False})
    return load_config(write_config(tmp_path / f"{name}.yaml", cfg))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    cfg = load_config(write_config(tmp / "cfg.yaml", tiny_config(tmp / "run", log={"tensorboard": False})))
    Pipeline(cfg).run(["teacher", "prototypes"])
    return tmp / "run"


def test_recon_weight_zero_is_the_old_loss_exactly(base, tmp_path):
    """weight 0 registers no hooks: the same losses and weights bit for bit; weight > 0 changes them."""
    histories = {}
    for name, w in (("default", None), ("zero", 0.0), ("on", 1.0)):
        cfg = _train_run(tmp_path, name, base, **({} if w is None else {"recon_weight": w}))
        Pipeline(cfg).run(["train"], resume=False)
        histories[name] = torch.load(tmp_path / name / "checkpoints/last.pt", weights_only=False)
    a, b, c = histories["default"], histories["zero"], histories["on"]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [r["train_loss"] for r in a["history"]] != [r["train_loss"] for r in c["history"]]


class _Crash(Exception):
    pass


def _scripted_top1(values):
    """A stand-in for the loop's ``evaluate`` that returns these validation top-1 values in turn."""
    it = iter(values)
    return lambda *args, **kwargs: Accuracy(next(it), 100.0, 1.0, 64)


def test_ema_and_early_stopping_resume_exactly(base, tmp_path, monkeypatch):
    """val top-1 50, 60, 55 with patience 1: stops after epoch 3 of 5, also across a crash after epoch 1."""
    top1 = [50.0, 60.0, 55.0, 99.0, 99.0]
    knobs = {"epochs": 5, "ema_decay": 0.9, "early_stop_patience": 1}
    runs = {name: _train_run(tmp_path, name, base, **knobs) for name in ("straight", "crashed")}
    monkeypatch.setattr(loop, "evaluate", _scripted_top1(top1))
    Pipeline(runs["straight"]).run(["train"], resume=False)
    real_save = loop.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(loop, "evaluate", _scripted_top1(top1))
    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(_Crash):
        Pipeline(runs["crashed"]).run(["train"], resume=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    monkeypatch.setattr(loop, "evaluate", _scripted_top1(top1[1:]))
    Pipeline(runs["crashed"]).run(["train"], resume=True)
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)
    b = torch.load(tmp_path / "crashed/checkpoints/last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["stopped_early"] and b["stopped_early"]
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert not all(torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])
    best = torch.load(tmp_path / "straight/checkpoints/best.pt", weights_only=False)
    assert best["epoch"] == 2  # the epoch with val top-1 60
    assert torch.equal(load_state(tmp_path / "straight/checkpoints/best.pt")["head.weight"], best["ema"]["head.weight"])
    # a stopped run is finished: resuming trains nothing more
    Pipeline(runs["straight"]).run(["train"], resume=True)
    assert torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=False)["step"] == a["step"]


def test_early_stop_counts_epochs_since_best():
    rows = [{"val_top1": v} for v in (50.0, 60.0, 60.0, 55.0)]
    assert epochs_since_best(rows) == 2 and epochs_since_best([]) == 0


def test_model_ema_average_and_swap():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)  # 0.5 * 0 + 0.5 * 4
    assert ema.state_dict()["weight"].tolist() == [[2.0, 2.0]]
    with ema.applied(model):
        assert model.weight.tolist() == [[2.0, 2.0]]
    assert model.weight.tolist() == [[4.0, 4.0]]


def test_init_sequential_writes_layer_by_layer_prototypes(base, tmp_path):
    from lutnn.calibrate import init_prototypes_sequential
    from lutnn.io import load_prototypes

    cfg = tiny_config(tmp_path / "seq", init={"num_batches": 2, "niter": 5, "backend": "torch", "sequential": True},
                      teacher={"checkpoint": str(base / "teacher.pt")}, log={"tensorboard": False, "plot": False})
    pipe = Pipeline(load_config(write_config(tmp_path / "seq.yaml", cfg)))
    pipe.run(["teacher", "prototypes"])
    expected, _ = lutnn.convert(pipe.teacher(), pipe.cfg.lut_config())
    loader, n = pipe.calibration_batches()
    init_prototypes_sequential(expected, loader, pipe.cfg.init.max_rows, n, "torch", 5, pipe.cfg.seed)
    written, one_pass = (lutnn.convert(pipe.teacher(), pipe.cfg.lut_config())[0] for _ in range(2))
    load_prototypes(written, pipe.paths.prototypes)
    load_prototypes(one_pass, base / "prototypes.safetensors")
    for name, layer in lutnn.lut_layers(written).items():
        assert torch.equal(layer.prototypes, lutnn.lut_layers(expected)[name].prototypes), name
    last = list(lutnn.lut_layers(written))[-1]  # behind converted layers: not the one-pass (dense-input) fit
    assert not torch.allclose(lutnn.lut_layers(written)[last].prototypes, lutnn.lut_layers(one_pass)[last].prototypes)
