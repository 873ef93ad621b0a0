"""Quantization techniques."""

from pared.quant.int8 import Int8Config, QuantConv2d, QuantEmbedding, QuantLinear

__all__ = ["Int8Config", "QuantConv2d", "QuantEmbedding", "QuantLinear"]
from pared.quant.smoothquant import SmoothQuantConfig  # noqa: E402

__all__ += ["SmoothQuantConfig"]
from pared.quant.weight_only import QuantEmbeddingNBits, QuantLinearNBits, WeightOnlyConfig  # noqa: E402

__all__ += ["QuantEmbeddingNBits", "QuantLinearNBits", "WeightOnlyConfig"]
from pared.quant.cle import CrossLayerEqualizationConfig  # noqa: E402

__all__ += ["CrossLayerEqualizationConfig"]
from pared.quant.qat import QATConfig  # noqa: E402
from pared.quant.mixed import MixedPrecisionConfig  # noqa: E402

__all__ += ["MixedPrecisionConfig", "QATConfig"]
