"""Noise schedules and timestep respacing (discrete DDPM time, t in {0..T-1})."""

from __future__ import annotations

import math

import numpy as np


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule in float64. The endpoints are given for 1000 steps and are scaled
    by 1000 / num_steps so that other lengths describe the same continuous process."""
    scale = 1000 / num_steps
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)],
        dtype=np.float64,
    )


def named_betas(name: str, num_steps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_steps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}: use 'linear' (DiT) or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Which of the original timesteps a respaced sampler visits, sorted ascending.

    - `"ddimN"`: the exact integer stride s with len(range(0, T, s)) == N, e.g. "ddim50" keeps
      {0, 20, ..., 980}; an error when no stride gives exactly N steps.
    - `"N"` or `"N1,N2,..."`: split [0, T) into equal sections (the first T % k one longer) and
      take N_i evenly spaced steps in each, rounding a fractional stride, both ends included:
      "250" keeps {0, 4, 8, ..., 995, 999}.

    The stride is accumulated by repeated addition, as the reference implementation does, so that
    the chosen steps agree with it bit for bit.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            wanted = int(spec[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {wanted} steps of {num_timesteps} with an integer stride ({spec!r})")
        counts = [int(part) for part in spec.split(",") if part]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError(f"empty timestep respacing {section_counts!r}")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the chain that visits only `use_timesteps` but has the same alpha_bar at each of
    them: beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]. Returns (betas', timestep_map)."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    keep = set(use_timesteps)
    new_betas, timestep_map, last = [], [], 1.0
    for i, acp in enumerate(alphas_cumprod):
        if i in keep:
            new_betas.append(1 - acp / last)
            last = acp
            timestep_map.append(i)
    return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)
