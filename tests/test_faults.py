"""Fault injection: SIGKILL the pipeline at every stage, corrupt its files, feed it NaNs.

The pipeline's promise: re-running the same command after a kill finishes the run with the same
``results.json`` and parameters as an uninterrupted run, and a damaged file is a one-line error
naming it. Kills are real ``SIGKILL``s of a subprocess (``LUTNN_FAULT``, see :mod:`lutnn.faults`).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

import lutnn
from lutnn.pipeline.cli import run_main
from lutnn.pipeline.config import DataConfig, OptimConfig
from lutnn.pipeline.data import make_loader
from lutnn.pipeline.train import DistEnv, FitPaths, fit
from lutnn.pipeline.train.loop import NonFiniteError
from pipeline_cfg import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": {"every_steps": 1, "plot": False, "tensorboard": False}}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")


def _pipeline(config: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "LUTNN_NO_PROGRESS": "1", "PYTHONPATH": path}
    env.pop("LUTNN_FAULT", None)
    if fault:
        env["LUTNN_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--config", str(config)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run, in a subprocess like the killed ones."""
    tmp = tmp_path_factory.mktemp("baseline")
    proc = _pipeline(write_config(tmp / "cfg.yaml", tiny_config(tmp / "run", **QUIET)))
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def _models(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _assert_same_run(a: Path, b: Path) -> None:
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())
    assert (a / "results.md").read_text() == (b / "results.md").read_text()
    for name in ("teacher.pt", "checkpoints/best.pt", "checkpoints/last.pt"):
        ma, mb = _models(a / name), _models(b / name)
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma), name
    pa, pb = load_file(a / "prototypes.safetensors"), load_file(b / "prototypes.safetensors")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in rows]  # noqa: E731
    for stage in ("teacher", "lut"):
        ha, hb = (json.loads((r / f"history_{stage}.json").read_text()) for r in (a, b))
        assert drop(ha) == drop(hb)
    assert not list(b.rglob("*.tmp"))


def _epoch(run: Path) -> int | None:
    last = run / "checkpoints/last.pt"
    return torch.load(last, weights_only=True)["epoch"] if last.is_file() else None


# (fault, what the run dir must look like right after the kill). 128 samples / batch 32 = 4 steps an epoch.
KILLS = [
    ("teacher_step@6", lambda r: (r / "checkpoints/teacher_last.pt").is_file() and not (r / "teacher.pt").exists()),
    ("calibrated", lambda r: (r / "teacher.pt").is_file() and not (r / "prototypes.safetensors").exists()),
    ("kmeans_layer@2", lambda r: not (r / "prototypes.safetensors").exists() and not (r / "init_report.md").exists()),
    ("checkpoint_best@1", lambda r: (r / "checkpoints/best.pt").is_file() and _epoch(r) is None),
    ("lut_step@6", lambda r: _epoch(r) == 1),
    ("checkpoint_tmp@1", lambda r: _epoch(r) == 1 and (r / "checkpoints/last.pt.tmp").is_file()),
    ("eval_model@2", lambda r: _epoch(r) == 2 and not (r / "results.md").exists()),
    ("results_tmp", lambda r: (r / "results.md").is_file() and not (r / "results.json").exists()),
]


@pytest.mark.slow
def test_killed_at_every_stage_then_rerun_equals_uninterrupted(baseline, tmp_path):
    """One run dir, killed at each point in turn by re-running the same command; then it finishes."""
    config = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "run", **QUIET))
    run = tmp_path / "run"
    for fault, state_after in KILLS:
        proc = _pipeline(config, fault)
        assert proc.returncode == -signal.SIGKILL, f"{fault}: not killed (rc {proc.returncode}) {proc.stderr[-500:]}"
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        assert state_after(run), f"{fault}: unexpected run dir state {files}"
    proc = _pipeline(config)
    assert proc.returncode == 0, proc.stderr
    _assert_same_run(baseline, run)


# --------------------------------------------------------------------------- damaged files

