"""The Fréchet distance between two Gaussians fitted to features (FID, sFID, the toy judge's
distance) and the statistics it takes: mean and covariance of a whole (N, D) array
(`feature_statistics`), or of batches arriving one at a time (`RunningMoments`, what scoring a
stream of images uses: O(D^2) memory for any N). Both float64. Re-exported by `dit.scoring.metrics`.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.blas import dsyrk

# A covariance must be symmetric and positive semi-definite; these tolerances (relative to its
# largest entry / variance) pass float64 and float32 rounding, and nothing else.
SYMMETRY_TOLERANCE, PSD_TOLERANCE = 1e-6, 1e-4


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features, both float64 (FID's `mu`, `sigma`)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(features)}")
    features = features.astype(np.float64, copy=False)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningMoments:
    """Mean and covariance (float64, the unbiased N - 1 normalisation of `np.cov`) of (B, D)
    batches, merged batch by batch as Chan, Golub & LeVeque's pairwise update does: each batch's
    own mean and centred scatter, then M2 += M2_b + delta delta^T n_a n_b / (n_a + n_b).

    Why not a running sum of x and of x x^T: that subtracts N mu mu^T from the sum of squares at
    the end and loses digits in proportion to |mu|^2 / variance (features far from zero); the
    centred merge does not, at the same cost. The scatter is one symmetric rank-k update in place
    (BLAS dsyrk, the batch's centred rows plus one row for the merge term), so the only D x D
    array is the accumulator itself (32 MB for Inception's 2048)."""

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # upper triangle of the centred scatter, Fortran order for BLAS

    def update(self, batch) -> None:
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {x.shape}")
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature dimension changed between batches: {self.mean.shape[0]} then {x.shape[1]}")
        b = len(x)
        if b == 0:
            return
        mean_b = x.mean(axis=0)
        rows = x - mean_b  # (B, D) centred
        if self.n == 0:
            self.mean = mean_b
            self._m2 = np.zeros((x.shape[1], x.shape[1]), order="F")
        else:
            total = self.n + b
            delta = mean_b - self.mean
            rows = np.vstack([rows, np.sqrt(self.n * b / total) * delta])
            self.mean = self.mean + delta * (b / total)
        # M2 <- rows^T rows + M2 (upper triangle); rows.T is Fortran-ordered, so no copy is made.
        self._m2 = dsyrk(1.0, rows.T, beta=1.0, c=self._m2, trans=0, lower=0, overwrite_c=1)
        self.n += b

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)), as `dit.scoring.metrics.feature_statistics` of all the rows seen."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        upper = np.triu(self._m2)
        sigma = upper + np.triu(upper, 1).T
        sigma /= self.n - 1
        return self.mean.copy(), sigma


def _as_stats(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{which}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{which}: mu/sigma contain NaN or inf (were the images or features broken?)")
    if (np.diag(sigma) < 0).any():
        raise ValueError(f"{which}: sigma has negative variances on its diagonal: not a covariance matrix")
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    asymmetry = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        raise ValueError(f"{which}: sigma is not symmetric (max |sigma - sigma^T| = {asymmetry:.3g}, "
                         f"{asymmetry / scale:.2g} of its largest entry): not a covariance matrix")
    return mu, (sigma + sigma.T) / 2  # symmetric by definition; np.cov rounding may break that


def _psd_factor(sigma: np.ndarray, which: str = "sigma") -> np.ndarray:
    """A (D, r) with A A^T = sigma, r its numerical rank: LAPACK's pivoted Cholesky (pstrf), which
    stops where the remaining diagonal falls to rounding level. For the singular covariances of
    small sets (N images < D dimensions) r <= N - 1, which makes the rest cheap. A sigma that is
    not positive semi-definite (within PSD_TOLERANCE of its largest variance: float32 rounding
    passes) leaves a remainder the factor does not reproduce, and is refused."""
    from scipy.linalg.lapack import dpstrf

    c, piv, rank, info = dpstrf(sigma, tol=-1.0, lower=1)  # tol < 0: LAPACK's D * eps * max(diag)
    if info < 0:
        raise ValueError(f"pivoted Cholesky failed (LAPACK info {info})")
    factor = np.zeros((sigma.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: sigma = factor @ factor.T
    scale = float(np.diag(sigma).max()) if sigma.size else 0.0
    if sigma.size and float(np.abs(sigma - factor @ factor.T).max()) > PSD_TOLERANCE * scale:
        smallest = float(np.linalg.eigvalsh(sigma)[0])
        raise ValueError(f"{which}: sigma is not positive semi-definite (smallest eigenvalue {smallest:.4g}, largest "
                         f"variance {scale:.4g}): not a covariance matrix")
    return factor


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    The reference implementations take `scipy.linalg.sqrtm` of the non-symmetric product S1 S2,
    which returns complex parts and NaNs when the covariances are singular (fewer images than
    dimensions) and needs an epsilon retry. We use that S1 S2 = A A^T S2 has the nonzero
    eigenvalues of A^T S2 A for any factor A A^T = S1 (here a rank-revealing pivoted Cholesky):
    that matrix is symmetric PSD, so a symmetric eigensolver gives its eigenvalues stably and
    tr((S1 S2)^(1/2)) is the sum of their square roots (tiny negative ones from rounding are
    clipped to 0). Equal to the sqrtm form wherever that one is well defined, and only r x r
    (r = the smaller rank) for small sets.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first set")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second set")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]} (different extractors?)")
    factor1, factor2 = _psd_factor(sigma1, "first set"), _psd_factor(sigma2, "second set")
    # tr((S1 S2)^(1/2)) is symmetric in the two sets: project with the lower-rank factor.
    middle = factor1.T @ sigma2 @ factor1 if factor1.shape[1] <= factor2.shape[1] else factor2.T @ sigma1 @ factor2
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    trace_sum = np.trace(sigma1) + np.trace(sigma2)
    value = float(diff @ diff + trace_sum - 2.0 * tr_covmean)
    if value < 0.0:
        # Identical statistics give a rounding-level negative number; anything larger is a bug.
        if value < -1e-6 * max(1.0, trace_sum):
            raise FloatingPointError(f"Fréchet distance came out negative ({value}): the covariances are not PSD")
        value = 0.0
    return value
