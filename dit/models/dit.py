"""Diffusion Transformer (Peebles & Xie, 2023) with adaLN-Zero conditioning.

The parameter names and shapes follow the official release, so its checkpoints
(`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`) load with `strict=True`; the numerics
follow the paper: sinusoidal timestep features `[cos, sin]`, a fixed 2-D sin-cos position
table, LayerNorm (eps 1e-6, no affine) modulated by shift/scale/gate vectors that are
regressed from `c = t_emb + y_emb` and initialised to zero.

`time_inputs=2` (MeanFlow, Geng et al. 2025; docs/meanflow.md) gives the network two times,
`t` (B, 2) = [t, r], embedded as MeanFlow's DiT does: `c = t_emb(t) + h_emb(t - r) + y_emb`, with a
second sin-cos `TimestepEmbedder` (`h_embedder`) for h = t - r. The default, one time (B,), is the
official model, unchanged.

LightningDiT's architecture options (RMSNorm, SwiGLU, 2-D RoPE, qk-norm, shift-free modulation)
are `DiTConfig` keys whose defaults are the official layout; their modules live in
`dit/models/layers.py`, the one other file of `dit/` this one imports (it imports nothing of `dit/`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from dit.models.layers import (OPTIONS, adaln_norm, check_options, check_rope_head_dim, make_attention, make_mlp,
                               option_values, rope_table)


# --------------------------------------------------------------------------------------
# Conditioning embedders
# --------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine transform of normalised tokens. x (N, T, D); shift, scale (N, D);
    shift None (shift-free modulation) scales only."""
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, `[cos, sin]` order.

    Frequency i of `half = dim // 2` is `exp(-ln(max_period) * i / half)`. An odd `dim` gets a
    trailing zero column. Returns (N, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D) vectors: sinusoidal features followed by a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_features(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


def null_class(num_classes: int) -> int:
    """The label id of "no class": the extra last row of the label table (docs/design.md,
    classifier-free guidance). Label dropout in training and the unconditional half of a guided
    pass both use it."""
    return int(num_classes)


def parse_guided_channels(value: int | str, in_channels: int) -> int:
    """How many leading epsilon channels classifier-free guidance mixes: 3 (also "3"), as the
    released models were evaluated, or "all" (= `in_channels`). Raises ValueError otherwise."""
    if isinstance(value, str):
        value = in_channels if value == "all" else int(value) if value.isdigit() else value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= in_channels:
        raise ValueError(f"guided_channels must be 1..{in_channels} or 'all' (3 reproduces the paper), got {value!r}")
    return value


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D) vectors. With `dropout_prob > 0` the table has one extra row,
    the "null" class (id `num_classes`), used for label dropout and classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace labels by the null class: at random with `dropout_prob`, or where
        `force_drop_ids == 1`."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, null_class(self.num_classes)), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------
# Transformer blocks
# --------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Pre-LN transformer block whose norms are modulated by the conditioning (adaLN-Zero).

    Each residual branch is multiplied by a gate regressed from `c`; the regression layer is
    zero at init, so every block starts as the identity. `norm`, `mlp`, `qk_norm`, `rope` and
    `modulation` are the architecture options of `DiTConfig` (see dit/models/layers.py).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, norm: str, mlp: str, qk_norm: bool,
                 rope: bool, modulation: str):
        super().__init__()
        self.norm1 = adaln_norm(norm, hidden_size)
        # F.scaled_dot_product_attention (fused kernels); warns when timm's fused attention is off.
        self.attn = make_attention(hidden_size, num_heads, norm=norm, qk_norm=qk_norm, rope=rope)
        self.norm2 = adaln_norm(norm, hidden_size)
        self.mlp = make_mlp(mlp, hidden_size, mlp_ratio)
        self.shift = modulation == "shift_scale_gate"
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (6 if self.shift else 4) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        if self.shift:
            # Order of the six vectors: (shift, scale, gate) for attention, then for the MLP.
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        else:
            # Shift-free: (scale, gate) for attention, then for the MLP.
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * (self.attn(h) if rope is None else self.attn(h, rope))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm then a linear map from each token to its patch of output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str):
        super().__init__()
        self.norm_final = adaln_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Constructor arguments of `DiT`; stored in our checkpoints as a plain dict. Its defaults are
    the one place the model's defaults are written: the blocks take every value from it, and the
    training schema (dit/config/schema.py) reads them."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # Architecture options (LightningDiT's); the defaults are the official DiT.
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    mlp: str = "gelu"  # "gelu" (tanh GELU) | "swiglu"
    rope: bool = False  # 2-D rotary embedding on q and k (the sin-cos table stays added)
    qk_norm: bool = False  # per-head norm of q and k (of the `norm` kind, learned affine)
    modulation: str = "shift_scale_gate"  # | "scale_gate" (LightningDiT's shift-free adaLN)
    # 1: the timestep t (B,); 2: MeanFlow's two times [t, r] (B, 2), embedded as t and h = t - r
    time_inputs: int = 1

    def __post_init__(self):
        check_options(option_values(self))
        if isinstance(self.time_inputs, bool) or self.time_inputs not in TIME_INPUTS:
            raise ValueError(f"time_inputs must be 1 (the timestep t) or 2 (MeanFlow's [t, r]), got {self.time_inputs!r}")

    def options(self) -> dict:
        """The architecture options, and the number of time inputs, that differ from the
        official layout ({} for DiT itself)."""
        out = {k: v for k, v in option_values(self).items() if v != OPTION_DEFAULTS[k]}
        if self.time_inputs != 1:
            out["time_inputs"] = self.time_inputs
        return out

    def to_dict(self) -> dict:
        """All fields, except architecture options and `time_inputs` left at their defaults: the
        official model's record is what it always was, and a record without them reads as the
        official layout."""
        d = asdict(self)
        for k, default in OPTION_DEFAULTS.items():
            if d[k] == default:
                del d[k]
        if d["time_inputs"] == 1:
            del d["time_inputs"]
        return d


