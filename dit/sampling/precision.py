"""The arithmetic of a network's forward pass, as one switch: `fp32` (IEEE float32, TF32 off),
`tf32` (TF32 matmuls and convolutions on Ampere+ GPUs) or `bf16` (autocast to bfloat16).

    with forward_precision("fp32", device):   # TF32 forced off, whatever was set globally
        out = model(x, t, y)

torch's defaults are not IEEE: cuDNN convolutions run in TF32 on Ampere/Hopper unless told
otherwise, and training may have switched matmuls to TF32 (`tf32=true`). The flags are set
through torch's per-backend API (`torch.backends.cuda.matmul.fp32_precision`,
`torch.backends.cudnn.conv.fp32_precision`, the same API the trainer uses: mixing it with the
legacy `allow_tf32` flags makes torch refuse to read them) and restored on exit. On a CPU, TF32
does not exist and `tf32` computes what `fp32` computes.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS} "
                         "(fp32: IEEE float32, tf32: TF32 matmuls/convolutions, bf16: bfloat16 autocast)")
    return precision


def backend_flags() -> dict:
    """The float32 precision torch's GPU backends are set to now (what a forward pass uses)."""
    return {"matmul": torch.backends.cuda.matmul.fp32_precision, "cudnn_conv": torch.backends.cudnn.conv.fp32_precision}


@contextlib.contextmanager
def tf32_flags(allow: bool):
    """TF32 on (`allow`) or off for CUDA matmuls and cuDNN convolutions inside the block; the
    previous flags come back on exit."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    wanted = "tf32" if allow else "ieee"
    matmul.fp32_precision = conv.fp32_precision = wanted
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


@contextlib.contextmanager
def forward_precision(precision: str, device: torch.device | str):
    """Run the block's forward passes in `precision` on `device`: fp32 and bf16 with TF32 off
    (bf16 autocasts matmuls and convolutions to bfloat16; what autocast leaves in float32 stays
    IEEE), tf32 with it on. Callers cast the output back to float32 after the block."""
    check_precision(precision)
    with tf32_flags(precision == "tf32"):
        if precision == "bf16":
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                yield
        else:
            yield
