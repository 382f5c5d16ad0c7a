from ds_parallel.config.errors import ConfigError
from ds_parallel.config.load import dump_yaml, load_config, parse_overrides, to_dict
from ds_parallel.config.presets import MODEL_PRESETS
from ds_parallel.config.schema import (
    Config,
    DataConfig,
    FP8Config,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)
from ds_parallel.config.validate import validate

__all__ = [
    "Config", "ConfigError", "DataConfig", "FP8Config", "MODEL_PRESETS", "ModelConfig", "ParallelConfig",
    "PrecisionConfig", "TrainConfig", "dump_yaml", "load_config", "parse_overrides", "to_dict", "validate",
]