TIME_INPUTS = (1, 2)  # DiTConfig.time_inputs: the timestep t, or MeanFlow's [t, r]


# The architecture options' defaults (the official DiT layout), as DiTConfig declares them.
OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DiTConfig) if f.name in OPTIONS}


class DiT(nn.Module):
    """Class-conditional diffusion transformer over a (C, H, W) latent (or pixel) grid."""

    def __init__(self, **config):
        """Keyword arguments are `DiTConfig`'s fields; those left out take its defaults
        (DiT-XL/2 on 32x32x4 latents, 1000 classes), so the defaults live in one place."""
        super().__init__()
        c = DiTConfig(**config)
        c = dataclasses.replace(c, mlp_ratio=float(c.mlp_ratio), class_dropout_prob=float(c.class_dropout_prob),
                                learn_sigma=bool(c.learn_sigma))
        self.config = c
        input_size, patch_size, in_channels, hidden_size = c.input_size, c.patch_size, c.in_channels, c.hidden_size
        depth, num_heads, mlp_ratio, num_classes, learn_sigma = c.depth, c.num_heads, c.mlp_ratio, c.num_classes, c.learn_sigma
        options = option_values(c)
        if input_size % patch_size:
            raise ValueError(
                f"input_size {input_size} is not divisible by patch_size {patch_size}: "
                "choose an image size whose latent side is a multiple of the patch size"
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if c.rope:
            check_rope_head_dim(hidden_size // num_heads)
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # MeanFlow's second time input: its own sin-cos embedder of h = t - r (None for one time input)
        self.h_embedder = TimestepEmbedder(hidden_size) if c.time_inputs == 2 else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, c.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed (not trained) sin-cos table; a parameter so that it sits in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, **options) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=c.norm)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation: Xavier-uniform linear layers, N(0, 0.02) embeddings, and
        zeros for every adaLN regression and for the output layer (adaLN-Zero)."""

        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier_linear)

        grid = int(self.x_embedder.num_patches ** 0.5)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(table.float().unsqueeze(0))

        # The patch projection is a conv; initialise it as the linear map it is.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.h_embedder is not None:
            nn.init.normal_(self.h_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.h_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def rope_table(self, device: torch.device | None = None) -> torch.Tensor:
        """The 2-D rotary table of this model's token grid: (T, 2 * head_dim), `[sin | cos]`."""
        grid = int(self.x_embedder.num_patches ** 0.5)
        return rope_table(self.config.hidden_size // self.num_heads, grid, device=device)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) images; token order is row-major over the grid."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """(N, D): the timestep embedding of t (N,), or with two time inputs of t (N, 2) = [t, r]:
        emb_t(t) + emb_h(t - r) (MeanFlow's DiT sums the two; r = t gives h = 0)."""
        if self.h_embedder is None:
            return self.t_embedder(t)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"a model with two time inputs takes t of shape (N, 2) = [t, r], got {tuple(t.shape)}")
        return self.t_embedder(t[:, 0]) + self.h_embedder(t[:, 0] - t[:, 1])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) noisy input, t (N,) diffusion timesteps (with `time_inputs=2`: (N, 2),
        MeanFlow's [t, r]), y (N,) class labels.
        Returns (N, out_channels, H, W): epsilon, then the variance interpolation when learned."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / patch_size ** 2
        t_emb = self.embed_time(t)  # (N, D)
        y_emb = self.y_embedder(y, self.training)  # (N, D); label dropout only while training
        c = t_emb + y_emb  # (N, D)
        # (T, 2 * head_dim) rotary table, rebuilt per call (cheap) so that it follows x's device
        # and never sits in the state dict.
        rope = self.rope_table(x.device) if self.config.rope else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * out_channels)
        return self.unpatchify(x)  # (N, out_channels, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guided_channels: int | str = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched pass.

        The batch holds the conditional half then the unconditional half: `y[:N//2]` are the
        class labels and `y[N//2:]` the null class (`num_classes`); only `x[:N//2]` is used, and
        the guided result is returned for both halves so a sampler can keep running on 2N.

        `guided_channels`: 3 guides only the first three epsilon channels, as the released
        models were evaluated (the paper's numbers); "all" guides every epsilon channel. The
        learned-variance channels are never guided.
        """
        guided_channels = parse_guided_channels(guided_channels, self.in_channels)
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


# --------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position table (MAE layout)
# --------------------------------------------------------------------------------------


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) features `[sin(pos * w_i), cos(pos * w_i)]`,
    `w_i = 10000 ** (-i / (dim / 2))`. Computed in float64."""
    if dim % 2:
        raise ValueError(f"position embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.to(torch.float64).reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) table for a row-major token grid. As in MAE, the first half of the
    channels encodes the column index and the second half the row index."""
    if dim % 4:
        raise ValueError(f"2-D position embedding dim must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)], dim=1)


# --------------------------------------------------------------------------------------
# The official configurations
# --------------------------------------------------------------------------------------

# name -> (depth, hidden_size, num_heads); patch sizes 2, 4, 8 for each.
DIT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def _factory(depth: int, hidden_size: int, num_heads: int, patch_size: int):
    def build(**kwargs) -> DiT:
        return DiT(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size, **kwargs)

    build.__name__ = f"DiT_{depth}x{hidden_size}_p{patch_size}"
    return build


DiT_models = {
    f"DiT-{size}/{patch}": _factory(*DIT_SIZES[size], patch)
    for size in DIT_SIZES
    for patch in (2, 4, 8)
}


def model_arch(name: str) -> dict:
    """`"DiT-XL/2"` -> {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}.
    Also accepts the file-name-safe spelling `"DiT-XL-2"`."""
    canonical = canonical_model_name(name)
    size, patch = canonical[len("DiT-"):].split("/")
    depth, hidden, heads = DIT_SIZES[size]
    return {"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": int(patch)}


def canonical_model_name(name: str) -> str:
    """Accept `DiT-XL/2`, `DiT-XL-2` or `DiT_XL_2`; return the official `DiT-XL/2` or raise."""
    s = name.strip().replace("_", "-")
    if s in DiT_models:
        return s
    head, _, patch = s.rpartition("-")
    if f"{head}/{patch}" in DiT_models:
        return f"{head}/{patch}"
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(DiT_models)}")


def arch_name(depth: int, hidden_size: int, num_heads: int, patch_size: int) -> str | None:
    """The official name of an architecture, or None if it is not one of the twelve."""
    for size, (d, h, n) in DIT_SIZES.items():
        if (d, h, n) == (depth, hidden_size, num_heads) and patch_size in (2, 4, 8):
            return f"DiT-{size}/{patch_size}"
    return None


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable ones); DiT's fixed `pos_embed` counts only in the first."""
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: DiT) -> str:
    """One line for logs: the architecture, its options and its size, e.g.
    `DiT-XL/2 + norm=rmsnorm, mlp=swiglu, rope: 675,129,632 parameters (674,834,720 trainable)`."""
    c = model.config
    name = arch_name(c.depth, c.hidden_size, c.num_heads, c.patch_size) if c.mlp_ratio == 4.0 else None
    name = name or f"DiT (depth={c.depth}, hidden_size={c.hidden_size}, num_heads={c.num_heads}, " \
                   f"patch_size={c.patch_size}, mlp_ratio={c.mlp_ratio})"
    opts = ", ".join(k if v is True else f"{k}={v}" for k, v in c.options().items())
    total, trainable = param_counts(model)
    return f"{name}{' + ' + opts if opts else ''}: {total:,} parameters ({trainable:,} trainable)"
