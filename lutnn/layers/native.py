"""Native CPU kernels of the fused straight-through estimator, built on first use.

``csrc/ste_cpu.c`` holds two loops that eager PyTorch runs as many small passes: the encoding
(distances and argmin over K) of the forward, and the soft-argmin backward (distances, softmax, its gradient and every
accumulation) in one pass per row. They are compiled with the system C compiler (``$CC``, else
``cc``) for the machine at hand (``-march=native``), cached under ``$LUTNN_NATIVE_CACHE`` (default
``~/.cache/lutnn/native``) by a hash of the source, the compiler and the CPU's feature flags, and
called through ``ctypes`` (which releases the GIL, so a thread pool splits rows over
``torch.get_num_threads()`` cores). Without a compiler, or with ``LUTNN_NATIVE=0``, :func:`available`
is false and :mod:`lutnn.layers.fused` runs its eager path, after one warning line.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "ste_cpu.c"
ENV_DISABLE = "LUTNN_NATIVE"
ENV_CACHE = "LUTNN_NATIVE_CACHE"
FLAGS = ("-O3", "-fopenmp-simd", "-fPIC", "-shared")
ARCH_FLAGS = ("-march=native",)  # dropped if the compiler rejects it (then a portable build)

_state: dict[str, object] = {}
_p = ctypes.c_void_p
_i = ctypes.c_int64


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"] is not None


def usable(*tensors: Tensor) -> bool:
    """The native path takes fp32 CPU tensors outside autograd tracing."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.compiler.is_compiling() and available())


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE, "~/.cache/lutnn/native")).expanduser()


def _build(target: Path) -> str | None:
    """Compile ``SOURCE`` to ``target``; returns an error line, or ``None`` on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    error = "no attempt"
    for arch in (ARCH_FLAGS, ()):
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
            tmp_path = Path(tmp.name)
        cmd = [_compiler(), *FLAGS, *arch, "-o", str(tmp_path), str(SOURCE)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tmp_path.unlink(missing_ok=True)
            return f"{cmd[0]}: {exc}"
        if proc.returncode == 0:
            os.replace(tmp_path, target)  # atomic: concurrent builders each publish a whole file
            return None
        tmp_path.unlink(missing_ok=True)
        error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
    return f"{_compiler()} failed: {error}"


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return None
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = None
    if not version:
        warnings.warn(f"lutnn: no C compiler ({_compiler()!r}); the fused STE runs its slower eager path "
                      f"(set CC, or {ENV_DISABLE}=0 to silence this)", RuntimeWarning, stacklevel=3)
        return None
    key = hashlib.sha256("\0".join((SOURCE.read_text(), version, " ".join(FLAGS + ARCH_FLAGS),
                                    _cpu_flags())).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ste_cpu_{key}.so"
    if not target.exists():
        error = _build(target)
        if error:
            warnings.warn(f"lutnn: building {SOURCE.name} failed ({error}); the fused STE runs its slower "
                          f"eager path", RuntimeWarning, stacklevel=3)
            return None
    lib = ctypes.CDLL(str(target))
    lib.lutnn_encode.argtypes = [_p, _i, _i, _i, _p, _i, _i, _i, _p]
    lib.lutnn_encode.restype = ctypes.c_int
    lib.lutnn_soft_backward.argtypes = [_p, _i, _i, _p, _i, _i, _p, _i, _i, _p, _i, _i, _p, ctypes.c_float,
                                        _i, _i, _i, _p, _p, _p, ctypes.POINTER(ctypes.c_double)]
    lib.lutnn_soft_backward.restype = ctypes.c_int
    return lib


def _pool() -> ThreadPoolExecutor:
    if "pool" not in _state:
        _state["pool"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="lutnn-native")
    return _state["pool"]  # type: ignore[return-value]


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _threads(rows: int, min_rows: int = 256) -> int:
    return max(1, min(torch.get_num_threads(), rows // min_rows))


def encode(x: Tensor, prototypes: Tensor) -> Tensor:
    """Codes ``[n, C]`` int64 of ``x`` (``[n, D]`` at any strides; D-major ``[D, n]`` blocks viewed
    as ``.T`` load fastest): the argmin over K of ``|p|² - 2 x·p`` (see ``csrc/ste_cpu.c``)."""
    c, k, v = prototypes.shape
    n = x.shape[0]
    prototypes = prototypes.contiguous()
    codes = torch.empty(n, c, dtype=torch.long)
    lib = _state["lib"]

    def run(span: tuple[int, int]) -> None:
        a, b = span
        if lib.lutnn_encode(x[a:b].data_ptr(), x.stride(0), x.stride(1), b - a, prototypes.data_ptr(),
                            c, k, v, codes[a:b].data_ptr()):
            raise MemoryError("lutnn native encode: scratch allocation failed")

    if n:
        _map(run, _spans(n, _threads(n)))
    return codes


def soft_backward(x: Tensor, g: Tensor, dx: Tensor | None, codes: Tensor, prototypes: Tensor, inv_tau: float,
                  dz_x: Tensor, dz_sum: Tensor, hard: Tensor) -> float:
    """The soft-argmin backward of ``n`` rows in one pass (see ``csrc/ste_cpu.c``).

    ``x``, ``g = dL/dx̂`` and ``dx`` (written; ``None`` to skip) are ``[n, D]`` views at any strides;
    ``codes`` ``[n, C]`` (uint8 or int64). Adds ``Σ dzᵀx`` to ``dz_x [C, K, V]``, ``Σ_n dz`` to
    ``dz_sum [C, K]``, ``Σ_n onehot(code)ᵀ g`` to ``hard [C, K, V]``; returns ``Σ dz ⊙ z``.
    """
    c, k, v = prototypes.shape
    n = x.shape[0]
    prototypes = prototypes.contiguous()
    codes = codes.contiguous()
    if codes.dtype not in (torch.uint8, torch.long):
        codes = codes.long()
    lib = _state["lib"]
    spans = _spans(n, _threads(n))

    def run(span: tuple[int, int], acc: tuple[Tensor, Tensor, Tensor]) -> float:
        a, b = span
        dx_ptr, dr, df = (0, 0, 0) if dx is None else (dx[a:b].data_ptr(), dx.stride(0), dx.stride(1))
        dzz = ctypes.c_double(0.0)
        if lib.lutnn_soft_backward(
                x[a:b].data_ptr(), x.stride(0), x.stride(1), g[a:b].data_ptr(), g.stride(0), g.stride(1),
                dx_ptr or None, dr, df, codes[a:b].data_ptr(), codes.element_size(), b - a,
                prototypes.data_ptr(), inv_tau, c, k, v, acc[0].data_ptr(), acc[1].data_ptr(), acc[2].data_ptr(),
                ctypes.byref(dzz)):
            raise MemoryError("lutnn native soft_backward: scratch allocation failed")
        return dzz.value

    if len(spans) == 1:
        return run(spans[0], (dz_x, dz_sum, hard))
    accs = [(dz_x, dz_sum, hard)] + [(torch.zeros_like(dz_x), torch.zeros_like(dz_sum), torch.zeros_like(hard))
                                     for _ in spans[1:]]
    total = sum(_map(lambda i: run(spans[i], accs[i]), range(len(spans))))
    for extra in accs[1:]:
        dz_x += extra[0]
        dz_sum += extra[1]
        hard += extra[2]
    return total


def _map(fn, items) -> list:
    items = list(items)
    if len(items) == 1:
        return [fn(items[0])]
    return list(_pool().map(fn, items))