def _copy_run(baseline: Path, tmp_path: Path) -> Path:
    """The finished baseline run under a new output_dir, results removed so that eval reads every file again."""
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    (run / "config.yaml").unlink()
    (run / "results.json").unlink()
    return write_config(tmp_path / "cfg.yaml", tiny_config(run, **QUIET))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest stored tensor (not in zip padding, which nothing reads)."""
    data = bytearray(path.read_bytes())
    if zipfile.is_zipfile(path):
        info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    else:  # safetensors: JSON header first, tensor bytes after it
        at = int(len(data) * 0.6)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, message", [
    ("teacher.pt", _truncate, "truncated or corrupt checkpoint"),
    ("teacher.pt", _flip_byte, "corrupt checkpoint (CRC mismatch"),
    ("checkpoints/last.pt", _truncate, "truncated or corrupt checkpoint"),
    ("checkpoints/last.pt", _flip_byte, "corrupt checkpoint (CRC mismatch"),
    ("checkpoints/best.pt", _truncate, "truncated or corrupt checkpoint"),
    ("prototypes.safetensors", _truncate, "not a readable safetensors file"),
    ("prototypes.safetensors", _flip_byte, "corrupt prototype file (sha256"),
    ("prototypes.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
])
def test_damaged_file_is_a_one_line_error_naming_it(baseline, tmp_path, capsys, name, damage, message):
    config = _copy_run(baseline, tmp_path)
    damage(tmp_path / "run" / name)
    assert run_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'run' / name}: "), err
    assert message in err
    assert not (tmp_path / "run/results.json").exists()


# --------------------------------------------------------------------------- non-finite training

def _fit_setup(tmp_path: Path, poison: int | None = None, **optim):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(4, (64,))
    if poison is not None:
        x[poison] = float("nan")
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    lutnn.convert_(model, lutnn.LUTConfig(subvec_len=4, num_prototypes=4))
    data = DataConfig(batch_size=16, eval_batch_size=64)
    ds = TensorDataset(x, y)
    loaders = make_loader(ds, data, True), make_loader(TensorDataset(x[:32].nan_to_num(), y[:32]), data, False)
    cfg = OptimConfig(epochs=2, lr=1e-2, warmup_epochs=0, **optim)
    return model, loaders, cfg, FitPaths(tmp_path / "last.pt", tmp_path / "best.pt")


def _fit(model, loaders, cfg, paths, resume=False):
    return fit(model, *loaders, cfg, paths, DistEnv(device=torch.device("cpu")), stage="lut", seed=0, resume=resume)


def test_nan_tau_stops_with_step_layer_and_checkpoint(tmp_path):
    model, loaders, cfg, paths = _fit_setup(tmp_path)
    with torch.no_grad():
        model[2].log_tau.fill_(float("nan"))
    with pytest.raises(NonFiniteError) as info:
        _fit(model, loaders, cfg, paths)
    # the fused STE's forward does not read tau (hard codes): the NaN shows in the gradients, caught before the step
    assert str(info.value) == (
        "[lut] gradients are non-finite at step 1 (epoch 1); non-finite parameters: 2.log_tau; last good checkpoint: none "
        "(no epoch finished); set nonfinite: skip in this stage's config section to skip such steps")
    assert not paths.last.exists()


def test_tau_going_nan_mid_run_names_layer_and_last_good_checkpoint(tmp_path):
    model, loaders, cfg, paths = _fit_setup(tmp_path)
    calls = []

    def blow_up(module, args):
        if module.training:
            calls.append(1)
            if len(calls) == 7:  # epoch 2, third step
                with torch.no_grad():
                    module[0].log_tau.fill_(float("inf"))
                    module[0].prototypes[0, 0, 0] = float("nan")

    model.register_forward_pre_hook(blow_up)
    with pytest.raises(NonFiniteError, match=r"at step 7 \(epoch 2\); non-finite parameters: 0.prototypes, 0.log_tau; "
                                             rf"last good checkpoint: {paths.last} \(epoch 1\)"):
        _fit(model, loaders, cfg, paths)
    assert torch.load(paths.last, weights_only=True)["epoch"] == 1


def test_skip_nonfinite_steps_when_configured(tmp_path):
    model, loaders, cfg, paths = _fit_setup(tmp_path, poison=5, nonfinite="skip")
    result = _fit(model, loaders, cfg, paths)
    assert [r["skipped_steps"] for r in result.history] == [1, 1]  # the poisoned sample's batch, each epoch
    assert result.steps == 8 and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)


def test_amp_bf16_on_cpu_trains_and_still_stops_on_nan(tmp_path):
    """On CPU the loop runs no autocast and no GradScaler (amp is CUDA-only); the guard is the same."""
    model, loaders, cfg, paths = _fit_setup(tmp_path, poison=5, amp=True, amp_dtype="bfloat16")
    with pytest.raises(NonFiniteError, match="all parameters finite"):
        _fit(model, loaders, cfg, paths)
    torch.manual_seed(0)
    layer = lutnn.LUTLinear(16, 8, subvec_len=4)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(layer.prototypes.grad).all()
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), out.detach(), rtol=1e-5, atol=1e-5)
