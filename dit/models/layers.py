"""Architecture options of the DiT block (LightningDiT's set), each chosen by a `DiTConfig` key.

Every option's default builds exactly the module the official DiT uses, so the default model is
unchanged; the alternatives are the ones LightningDiT (Yao et al., 2025) trains with:

- `norm`: "layernorm" (DiT: LayerNorm, eps 1e-6, no affine) or "rmsnorm" (RMSNorm, eps 1e-6,
  no affine). The norms feeding an adaLN modulation have no learned weight: a per-channel weight
  `w` before `x * (1 + scale) + shift` is exactly absorbed by the regression that makes `scale`
  (scale' = w * scale + w - 1), so it would only add parameters.
- `mlp`: "gelu" (DiT: Linear, tanh GELU, Linear, width `mlp_ratio * D`) or "swiglu"
  (`fc2(silu(a) * b)` with `[a | b] = fc1(x)`, width `int(2/3 * int(mlp_ratio * D))`, which keeps
  the parameter count of the GELU MLP).
- `qk_norm`: normalise each head's query and key before the dot product. As in LightningDiT the
  kind follows `norm`: a LayerNorm with affine (torch's eps 1e-5, what timm's Attention uses) or
  an RMSNorm with a learned weight (eps 1e-6).
- `rope`: 2-D rotary position embedding on q and k (EVA-02 / LightningDiT's layout, below).
  The absolute sin-cos table stays added to the tokens, as LightningDiT keeps it.

This file imports nothing from the rest of `dit/`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLUPacked
from timm.layers.attention import AttentionRope
from timm.layers.pos_embed_sincos import apply_rot_embed_cat, build_rotary_pos_embed
from timm.models.vision_transformer import Attention

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
# "shift_scale_gate": DiT's six vectors per block; "scale_gate": LightningDiT's `wo_shift`, four
# vectors (scale, gate) x (attention, MLP) and no shift. The final layer keeps shift and scale
# either way, as in LightningDiT.
MODULATIONS = ("shift_scale_gate", "scale_gate")

# The architecture options, each with the values it takes (bool: true or false), in the order
# records and logs list them. Their defaults are `DiTConfig`'s (dit/models/dit.py): written once.
OPTION_CHOICES = {"norm": NORMS, "mlp": MLPS, "rope": bool, "qk_norm": bool, "modulation": MODULATIONS}
OPTIONS = tuple(OPTION_CHOICES)

ADALN_EPS = 1e-6  # DiT's LayerNorm eps, kept for RMSNorm
ROPE_THETA = 10000.0


def option_values(source) -> dict:
    """{option: value} of every architecture option of `source` (a `DiTConfig`, the training
    config's `model`, anything with the options as attributes)."""
    return {name: getattr(source, name) for name in OPTIONS}


def check_options(options: dict) -> None:
    """Raise ValueError naming the option and its choices for a value that is not one of them
    (the named choices are checked before the true/false flags)."""
    for name, choices in OPTION_CHOICES.items():
        if choices is not bool and options[name] not in choices:
            raise ValueError(f"model option {name} must be one of {', '.join(choices)}; got {options[name]!r}")
    for name, choices in OPTION_CHOICES.items():
        if choices is bool and not isinstance(options[name], bool):
            raise ValueError(f"model option {name} must be true or false, got {options[name]!r}")


def adaln_norm(kind: str, dim: int) -> nn.Module:
    """The norm in front of an adaLN modulation: no learned affine, eps 1e-6."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=ADALN_EPS)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=ADALN_EPS, elementwise_affine=False)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class RMSNormFP32(nn.RMSNorm):
    """torch's RMSNorm, computed in (at least) float32 and returned in the input's dtype. Under
    bf16 autocast q and k arrive in bf16 while the weight stays float32, a mix torch's kernel does
    not fuse (it warns and takes a slower path); LightningDiT normalises in float32 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), self.normalized_shape, weight, self.eps).to(x.dtype)


