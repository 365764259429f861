"""What a DiT state dict's keys and shapes say: the official release files (`DiT-XL-2-256x256.pt`,
...) are a plain EMA state dict and nothing else, so their configuration is inferred here from
the tensor shapes (contract 1 in docs/design.md); wrapper prefixes (DDP, torch.compile) are
removed first.

SiT's release (`SiT-XL-2-256x256.pt`, served as `SiT-XL-2-256.pt`; willisma/SiT) is the same
layout (SiT keeps DiT's model file: learned-sigma output channels, 2C, whose second half SiT
drops), so the shapes cannot tell the two apart; what they were trained on (DDPM vs. a linear
flow with t = 1 at the data end) is decided by the file name (`release_family`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from dit.io.errors import CheckpointError
from dit.models import DIT_SIZES, arch_name

# The paper's label-dropout rate, assumed for state dicts that carry no config of their own.
RELEASE_CLASS_DROPOUT = 0.1
# Release families by file-name prefix (case-insensitive): SiT's files are named SiT-<size>-<res>.pt.
RELEASE_FAMILIES = {"sit-": "sit"}
RELEASE_FORMATS = ("dit", "sit")  # what `release_format=` may name


def release_family(path: str | os.PathLike, release_format: str | None = None) -> str:
    """"sit" for a file named like SiT's release (`SiT-XL-2-256.pt`, `SiT-XL-2-256x256.pt`: a
    flow model, `dit.sampling.trained.RELEASE_OBJECTIVES["sit"]`), else "dit" (DDPM). A bare state
    dict records nothing else that could tell: keep SiT's file name when copying it, or say it
    (`release_format`, which wins over the name)."""
    if release_format is not None:
        if release_format not in RELEASE_FORMATS:
            raise ValueError(f"release_format={release_format!r}: use one of {list(RELEASE_FORMATS)}")
        return release_format
    name = Path(path).name.lower()
    return next((family for prefix, family in RELEASE_FAMILIES.items() if name.startswith(prefix)), "dit")


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the key prefixes added by wrappers: DDP's leading `module.` and `torch.compile`'s
    `_orig_mod.` (at the top or on compiled sub-modules)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while len(parts) > 1 and parts[0] == "module":
            parts = parts[1:]
        new = ".".join(parts)
        if new in out:
            raise CheckpointError(f"keys {new!r} appear twice once wrapper prefixes are removed (e.g. {key!r})")
        out[new] = value
    return out


_INFER_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "blocks.0.mlp.fc1.weight",
    "final_layer.linear.weight",
)


def infer_dit_config(
    state_dict: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    *,
    num_classes: int | None = None,
    class_dropout_prob: float | None = None,
) -> dict:
    """The `DiT` constructor arguments that produce `state_dict`'s keys and shapes.

    Read from the shapes: patch size, input channels and width (patch projection), input size
    (position table length x patch), depth (block count), mlp_ratio (fc1 width / width),
    learned sigma (output channels = 2 x input channels).

    Not in the shapes, so decided by rule:
    * `num_heads`: the official table when (depth, width) is one of S/B/L/XL, otherwise it must
      be passed (it changes the numerics, not the shapes).
    * label table with R rows: either R classes without a null row (no label dropout) or R - 1
      classes plus the null row. Without hints we assume the release convention, a null row
      and dropout 0.1 (1001 rows -> 1000 classes). Pass `num_classes` (R or R - 1 decides) or
      `class_dropout_prob` (0 means no null row) to say otherwise. Files that store a
      `model_config` (ours) never need this: `load_dit_checkpoint` trusts the stored config.
    """
    sd = strip_wrapper_prefixes(state_dict)
    missing = [k for k in _INFER_KEYS if k not in sd]
    if missing:
        sample = ", ".join(list(sd)[:6])
        raise CheckpointError(
            f"cannot infer a DiT configuration: the state dict has no {', '.join(missing)} "
            f"(its keys begin: {sample or 'none'}). Is it a DiT state dict in the official layout?"
        )

    hidden, in_channels, patch, patch_w = sd["x_embedder.proj.weight"].shape
    if patch != patch_w:
        raise CheckpointError(f"x_embedder.proj.weight has non-square patches {patch}x{patch_w}")
    num_tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise CheckpointError(f"pos_embed has {num_tokens} tokens, not a square grid")

    block_ids = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = len(block_ids)
    if block_ids != set(range(depth)):
        raise CheckpointError(f"block indices are not 0..{depth - 1}: {sorted(block_ids)}")

    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden / hidden
    if int(hidden * mlp_ratio) != mlp_hidden:
        raise CheckpointError(f"MLP width {mlp_hidden} is not int(hidden_size * r) for r = {mlp_hidden}/{hidden}")

    out_channels, rem = divmod(sd["final_layer.linear.weight"].shape[0], patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(
            f"final_layer.linear.weight has {sd['final_layer.linear.weight'].shape[0]} outputs; expected "
            f"patch_size^2 x (1 or 2) x in_channels = {patch * patch} x (1 or 2) x {in_channels}"
        )
    learn_sigma = out_channels == 2 * in_channels

    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is not None:
        if rows not in (num_classes, num_classes + 1):
            raise CheckpointError(
                f"label table has {rows} rows, which fits neither {num_classes} classes nor {num_classes} + null"
            )
        has_null = rows == num_classes + 1
        dropout = class_dropout_prob if class_dropout_prob is not None else (RELEASE_CLASS_DROPOUT if has_null else 0.0)
        if has_null != (dropout > 0):
            raise CheckpointError(
                f"label table has {rows} rows for {num_classes} classes, which contradicts "
                f"class_dropout_prob={dropout} "
                "(a null row exists exactly when class_dropout_prob > 0)"
            )
    elif class_dropout_prob is not None:
        dropout = class_dropout_prob
        num_classes = rows - 1 if dropout > 0 else rows
    else:
        num_classes, dropout = rows - 1, RELEASE_CLASS_DROPOUT

    if num_heads is None:
        num_heads = next((h for d, w, h in DIT_SIZES.values() if (d, w) == (depth, hidden)), None)
        if num_heads is None:
            raise CheckpointError(
                f"cannot infer num_heads: depth={depth}, hidden_size={hidden} is not an official DiT size "
                "and attention heads leave no trace in the shapes. Pass num_heads=... (a divisor of hidden_size)."
            )
    if hidden % num_heads:
        raise CheckpointError(f"num_heads={num_heads} does not divide hidden_size={hidden}")

    return {
        "input_size": grid * patch,
        "patch_size": patch,
        "in_channels": in_channels,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": float(mlp_ratio),
        "class_dropout_prob": float(dropout),
        "num_classes": num_classes,
        "learn_sigma": learn_sigma,
    }


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """What the shapes say about the file's architecture, for error messages."""
    try:
        guess = infer_dit_config(sd)
    except CheckpointError:
        try:
            guess = infer_dit_config(sd, num_heads=1)  # custom width: heads are not in the shapes
            guess.pop("num_heads")
        except CheckpointError as e:
            return f"no DiT this loader knows ({e})"
    name = arch_name(guess["depth"], guess["hidden_size"], guess.get("num_heads", 0), guess["patch_size"])
    return f"{name or 'a custom DiT'}: {guess}"
