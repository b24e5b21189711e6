"""lutnn: neural networks whose matrix multiplications are learned table lookups.

Three layers, dependencies pointing one way (``tools -> pipeline -> library``, ``tvm -> library``):

* the **library**, importable into any training code and loaded by ``import lutnn``: LUT layers,
  ``convert_``, k-means, calibration, prototype files, MADDness;
* :mod:`lutnn.pipeline`, the YAML-driven research pipeline (configs, data, models, training, runs);
* :mod:`lutnn.tools` (benchmarks, op counts, TensorRT) and :mod:`lutnn.tvm` (CPU kernels).

Pipeline and tools names re-exported here (``load_run``, ``load_config``, ``profile_pair``, ...) load
lazily, so ``import lutnn`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from .calibrate import InitReport, capture_rows, init_prototypes, reconstruction_error
from .convert import (ConversionReport, LUTConfig, LUTConfigError, convert, convert_, lut_layers,
                      quantize_tables_, set_mode)
from .io import PrototypeFileError, load_prototypes, save_prototypes
from .kmeans import available_backends, kmeans
from .layers import LUTBase, LUTConv2d, LUTLinear, QuantizedTable
from .maddness import MaddnessConv2d, MaddnessLinear
from .verify import bypassed_lut_layers

__version__ = "0.1.0"

_LAZY = {
    "ConfigError": "lutnn.pipeline.config",
    "RunConfig": "lutnn.pipeline.config",
    "load_config": "lutnn.pipeline.resolve",
    "LoadedRun": "lutnn.pipeline.runs",
    "load_run": "lutnn.pipeline.runs",
    "ModelProfile": "lutnn.tools.profile",
    "profile_pair": "lutnn.tools.profile",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lutnn' has no attribute {name!r}")


__all__ = [
    "ConfigError", "ConversionReport", "InitReport", "LUTBase", "LUTConfig", "LUTConfigError", "LUTConv2d",
    "LUTLinear", "LoadedRun", "MaddnessConv2d", "MaddnessLinear", "ModelProfile", "PrototypeFileError",
    "QuantizedTable", "RunConfig", "available_backends", "bypassed_lut_layers", "capture_rows", "convert",
    "convert_", "init_prototypes", "kmeans",
    "load_config", "load_prototypes", "load_run", "lut_layers", "profile_pair", "quantize_tables_", "reconstruction_error",
    "save_prototypes", "set_mode",
]
