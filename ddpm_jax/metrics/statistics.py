"""Feature statistics and the scores made from them: streaming mean / covariance, pytorch-fid
style statistics files, FID, Inception Score and KID. All arithmetic is float64.

Semantics follow the references the numbers are compared with: FID as pytorch-fid
(``scipy.linalg.sqrtm``, eps retry, imaginary-part check), covariance with ddof=1, IS over
consecutive splits (OpenAI / TF-GAN), KID as Bińkowski et al. 2018 with torch-fidelity's subset
draws.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import scipy.linalg
from scipy.special import log_softmax, logsumexp

from ddpm_jax import files, input_files

# A statistics file (pytorch-fid's mu and sigma, and our 0-d metadata beside them).
STATISTICS = {
    "mu": input_files.ArraySpec("a float [D] mean of features", kinds="f", ndim=1, finite=True),
    "sigma": input_files.ArraySpec("a float [D, D] covariance", kinds="f", ndim=2, finite=True),
}
METADATA = input_files.ArraySpec("metadata: a string or numbers", kinds="biufUS")


def _real_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as a float64 [N, D] array, refusing other ranks, non-real dtypes and inf / NaN rows."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array of feature rows, got shape {x.shape}.")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}.")
    x = x.astype(np.float64, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
    if bad:
        raise ValueError(
            f"{name} has {bad} of {x.shape[0]} rows with inf or NaN; drop or fix them (they usually"
            " come from diverged samples) before computing statistics."
        )
    return x


class RunningMoments:
    """Streaming mean and covariance of feature rows, so [50000, 2048] never sits in memory.

    Chan et al.'s parallel update: a batch with n_b rows, mean m_b and centred scatter
    M_b = Σ (x - m_b)(x - m_b)ᵀ merges into (n, m, M) as
    m ← m + δ·n_b/(n+n_b), M ← M + M_b + δδᵀ·n·n_b/(n+n_b), δ = m_b - m.
    Only centred quantities are summed, so a large common offset costs no precision.
    ``covariance`` = M / (n - 1), i.e. ``np.cov(rows, rowvar=False)`` (ddof=1, as pytorch-fid and
    torch-fidelity).
    """

    def __init__(self) -> None:
        self._count = 0
        self._dim: int | None = None
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None

    def update(self, features: np.ndarray) -> None:
        """Add [N, D] feature rows (any real dtype; accumulated in float64)."""
        x = _real_matrix(features, "features")
        if self._dim is None:
            self._dim = x.shape[1]
        elif x.shape[1] != self._dim:
            raise ValueError(
                f"features have dimension {x.shape[1]}, but earlier updates had {self._dim}; "
                "all rows must come from the same feature layer."
            )
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        scatter_b = centred.T @ centred
        if self._mean is None or self._scatter is None:
            self._count, self._mean, self._scatter = n_b, mean_b, scatter_b
            return
        n = self._count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (self._count * n_b / n)
        self._count = n

    @property
    def count(self) -> int:
        """Number of rows seen so far."""
        return self._count

    @property
    def mean(self) -> np.ndarray:
        """[D] float64 mean of all rows seen."""
        if self._mean is None:
            raise ValueError("No feature rows yet; call update() before reading the mean.")
        return self._mean.copy()

    @property
    def covariance(self) -> np.ndarray:
        """[D, D] float64 sample covariance (ddof=1) of all rows seen."""
        if self._scatter is None or self._count < 2:
            raise ValueError(
                f"The covariance needs at least 2 feature rows, got {self._count}; update() with "
                "more rows first."
            )
        return self._scatter / (self._count - 1)


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1:
        raise ValueError(f"{name}: mu must be a 1-D [D] mean, got shape {mu.shape}.")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: sigma must be the [D, D] = {(mu.shape[0],) * 2} covariance matching mu, got "
            f"shape {sigma.shape}."
        )


def save_statistics(
    path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **metadata: object
) -> None:
    """Write ``mu`` [D] and ``sigma`` [D, D] (float64) to an .npz in pytorch-fid's layout, with
    each metadata item (e.g. convention="tf", num_images=50000, source="cifar10:train") as an
    extra key holding a 0-d array, so ``np.load`` needs no pickle. Written atomically
    (``files.write_atomic``): a reader never sees a half-written file."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    _check_statistics(mu, sigma, str(path))
    arrays = {"mu": mu, "sigma": sigma}
    for key, value in metadata.items():
        array = np.asarray(value)
        if array.dtype.kind == "O":
            raise ValueError(
                f"Metadata {key}={value!r} is not a string, number or numeric array; it would need "
                "pickle to load. Convert it (e.g. with str()) first."
            )
        arrays[key] = array
    files.write_atomic(path, lambda f: np.savez(f, **arrays))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``(mu, sigma, metadata)`` from a statistics .npz: ours, or a plain pytorch-fid file
    holding only ``mu`` and ``sigma`` (then metadata is {}). 0-d metadata arrays come back as
    Python scalars / strings; mu and sigma as float64."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No statistics file at {os.fspath(path)!r}; compute the reference statistics first or "
            "fix the path."
        )
    data = input_files.read_npz(path, "statistics file", STATISTICS, others=METADATA)
    mu = data.pop("mu").astype(np.float64)
    sigma = data.pop("sigma").astype(np.float64)
    metadata = {key: (value.item() if value.ndim == 0 else value) for key, value in data.items()}
    _check_statistics(mu, sigma, os.fspath(path))
    return mu, sigma, metadata


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """(S1 S2)^½ by ``scipy.linalg.sqrtm``, without scipy's singular-matrix warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(sigma1 @ sigma2)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """FID = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), in float64 with ``scipy.linalg.sqrtm``.

    pytorch-fid's rules: if the square root is not finite (singular product), warn and retry with
    eps·I added to both covariances; if it is complex with an imaginary diagonal beyond 1e-3
    (atol of ``np.allclose``), raise; otherwise keep its real part. scipy's own singular-matrix
    warning is silenced, as pytorch-fid's ``disp=False`` did.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    _check_statistics(mu1, sigma1, "first statistics")
    _check_statistics(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"The two statistics have feature dimensions {mu1.shape[0]} and {mu2.shape[0]}; both "
            "must come from the same feature layer."
        )
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("The statistics contain inf or NaN; recompute them from finite features.")

    covmean = _sqrtm_product(sigma1, sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: sqrt(sigma1 @ sigma2) is not finite (singular product); adding eps={eps} to the "
            "covariance diagonals.",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm_product(sigma1 + offset, sigma2 + offset)
        if not np.isfinite(covmean).all():
            raise ValueError(
                f"FID: sqrt(sigma1 @ sigma2) is not finite even with eps={eps}; try a larger eps."
            )
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                "FID: sqrt(sigma1 @ sigma2) has a large imaginary component "
                f"(max |imag| = {np.max(np.abs(covmean.imag)):.3g}); the covariances are not "
                "valid (positive semi-definite) covariance matrices."
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits) in float64 and p(y) the mean of
    p(y|x) over a split; returns the mean and population std (``np.std``) over ``splits``.

    The N rows are cut into ``splits`` consecutive parts, rows [i·N//splits, (i+1)·N//splits),
    without shuffling, as the original OpenAI / TF-GAN code (torch-fidelity shuffles by default).
    """
    x = _real_matrix(logits, "logits")
    n = x.shape[0]
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}.")
    if n < splits:
        raise ValueError(
            f"Got {n} rows of logits for {splits} splits; pass at least {splits} rows or lower "
            "splits."
        )
    log_p = log_softmax(x, axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        log_marginal = logsumexp(part, axis=0) - np.log(part.shape[0])
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float
) -> np.ndarray:
    """k(x, y) = (gamma · x·y + coef0)^degree for all row pairs."""
    return (gamma * (x @ y.T) + coef0) ** degree


def _unbiased_mmd2(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """MMD² = Σ_{i≠j} k(x_i, x_j)/(m(m-1)) + Σ_{i≠j} k(y_i, y_j)/(m(m-1)) - 2 Σ_{i,j} k(x_i, y_j)/m²
    (Bińkowski et al. 2018's estimator)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the kernel (gamma x·y + coef0)^degree,
    gamma = 1/D by default, on ``num_subsets`` pairs of subsets of ``subset_size`` rows; returns
    the mean and population std over subsets, in float64.

    Subsets are drawn without replacement by ``np.random.RandomState(seed).choice``, first from a
    then from b in each round, as torch-fidelity's ``kid_features_to_metric``, so with the same
    seed the two give the same numbers.
    """
    a = _real_matrix(features_a, "features_a")
    b = _real_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"features_a has dimension {a.shape[1]} and features_b {b.shape[1]}; both must come "
            "from the same feature layer."
        )
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}.")
    if subset_size < 2:
        raise ValueError(
            f"subset_size must be at least 2 for the unbiased MMD², got {subset_size}."
        )
    fewest = min(a.shape[0], b.shape[0])
    if subset_size > fewest:
        raise ValueError(
            f"subset_size={subset_size} exceeds the number of rows (features_a: {a.shape[0]}, "
            f"features_b: {b.shape[0]}); lower subset_size to at most {fewest}."
        )
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(a.shape[0], subset_size, replace=False)]
        y = b[rng.choice(b.shape[0], subset_size, replace=False)]
        mmds[i] = _unbiased_mmd2(
            _polynomial_kernel(x, x, degree, gamma, coef0),
            _polynomial_kernel(x, y, degree, gamma, coef0),
            _polynomial_kernel(y, y, degree, gamma, coef0),
        )
    return float(np.mean(mmds)), float(np.std(mmds))
