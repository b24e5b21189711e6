"""Fast CPU inference of LUT models with Apache TVM (TensorIR kernels + Relax).

* :mod:`.kernels` — encode and read-accumulate as TVMScript PrimFuncs.
* :mod:`.schedules` — hand schedules (and their tuning knobs), generic CPU fallback.
* :mod:`.tuning` — knob search with a JSON database reused across runs.
* :mod:`.conv` — ``LUTConv2d`` kernels on NCHW tensors and :func:`conv_runner` (torch in/out).
* :mod:`.relax_model` — whole-model compile via ``relax.frontend.torch.from_exported_program``.

The demo comparing a run's LUT model with dense baselines is :mod:`lutnn.tools.demo`.
"""
from .conv import conv_runner
from .kernels import EncodeSpec, LookupSpec
from .target import host_target
from .tuning import TuningDatabase, build_kernel, default_tuning_dir, tune_kernels

__all__ = [
    "EncodeSpec", "LookupSpec", "TuningDatabase", "build_kernel", "conv_runner", "default_tuning_dir",
    "host_target", "tune_kernels",
]
