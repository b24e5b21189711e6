"""Fast CPU inference of LUT models with Apache TVM (TensorIR kernels + Relax).

* :mod:`.kernels` — encode and read-accumulate as TVMScript PrimFuncs.
* :mod:`.schedules` — hand schedules (and their tuning knobs), generic CPU fallback.
* :mod:`.shuffle` — in-register (vpshufb / vpermb) int8 read-accumulate for K=16.
* :mod:`.encode_rows` — encode with rows in lanes and an in-register transpose.
* :mod:`.conv` — ``LUTConv2d`` kernels on NCHW tensors and :func:`conv_runner` (torch in/out).
* :mod:`.tuning` — knob search (gather vs shuffle included) with a JSON database reused across runs.
* :mod:`.accelerate` — ``accelerate_(model)``: LUT layers of a PyTorch model run as TVM kernels.
* :mod:`.relax_model` — whole-model compile via ``relax.frontend.torch.from_exported_program``.

The demo comparing a run's LUT model with dense baselines is :mod:`lutnn.tools.demo`.
"""
from .accelerate import AccelerateConfig, AccelerateReport, accelerate_, register_runner, unaccelerate_
from .conv import conv_runner
from .kernels import EncodeSpec, LookupSpec
from .target import host_target
from .tuning import LookupKernel, TuningDatabase, build_kernel, default_tuning_dir, tune_kernels

__all__ = [
    "AccelerateConfig", "AccelerateReport", "EncodeSpec", "LookupKernel", "LookupSpec", "TuningDatabase",
    "accelerate_", "build_kernel", "conv_runner", "default_tuning_dir", "host_target", "register_runner",
    "tune_kernels", "unaccelerate_",
]
