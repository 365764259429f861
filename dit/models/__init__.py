"""The networks: `DiT` in the official layout (dit.py: embedders, adaLN-Zero block, final layer,
the position table, the `DiT_models` name table), LightningDiT's architecture options (layers.py)
and REPA's training-only projector with its frozen encoder (repa.py).

The names below are the model's public surface; `from dit.models import DiT` is how the rest of
the project (and hubconf.py) reaches them.
"""

from .dit import (DIT_SIZES, OPTION_DEFAULTS, DiT, DiTBlock, DiTConfig, DiT_models, FinalLayer, LabelEmbedder,
                  TimestepEmbedder, arch_name, canonical_model_name, describe, model_arch, modulate, null_class,
                  param_counts, parse_guided_channels, sincos_pos_embed_1d, sincos_pos_embed_2d, timestep_features)
from .layers import OPTIONS, option_values

__all__ = [
    "DIT_SIZES", "DiT", "DiTBlock", "DiTConfig", "DiT_models", "FinalLayer", "LabelEmbedder", "OPTIONS",
    "OPTION_DEFAULTS", "TimestepEmbedder", "arch_name", "canonical_model_name", "describe", "model_arch", "modulate",
    "null_class", "option_values", "param_counts", "parse_guided_channels", "sincos_pos_embed_1d",
    "sincos_pos_embed_2d", "timestep_features",
]
