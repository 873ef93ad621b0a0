"""pared: make PyTorch models smaller, faster and less energy-hungry, and prove it by measurement."""

from pared.apply import Context, compress_, register
from pared.calib import CalibData
from pared.config import BaseConfig, config_from_dict, config_to_dict, register_config
from pared.errors import (
    EnvironmentIOError,
    InputRefused,
    ParedError,
    QualityGateFailed,
    UsageError,
)

from pared.quant import Int8Config, SmoothQuantConfig, WeightOnlyConfig
from pared.train import FinetuneConfig
from pared.distill import DistillConfig
from pared.student import DropLayersConfig

__version__ = "0.1.0"

__all__ = [
    "BaseConfig",
    "CalibData",
    "Context",
    "EnvironmentIOError",
    "FinetuneConfig",
    "DistillConfig",
    "DropLayersConfig",
    "Int8Config",
    "SmoothQuantConfig",
    "WeightOnlyConfig",
    "InputRefused",
    "ParedError",
    "QualityGateFailed",
    "UsageError",
    "compress_",
    "config_from_dict",
    "config_to_dict",
    "register",
    "register_config",
]
