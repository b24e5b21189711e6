"""The research pipeline: one YAML config drives teacher -> k-means init -> LUT retraining -> evaluation.

Depends on the library (:mod:`lutnn`), never the other way round. :mod:`.config` validates a run
config's types and values; checks that need a registry (dataset names, model conversion) run once,
where the config is resolved (:func:`.resolve.load_config`).
"""
from .config import ConfigError, RunConfig
from .resolve import config_from_dict, load_config
from .runner import STAGES, Pipeline, RunError, run_from_config
from .runs import LoadedRun, load_run

__all__ = ["ConfigError", "LoadedRun", "Pipeline", "RunConfig", "RunError", "STAGES", "config_from_dict", "load_config", "load_run",
           "run_from_config"]
