"""lutnn: neural networks whose matrix multiplications are learned table lookups."""
from .calibrate import InitReport, capture_rows, init_prototypes, reconstruction_error
from .config import ConfigError, RunConfig, load_config
from .convert import (ConversionReport, LUTConfig, LUTConfigError, convert, convert_, lut_layers,
                      quantize_tables_, set_mode)
from .io import PrototypeFileError, load_prototypes, save_prototypes
from .kmeans import available_backends, kmeans
from .layers import LUTBase, LUTConv2d, LUTLinear, QuantizedTable
from .maddness import MaddnessLinear
from .profile import ModelProfile, profile_pair
from .runs import LoadedRun, load_run

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ConversionReport", "InitReport", "LUTBase", "LUTConfig", "LUTConfigError", "LUTConv2d",
    "LUTLinear", "LoadedRun", "MaddnessLinear", "ModelProfile", "PrototypeFileError", "QuantizedTable",
    "RunConfig", "available_backends", "capture_rows", "convert", "convert_", "init_prototypes", "kmeans",
    "load_config", "load_prototypes", "load_run", "lut_layers", "profile_pair", "quantize_tables_", "reconstruction_error",
    "save_prototypes", "set_mode",
]
