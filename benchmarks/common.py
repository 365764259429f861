"""Helpers shared by the benchmark scripts: what machine a figure came from, medians with their
spread, the matmul peak that utilisation figures are quoted against, and FLOPs per step."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def machine_info(device: str | torch.device = "cpu", **extra) -> dict:
    """Where and when a measurement ran, plus any `extra` fields; the load average shows other
    work on a shared machine."""
    device = torch.device(device)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average": os.getloadavg()[0],
        **extra,
    }


def summary(values) -> dict:
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                repeats: int = 5) -> float:
    """Measured FLOP/s of an n x n x n matmul through torch (median of `repeats` after warm-up):
    the practical peak that model FLOP/s are compared with."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def perturbed(model: torch.nn.Module, seed: int = 1, std: float = 0.02) -> torch.nn.Module:
    """Add N(0, std) noise to every trainable parameter, in place. adaLN-Zero initialises the
    modulation and output layers to zero, which makes every block the identity and leaves most
    weights without gradient; benchmarks move off zero so that every step does its full work."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g).to(p.device))
    return model


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Matmul + attention FLOPs of one forward and backward through `model` (a batch `x`, labels
    `y`, t = 0). The counter has formulas for the CUDA attention kernels but not for the CPU flash
    kernel, so on CPU it counts under the math backend (the same FLOPs in the model's terms)."""
    t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    backend = sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else nullcontext()
    with FlopCounterMode(display=False) as counter, backend:
        model(x, t, y).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
