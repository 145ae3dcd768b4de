"""Feature statistics, stats files, FID, IS and KID against independent references: numpy's
mean / cov, closed forms, hand-written loops and (``parity``) torch-fidelity 0.4.0's metrics."""

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest

from ddpm_jax.metrics.statistics import (
    RunningMoments,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_statistics,
    save_statistics,
)

# --- RunningMoments ---------------------------------------------------------------------------


def _feed(rows: np.ndarray, batch_sizes: list[int]) -> RunningMoments:
    assert sum(batch_sizes) == len(rows)
    moments = RunningMoments()
    for start, size in zip(np.cumsum([0, *batch_sizes[:-1]]), batch_sizes, strict=True):
        moments.update(rows[start : start + size])
    return moments


def test_running_moments_match_numpy_over_uneven_batches():
    rows = np.random.default_rng(0).normal(size=(500, 12)) @ np.diag(np.arange(1.0, 13.0))
    moments = _feed(rows, [1, 7, 0, 250, 2, 240])
    assert moments.count == 500
    np.testing.assert_allclose(moments.mean, rows.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.covariance, np.cov(rows, rowvar=False), rtol=1e-11)
    assert moments.mean.dtype == moments.covariance.dtype == np.float64


def test_running_moments_are_stable_under_a_large_offset():
    rng = np.random.default_rng(1)
    rows = (1e4 + 0.1 * rng.normal(size=(2000, 5))).astype(np.float32)
    exact = np.cov(rows.astype(np.float64), rowvar=False)
    # The naive E[x²] - E[x]² in float32 loses every digit of the ~1e-2 variance next to 1e8.
    mean32 = rows.mean(axis=0, dtype=np.float32)
    naive = (rows.T @ rows / np.float32(len(rows)) - np.outer(mean32, mean32)) * (2000 / 1999)
    assert np.max(np.abs(naive - exact)) > 10 * np.max(np.abs(exact))
    moments = _feed(rows, [3, 997, 1000])
    np.testing.assert_allclose(moments.covariance, exact, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(moments.mean, rows.astype(np.float64).mean(axis=0), rtol=1e-14)


def test_running_moments_errors():
    moments = RunningMoments()
    with pytest.raises(ValueError, match="call update"):
        _ = moments.mean
    with pytest.raises(ValueError, match="2-D"):
        moments.update(np.zeros(4))
    moments.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 feature rows, got 1"):
        _ = moments.covariance
    with pytest.raises(ValueError, match="dimension 3, but earlier updates had 4"):
        moments.update(np.zeros((2, 3)))
    bad = np.zeros((5, 4))
    bad[1, 0], bad[3, 2] = np.nan, np.inf
    with pytest.raises(ValueError, match="2 of 5 rows"):
        moments.update(bad)
    assert moments.count == 1


# --- statistics files -------------------------------------------------------------------------


def test_save_load_round_trip_with_metadata(tmp_path):
    rng = np.random.default_rng(2)
    mu = rng.normal(size=6).astype(np.float32)
    sigma = np.cov(rng.normal(size=(20, 6)), rowvar=False)
    path = tmp_path / "cifar10_train.npz"
    save_statistics(
        path,
        mu,
        sigma,
        convention="tf",
        num_images=50000,
        source="cifar10:train",
        feature="inception-2048",
    )
    assert [p.name for p in tmp_path.iterdir()] == ["cifar10_train.npz"]  # no temporary left
    with np.load(path, allow_pickle=False) as raw:  # readable without pickle, float64
        assert raw["mu"].dtype == raw["sigma"].dtype == np.float64
    mu2, sigma2, metadata = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu.astype(np.float64))
    np.testing.assert_array_equal(sigma2, sigma)
    assert metadata == {
        "convention": "tf",
        "num_images": 50000,
        "source": "cifar10:train",
        "feature": "inception-2048",
    }
    assert type(metadata["num_images"]) is int and type(metadata["convention"]) is str


def test_load_plain_pytorch_fid_file(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=4).astype(np.float32), np.eye(4, dtype=np.float32)
    np.savez_compressed(tmp_path / "fid_stats.npz", mu=mu, sigma=sigma)
    mu2, sigma2, metadata = load_statistics(tmp_path / "fid_stats.npz")
    assert mu2.dtype == sigma2.dtype == np.float64 and metadata == {}
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


