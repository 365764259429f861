"""Improved precision and recall (Kynkäänniemi et al. 2019) on per-image features, in one of two
arithmetics (`pr_arithmetic`):

- `fp32` (the default): torch-fidelity's kernel, Euclidean distances in float32;
- `adm`: what ADM's evaluator (guided-diffusion `evaluations/evaluator.py`) computes, for
  numbers comparable with the ones published with it. The two differ by the points on the
  boundary of a ball that flip: about 1e-3 on Inception features (by the issue's audit), more
  where the k-NN distances are concentrated (docs/sampling.md has figures).

Both use the same definition: each set's manifold is the union of balls around its points,
reaching each point's k-th nearest neighbour in its own set (k = 3; a point is its own 0-th
neighbour); precision is the share of generated points inside the real manifold, recall the
share of real points inside the generated one, membership with `<=`.

ADM's arithmetic, as we read its graph (facts, our own code):

- distances are *squared* Euclidean distances, `max(|u|^2 - 2 u.v + |v|^2, 0)`, evaluated in
  blocks of 10 000 x 10 000 pairs;
- in each block the features are cast to float16 and every step rounds to float16: the squares
  of the entries, their sum per row (accumulated in float32), the matrix product (float16 inputs,
  float32 accumulation, float16 result), then `(|u|^2 - 2 u.v) + |v|^2`;
- a block with any non-finite value (float16 overflows at 65 504) is recomputed in float32;
- radii are the (k+1)-th smallest of a row's distances, self included, kept in float32; the
  membership tests compare the same blocked distances against them.

float16 sums and products are emulated in float32 and rounded: float32 has enough bits (24 >=
2 x 11 + 2) that rounding its result to float16 equals the correctly rounded float16 operation.
"""

from __future__ import annotations

import numpy as np
import torch

from dit.sampling.precision import tf32_flags

PR_ARITHMETICS = ("fp32", "adm")
ADM_BLOCK = 10_000  # ADM's row and column batch of pairwise distances


def check_pr_arithmetic(arithmetic: str) -> str:
    if arithmetic not in PR_ARITHMETICS:
        raise ValueError(f"unknown pr_arithmetic {arithmetic!r}: use 'fp32' (float32 distances, torch-fidelity's "
                         "kernel, the default) or 'adm' (ADM evaluator's float16 distances with float32 fallback)")
    return arithmetic


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     arithmetic: str = "fp32", block_size: int = ADM_BLOCK) -> tuple[float, float]:
    """(precision, recall) of generated features against real ones (ADM: Inception pool_3, k = 3),
    in `arithmetic` ("fp32" or "adm", see the module docstring); `block_size` is ADM's batch."""
    check_pr_arithmetic(arithmetic)
    fake = torch.as_tensor(np.asarray(fake_features, dtype=np.float32))
    real = torch.as_tensor(np.asarray(real_features, dtype=np.float32))
    for name, f in (("real", real), ("generated", fake)):
        if f.ndim != 2:
            raise ValueError(f"{name} features must be (N, D), got shape {tuple(f.shape)}")
        if len(f) <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} images, got {len(f)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, generated {fake.shape[1]}")
    with tf32_flags(False):  # distances in IEEE float32 wherever float32 is used (a GPU would use TF32)
        if arithmetic == "fp32":
            from torch_fidelity.metric_prc import calculate_precision_recall_part

            return calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=10000)
        return _adm_precision_recall(real, fake, k, block_size)


def _round16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to float16 (inf past 65 504), kept as float32 for the next step."""
    return x.half().float()


def _squared_distances_fp32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    nu, nv = (u * u).sum(1), (v * v).sum(1)
    return (nu[:, None] - 2 * (u @ v.T) + nv[None, :]).clamp_min(0.0)


def adm_squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One block of ADM's pairwise squared distances (n, m), float32 holding float16 values, or
    the float32 ones when float16 overflowed anywhere in the block."""
    u16, v16 = _round16(u.float()), _round16(v.float())
    nu, nv = _round16(_round16(u16 * u16).sum(1)), _round16(_round16(v16 * v16).sum(1))
    two_dot = _round16(2 * _round16(u16 @ v16.T))
    d = _round16(_round16(nu[:, None] - two_dot) + nv[None, :]).clamp_min(0.0)
    if not torch.isfinite(d).all():  # ADM: the whole block again in float32
        return _squared_distances_fp32(u.float(), v.float())
    return d


def _blocks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def adm_radii(features: torch.Tensor, k: int, block_size: int = ADM_BLOCK) -> torch.Tensor:
    """Each point's squared distance to its k-th neighbour in its own set ((k+1)-th smallest,
    self included), from ADM's blocked distances; (N,) float32."""
    n = len(features)
    radii = torch.empty(n)
    for r0, r1 in _blocks(n, block_size):
        # The (k+1) smallest of each column block, then of their union: the row's (k+1) smallest.
        parts = [adm_squared_distances(features[r0:r1], features[c0:c1]).topk(min(k + 1, c1 - c0), dim=1,
                                                                               largest=False).values
                 for c0, c1 in _blocks(n, block_size)]
        radii[r0:r1] = torch.cat(parts, dim=1).kthvalue(k + 1, dim=1).values
    return radii


def _adm_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int, block_size: int) -> tuple[float, float]:
    real_radii, fake_radii = adm_radii(real, k, block_size), adm_radii(fake, k, block_size)
    real_inside = torch.zeros(len(real), dtype=torch.bool)  # real point inside some generated ball: recall
    fake_inside = torch.zeros(len(fake), dtype=torch.bool)  # generated point inside some real ball: precision
    for r0, r1 in _blocks(len(real), block_size):
        for c0, c1 in _blocks(len(fake), block_size):
            d = adm_squared_distances(real[r0:r1], fake[c0:c1])  # (real block, fake block)
            real_inside[r0:r1] |= (d <= fake_radii[None, c0:c1]).any(dim=1)
            fake_inside[c0:c1] |= (d <= real_radii[r0:r1, None]).any(dim=0)
    return float(fake_inside.double().mean()), float(real_inside.double().mean())