def qk_norm_layer(kind: str):
    """Constructor `(head_dim) -> module` of the per-head q/k norm (learned affine)."""
    if kind == "layernorm":
        return nn.LayerNorm  # eps 1e-5, as timm's Attention and LightningDiT use it
    if kind == "rmsnorm":
        return lambda dim, **kw: RMSNormFP32(dim, eps=ADALN_EPS, **kw)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """SwiGLU's inner width: two thirds of the GELU MLP's, so both have about 8 D^2 weights at
    ratio 4 (LightningDiT's rule, no rounding to a multiple): 3072 for D = 1152."""
    return int(2 / 3 * int(dim * mlp_ratio))


def _tanh_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


def make_mlp(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    """The block's MLP; parameters `fc1.*`, `fc2.*` in both kinds. SwiGLU's `fc1` holds the
    gate's rows first, then the value's (one fused matrix, as LightningDiT's `w12`)."""
    if kind == "gelu":
        return Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=_tanh_gelu, drop=0)
    if kind == "swiglu":
        # timm's packed SwiGLU: act(first half) * second half, one Linear for both halves.
        return SwiGLUPacked(in_features=dim, hidden_features=2 * swiglu_hidden(dim, mlp_ratio), drop=0)
    raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")


def make_attention(dim: int, num_heads: int, *, norm: str, qk_norm: bool, rope: bool) -> nn.Module:
    """Multi-head self-attention with a fused qkv projection (`qkv.*`, `proj.*`, and
    `q_norm.*` / `k_norm.*` with qk-norm). Both timm classes call
    F.scaled_dot_product_attention (flash kernels on GPU) unless timm's fused attention is off.
    Without RoPE this is exactly the official DiT's attention; with it, the module takes the
    table of `rope_table` as its second argument."""
    norm_layer = qk_norm_layer(norm) if qk_norm else None
    if rope:
        attn = AttentionRope(dim, num_heads=num_heads, qkv_bias=True, num_prefix_tokens=0,
                             qk_norm=qk_norm, norm_layer=norm_layer)
    elif qk_norm:
        attn = Attention(dim, num_heads=num_heads, qkv_bias=True, qk_norm=True, norm_layer=norm_layer)
    else:
        attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
    if not attn.fused_attn:
        # The same numbers, but attention then materialises the (T, T) score matrices: several
        # times slower and larger on a GPU. Easy to leave on by accident, so say so.
        warnings.warn(
            "timm's fused attention is off (TIMM_FUSED_ATTN=0, timm.layers.set_fused_attn(False) "
            "or exportable mode): DiT attention will not use F.scaled_dot_product_attention and "
            "runs slower with more memory. Unset TIMM_FUSED_ATTN to turn it back on.",
            stacklevel=2,
        )
    return attn


def check_rope_head_dim(head_dim: int) -> None:
    if head_dim % 4:
        raise ValueError(
            f"rope needs a head dimension divisible by 4 (half for rows, half for columns, in pairs); "
            f"hidden_size / num_heads = {head_dim}: change hidden_size or num_heads, or set rope=false"
        )


def rope_table(head_dim: int, grid: int, device: torch.device | None = None) -> torch.Tensor:
    """(grid * grid, 2 * head_dim) float32 `[sin | cos]` of the 2-D rotary embedding, for
    row-major tokens k = row * grid + col.

    Layout (EVA-02's VisionRotaryEmbeddingFast, which LightningDiT uses): the first half of each
    head's channels rotates with the token's row, the second half with its column; within a half,
    channels (2m, 2m+1) form one rotated pair at frequency `10000 ** (-m / (head_dim / 4))`,
    at integer positions 0 .. grid-1. timm's builder gives exactly this table (tested against the
    formula in tests/models/test_model_options.py)."""
    check_rope_head_dim(head_dim)
    sin, cos = build_rotary_pos_embed([grid, grid], dim=head_dim, in_pixels=False,
                                      temperature=ROPE_THETA, device=device)
    return torch.cat([sin, cos], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, head_dim) queries or keys by the (T, 2 * head_dim) `table`: pair
    (x_2m, x_2m+1) -> (x_2m cos - x_2m+1 sin, x_2m+1 cos + x_2m sin). Returns x's dtype."""
    return apply_rot_embed_cat(x, table)
