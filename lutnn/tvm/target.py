"""The CPU target LUT kernels are built for: ``llvm -mcpu=<host>``."""
from __future__ import annotations

import os

# TVM's thread pool pins the calling thread to one core when it starts (TVM_BIND_THREADS defaults on):
# every thread PyTorch or ONNX Runtime starts afterwards inherits that mask, so PyTorch at 2 threads ran
# ~10x slower in the same process. Set before the pool exists (it starts at the first parallel call).
os.environ.setdefault("TVM_BIND_THREADS", "0")

import tvm  # noqa: E402
from tvm.target import Target, codegen  # noqa: E402


def host_target(num_threads: int | None = None) -> Target:
    """LLVM target for this machine's CPU (``mcpu`` from LLVM's host detection)."""
    cores = num_threads or os.cpu_count() or 1
    return Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": int(cores)})


def cpu_has(target: Target, *features: str) -> bool:
    """Whether ``target``'s CPU (its ``mcpu`` and ``mattr``) has every LLVM feature named."""
    with target:
        return all(codegen.llvm_cpu_has_features(f, target) for f in features)


def simd_bytes(target: Target) -> int:
    """Vector register width in bytes (64 with AVX-512, 32 with AVX2, else 16)."""
    if cpu_has(target, "avx512f"):
        return 64
    if cpu_has(target, "avx2"):
        return 32
    return 16


def set_num_threads(num_threads: int | None) -> None:
    """Size TVM's runtime thread pool and stop its workers from spinning after a call.

    Spinning workers would steal the cores from PyTorch's OpenMP threads when both run
    in one process (the side-by-side comparisons): PyTorch at 2 threads became ~30x
    slower on this 2-core machine. Call before the first TVM function runs.
    """
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    if num_threads:
        os.environ["TVM_NUM_THREADS"] = str(num_threads)
        tvm.get_global_func("runtime.config_threadpool")(0, num_threads)