def test_statistics_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No statistics file"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['sigma'\]"):
        load_statistics(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "bad_shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="sigma must be the"):
        load_statistics(tmp_path / "bad_shape.npz")
    with pytest.raises(ValueError, match="mu must be a 1-D"):
        save_statistics(tmp_path / "x.npz", np.zeros((3, 1)), np.eye(3))
    with pytest.raises(ValueError, match="would need pickle"):
        save_statistics(tmp_path / "x.npz", np.zeros(3), np.eye(3), source=None)
    assert not (tmp_path / "x.npz").exists()


# --- FID --------------------------------------------------------------------------------------


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_fid_of_non_commuting_gaussians_matches_the_symmetric_form():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + np.eye(5), b @ b.T + 0.5 * np.eye(5)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # Tr (S1 S2)^½ = Tr (S1^½ S2 S1^½)^½, the latter symmetric PSD: eigenvalues via eigh.
    root1 = _psd_sqrt(s1)
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero():
    rows = np.random.default_rng(5).normal(size=(400, 16))
    mu, sigma = rows.mean(axis=0), np.cov(rows, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fid_of_diagonal_gaussians_in_closed_form():
    rng = np.random.default_rng(6)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    d1, d2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    fid = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2))
    assert fid == pytest.approx(expected, rel=1e-12)


def test_fid_singular_product_takes_the_eps_retry():
    # Singular covariances, PSD up to round-off (sigma2's eigenvalues: -1e-18, 1): sigma1 @ sigma2
    # = [[0, 1e-9], [0, 0]] is nilpotent and has no square root, so sqrtm returns inf.
    sigma1, sigma2 = np.diag([1.0, 0.0]), np.array([[0.0, 1e-9], [1e-9, 1.0]])
    mu = np.zeros(2)
    eps = 1e-6
    with pytest.warns(RuntimeWarning, match="adding eps=1e-06"):
        fid = frechet_distance(mu, sigma1, mu, sigma2, eps=eps)
    # With eps·I the product is ~diag(eps, eps)·(1 + eps): Tr sqrt ≈ 2 sqrt(eps (1 + eps)).
    assert fid == pytest.approx(2.0 - 4.0 * math.sqrt(eps * (1 + eps)), abs=1e-9)


def test_fid_large_imaginary_component_raises():
    with pytest.raises(ValueError, match=r"imaginary component \(max \|imag\| = 1"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))


def test_fid_shape_errors():
    with pytest.raises(ValueError, match="mu must be a 1-D"):
        frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma must be the"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="dimensions 3 and 2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --- Inception Score --------------------------------------------------------------------------


def test_is_of_confident_evenly_spread_predictions_is_num_classes():
    k = 5
    logits = 1000.0 * np.eye(k)[np.arange(50) % k]  # each split of 5 rows holds every class once
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std < 1e-12


def test_is_of_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(7).normal(size=(1, 10)), (40, 1))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std < 1e-12


def test_is_hand_computed_with_consecutive_splits():
    probs = np.array([[0.8, 0.2], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]])
    # Split 1: p(y) = (0.5, 0.5) and both rows have KL = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5).
    # Split 2: both rows equal the marginal, IS = 1. Population std of two values: |a - b| / 2.
    is_first = math.exp(0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5))
    mean, std = inception_score(np.log(probs), splits=2)
    assert mean == pytest.approx((is_first + 1.0) / 2, rel=1e-12)
    assert std == pytest.approx((is_first - 1.0) / 2, rel=1e-10)


