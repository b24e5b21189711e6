"""tensorrt_op.py: CLI behaviour without a GPU, and the compile/benchmark wiring (fake backend)."""
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lutnn
from lutnn.tools import trt

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tensorrt_op.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_help():
    out = _run("--help")
    assert out.returncode == 0
    assert "--checkpoint RUN_DIR" in out.stdout and "--model NAME" in out.stdout
    assert "--min-block-size" in out.stdout and "--lut-ops-in-torch" in out.stdout


def test_needs_a_model_source():
    out = _run("--precision", "fp16")
    assert out.returncode == 2 and "one of the arguments --checkpoint --model is required" in out.stderr


@pytest.mark.skipif(HAS_TRT, reason="this machine has a CUDA GPU and torch-tensorrt")
def test_without_gpu_or_package_exits_with_one_line():
    out = _run("--model", "resnet18")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("tensorrt_op.py: ")
    assert ("torch-tensorrt" if torch.cuda.is_available() else "no CUDA GPU") in lines[0]
    assert out.stdout == ""


class FakeTensorRT:
    """Stands in for torch_tensorrt: records the compile call, returns the model unchanged."""

    def __init__(self):
        self.calls = []

    def compile(self, model, **kwargs):
        self.calls.append(kwargs)
        return model


def test_benchmark_compiles_with_the_dynamo_front_end(monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setattr(trt, "require_tensorrt", lambda: fake)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    lut, _ = lutnn.convert(dense)
    x = torch.randn(5, 16)
    rows = trt.benchmark({"dense": dense, "lut": lut}, x, warmup=1, repeats=3,
                         min_block_size=3, torch_executed_ops=trt.LUT_OPS)
    assert [(r.model, r.backend) for r in rows] == [
        ("dense", "eager"), ("dense", "tensorrt"), ("lut", "eager"), ("lut", "tensorrt")]
    assert all(r.median_ms > 0 and r.max_abs_diff == 0 for r in rows)
    assert len(fake.calls) == 2
    call = fake.calls[1]
    assert call["ir"] == "dynamo" and call["inputs"][0] is x
    assert call["enabled_precisions"] == {torch.float32} and call["min_block_size"] == 3
    assert call["torch_executed_ops"] == set(trt.LUT_OPS)
    table = trt.latency_markdown(rows, "Device: cpu.")
    assert table.count("| lut |") == 2 and "speedup vs eager" in table and "Device: cpu." in table


def test_a_failed_compile_is_a_row_not_a_crash(monkeypatch):
    class Broken(FakeTensorRT):
        def compile(self, model, **kwargs):
            raise RuntimeError("Conversion of aten.embedding_bag failed\nlong trace")

    monkeypatch.setattr(trt, "require_tensorrt", lambda: Broken())
    rows = trt.benchmark({"m": torch.nn.Linear(4, 2)}, torch.randn(3, 4), warmup=0, repeats=1)
    assert rows[1].error == "RuntimeError: Conversion of aten.embedding_bag failed"
    assert "| m | tensorrt | failed: RuntimeError: Conversion of aten.embedding_bag failed | | |" in \
        trt.latency_markdown(rows)


def test_median_latency_is_the_median_of_real_calls():
    calls = []

    def fn(x):
        calls.append(1)
        time.sleep(0.002)

    ms = trt.median_latency_ms(fn, torch.zeros(1), warmup=2, repeats=5)
    assert len(calls) == 7 and ms >= 2.0


@pytest.mark.skipif(not HAS_TRT, reason="needs a CUDA GPU and torch-tensorrt")
def test_tensorrt_op_end_to_end_on_gpu():
    out = _run("--model", "resnet18", "--input-size", "3", "64", "64", "--repeats", "5", "--warmup", "2")
    assert out.returncode == 0, out.stderr
    assert "| lut | tensorrt |" in out.stdout and "| dense | tensorrt |" in out.stdout
