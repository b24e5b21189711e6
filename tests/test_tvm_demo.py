"""demo.py: --help, and a tiny end-to-end run on a tiny trained run dir (load_run)."""
import subprocess
import sys
from pathlib import Path

import pytest

from lutnn.pipeline import load_config
from lutnn.pipeline import Pipeline
from lutnn.tools import demo
from pipeline_cfg import tiny_config, write_config

ROOT = Path(__file__).resolve().parents[1]


def test_demo_help():
    out = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--checkpoint", "--tune-trials", "--batch-size", "--threads"):
        assert flag in out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    cfg = tiny_config(tmp / "run", teacher={"epochs": 1}, train={"epochs": 1})
    Pipeline(load_config(write_config(tmp / "cfg.yaml", cfg))).run()
    return tmp / "run"


@pytest.mark.slow
def test_demo_tiny_run(tiny_run, monkeypatch):
    monkeypatch.setenv("LUTNN_NO_PROGRESS", "1")
    text = demo.main(["--checkpoint", str(tiny_run), "--tune-trials", "2", "--batch-size", "16", "--threads", "1"])
    assert (tiny_run / "tvm_tuning" / "lutnn_tvm_tuning.json").is_file()
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for name in ("PyTorch dense fp32", "PyTorch LUT", "TVM dense", "TVM LUT, accelerate_", "TVM LUT, compile_model"):
        assert name in lines
    # the fastest TVM LUT path predicts what the PyTorch LUT model predicts
    assert "fastest LUT path: TVM LUT, " in text and "argmax agreement 100.0%" in text
    top1 = lambda name: lines[name].split("|")[2].strip()  # noqa: E731
    assert top1("TVM LUT, accelerate_") == top1("TVM LUT, compile_model") == top1("PyTorch LUT")
    assert top1("TVM dense") == top1("PyTorch dense fp32")


def test_demo_missing_run_dir(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--checkpoint", str(tmp_path / "nope")])