def test_is_errors():
    with pytest.raises(ValueError, match="Got 3 rows of logits for 10 splits"):
        inception_score(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        inception_score(np.zeros(30))


# --- KID --------------------------------------------------------------------------------------


def _brute_force_mmd2(x, y, degree, gamma, coef0):
    def k(u, v):
        return (gamma * float(np.dot(u, v)) + coef0) ** degree

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / m**2


@pytest.mark.parametrize(
    "degree, gamma, coef0, expected_gamma", [(3, None, 1.0, 1 / 3), (2, 0.5, 0.3, 0.5)]
)
def test_kid_one_full_subset_matches_brute_force(degree, gamma, coef0, expected_gamma):
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(7, 3)), rng.normal(0.3, 1.2, size=(7, 3))
    mean, std = kernel_inception_distance(
        a, b, num_subsets=1, subset_size=7, degree=degree, gamma=gamma, coef0=coef0
    )  # a subset of all rows is a permutation, which MMD² does not see
    assert mean == pytest.approx(_brute_force_mmd2(a, b, degree, expected_gamma, coef0), rel=1e-12)
    assert std == 0.0


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(9)
    a, b, shifted = rng.normal(size=(3, 400, 8)) + np.array([0.0, 0.0, 0.5])[:, None, None]
    same, same_std = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    apart, apart_std = kernel_inception_distance(a, shifted, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std
    assert apart > 5 * apart_std and apart > 20 * abs(same)


def test_kid_errors():
    a, b = np.zeros((50, 4)), np.zeros((80, 4))
    with pytest.raises(ValueError, match="features_a: 50, features_b: 80.*at most 50"):
        kernel_inception_distance(a, b, subset_size=100)
    with pytest.raises(ValueError, match="dimension 4 and features_b 3"):
        kernel_inception_distance(a, np.zeros((80, 3)), subset_size=10)


# --- parity with torch-fidelity 0.4.0 ---------------------------------------------------------

# What torch-fidelity's metric_fid / metric_isc / metric_kid import from torch_fidelity.utils
# (which imports torchvision); the feature statistics -> metric functions never call them.
_UTILS_NAMES = [
    "cache_lookup_one_recompute_on_miss",
    "create_feature_extractor",
    "extract_featuresdict_from_input_id_cached",
    "get_cacheable_input_name",
    "resolve_feature_extractor",
    "resolve_feature_layer_for_metric",
]


def _not_stubbed(*args, **kwargs):
    raise AssertionError("torch_fidelity.utils is stubbed out in this test")


@pytest.fixture(scope="module")
def torch_fidelity():
    """torch-fidelity's metric modules, imported without the package __init__ and with a stub for
    torch_fidelity.utils; sys.modules is restored afterwards."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed")

    def ours(name):
        return name == "torch_fidelity" or name.startswith("torch_fidelity.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("torch_fidelity.utils")
    for name in _UTILS_NAMES:
        setattr(utils, name, _not_stubbed)
    for name in saved:
        del sys.modules[name]
    sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
    try:
        yield types.SimpleNamespace(
            torch=torch,
            fid=importlib.import_module("torch_fidelity.metric_fid"),
            isc=importlib.import_module("torch_fidelity.metric_isc"),
            kid=importlib.import_module("torch_fidelity.metric_kid"),
        )
    finally:
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _feature_pair(seed: int, n: int = 300, d: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.normal(size=(n, d)), 0)  # ReLU-like, as pool3 features
    b = np.maximum(rng.normal(0.2, 1.1, size=(n, d)) @ np.eye(d, k=1) + rng.normal(size=d), 0)
    return a, b


@pytest.mark.parity
def test_fid_parity_with_torch_fidelity(torch_fidelity):
    a, b = _feature_pair(10)
    stats = [{"mu": x.mean(axis=0), "sigma": np.cov(x, rowvar=False)} for x in (a, b)]
    theirs = torch_fidelity.fid.fid_statistics_to_metric(*stats, verbose=False)
    ours = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)


@pytest.mark.parity
def test_is_parity_with_torch_fidelity(torch_fidelity):
    logits = 3.0 * np.random.default_rng(11).normal(size=(303, 10))  # uneven splits: 30 or 31
    theirs = torch_fidelity.isc.isc_features_to_metric(
        torch_fidelity.torch.from_numpy(logits), splits=10, shuffle=False
    )
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-6)


@pytest.mark.parity
def test_kid_parity_with_torch_fidelity(torch_fidelity):
    a, b = _feature_pair(12)
    b = b[:250]  # unequal set sizes: the draws from a and b must interleave as theirs
    theirs = torch_fidelity.kid.kid_features_to_metric(
        torch_fidelity.torch.from_numpy(a),
        torch_fidelity.torch.from_numpy(b),
        kid_subsets=20,
        kid_subset_size=100,
        rng_seed=123,
        verbose=False,
    )
    mean, std = kernel_inception_distance(a, b, num_subsets=20, subset_size=100, seed=123)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
