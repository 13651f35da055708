"""Frechet Inception Distance and Inception Score from Inception features, in float64 NumPy.

The formulas follow the reference tools the DDPM paper reports with:
  * FID (Heusel et al. 2017, TTUR code; pytorch-fid computes it the same way):
      ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),
    with statistics of the 2048-d pool_3 features, covariances with the 1/(N - 1) normalisation,
    and reference statistics stored as .npz files with arrays `mu` and `sigma`.
  * Inception Score (Salimans et al. 2016, improved-GAN code): the samples are cut into
    `num_splits` consecutive parts, each scores exp(mean_x KL(p(y|x) || p(y))) with p(y) the
    mean prediction of that part, and the result is the mean and std over parts.

These run on the host once per evaluation; only the Inception features come from JAX.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.special
from etils import epath

from diffusion_jax.utils import outputs

__all__ = [
    "compute_statistics",
    "save_statistics",
    "load_statistics",
    "cached_statistics",
    "statistics_file_name",
    "frechet_distance",
    "fid_from_features",
    "inception_score",
]


def compute_statistics(features_NxD) -> tuple[np.ndarray, np.ndarray]:
  """Mean and covariance of features, as TTUR / pytorch-fid compute them.

  Args:
    features_NxD: N >= 2 feature vectors (e.g. pool_3, D = 2048).

  Returns:
    (mu_D, sigma_DxD) float64; sigma uses the unbiased 1/(N - 1) normalisation.
  """
  features_NxD = np.asarray(features_NxD, np.float64)
  if features_NxD.ndim != 2:
    raise ValueError(f"expected features [N, D], got shape {features_NxD.shape}")
  if features_NxD.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors, got {features_NxD.shape[0]}")
  mu_D = features_NxD.mean(axis=0)
  sigma_DxD = np.cov(features_NxD, rowvar=False)
  return mu_D, sigma_DxD


def _check_statistics(mu, sigma, dim, what) -> None:
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{what}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
  if dim is not None and mu.shape[0] != dim:
    raise ValueError(f"{what} have dimension {mu.shape[0]}, expected {dim} "
                     "(statistics of a different Inception layer?)")


def save_statistics(path: str | os.PathLike, mu_D, sigma_DxD) -> None:
  """Writes statistics as a TTUR-format .npz (arrays `mu` and `sigma`, float64), atomically.

  Args:
    path: output file.
    mu_D: feature mean.
    sigma_DxD: feature covariance.
  """
  mu_D, sigma_DxD = np.asarray(mu_D, np.float64), np.asarray(sigma_DxD, np.float64)
  _check_statistics(mu_D, sigma_DxD, None, "statistics")
  outputs.write_npz(path, mu=mu_D, sigma=sigma_DxD)


def load_statistics(path: str | os.PathLike, dim: int | None = 2048
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Reads TTUR-format statistics (e.g. `fid_stats_cifar10_train.npz`).

  Args:
    path: .npz with arrays `mu` [D] and `sigma` [D, D], local or gs://.
    dim: expected D (None to accept any).

  Returns:
    (mu_D, sigma_DxD) float64.

  Raises:
    ValueError: if the arrays are missing or D differs from `dim`.
  """
  with epath.Path(path).open("rb") as f, np.load(f) as data:
    missing = {"mu", "sigma"} - set(data.files)
    if missing:
      raise ValueError(f"{os.fspath(path)} lacks {sorted(missing)}; found {data.files}")
    mu_D = np.asarray(data["mu"], np.float64)
    sigma_DxD = np.asarray(data["sigma"], np.float64)
  _check_statistics(mu_D, sigma_DxD, dim, f"statistics in {os.fspath(path)}")
  return mu_D, sigma_DxD


def statistics_file_name(dataset: str, split: str, image_size: int, inception_size: int,
                         max_examples: int = 0) -> str:
  """The cache file name of a split's reference statistics: every setting that changes them
  (the dataset, split, image size, Inception input size, and a cap on the examples)."""
  capped = f"_first{max_examples}" if max_examples > 0 else ""
  return (f"{dataset.replace('/', '_')}_{split}_{image_size}px_inception{inception_size}"
          f"{capped}.npz")


def cached_statistics(path: str | os.PathLike, compute_features: Callable[[], np.ndarray], *,
                      write: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Reference statistics from a cache file, computed and cached when it is missing.

  Args:
    path: the cache .npz (TTUR format).
    compute_features: returns the features [N, D] of the reference images when called.
    write: save computed statistics to `path` (false on all processes but one).

  Returns:
    (mu_D, sigma_DxD) float64.
  """
  if epath.Path(path).exists():
    return load_statistics(path)
  mu_D, sigma_DxD = compute_statistics(compute_features())
  if write:
    save_statistics(path, mu_D, sigma_DxD)
  return mu_D, sigma_DxD


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as TTUR / pytorch-fid.

  The square root of sigma1 @ sigma2 (not symmetric, but similar to a PSD matrix) comes from
  `scipy.linalg.sqrtm`. If the product is singular enough for that to fail (non-finite
  entries, e.g. fewer samples than dimensions), eps is added to both diagonals and the root
  retried. Round-off can leave a small imaginary part, which is dropped; a large one means
  the inputs are not covariances and raises.

  Args:
    mu1, sigma1: mean [D] and covariance [D, D] of one set (e.g. samples).
    mu2, sigma2: the same for the other set (e.g. reference statistics).
    eps: diagonal offset for the singular fallback.

  Returns:
    the distance, a Python float.

  Raises:
    ValueError: on mismatched dimensions or a large imaginary component.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  _check_statistics(mu1, sigma1, None, "first statistics")
  _check_statistics(mu2, sigma2, None, "second statistics")
  if mu1.shape[0] != mu2.shape[0]:
    raise ValueError(f"statistics have different dimensions: {mu1.shape[0]} and "
                     f"{mu2.shape[0]}")

  diff_D = mu1 - mu2
  covmean_DxD = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean_DxD).all():
    warnings.warn(f"FID: sigma1 @ sigma2 is singular; adding {eps} to the diagonals",
                  RuntimeWarning, stacklevel=2)
    offset_DxD = eps * np.eye(mu1.shape[0])
    covmean_DxD = scipy.linalg.sqrtm((sigma1 + offset_DxD) @ (sigma2 + offset_DxD))
  if np.iscomplexobj(covmean_DxD):
    if not np.allclose(np.diagonal(covmean_DxD).imag, 0.0, atol=1e-3):
      raise ValueError("FID: matrix square root has a large imaginary component "
                       f"({np.abs(covmean_DxD.imag).max():.3g})")
    covmean_DxD = covmean_DxD.real
  return float(diff_D @ diff_D + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * np.trace(covmean_DxD))


def fid_from_features(features_NxD, mu_ref_D, sigma_ref_DxD) -> float:
  """FID of a feature set against reference statistics (e.g. `load_statistics`)."""
  mu_D, sigma_DxD = compute_statistics(features_NxD)
  return frechet_distance(mu_D, sigma_DxD, mu_ref_D, sigma_ref_DxD)


def inception_score(logits_NxK, num_splits: int = 10) -> tuple[float, float]:
  """Inception Score of classifier logits, split as in the improved-GAN code.

  Computed in float64 from log-probabilities, so confident predictions whose probabilities
  underflow to 0 add exactly 0 instead of 0 * log 0.

  Args:
    logits_NxK: logits of N samples (N >= num_splits); for the paper's numbers, the FID
      Inception logits without the fc bias (`InceptionV3(fc_bias=False)`, the default).
    num_splits: number of consecutive parts (sample i goes to part i * splits // N).

  Returns:
    (mean, std) over the parts (population std, as np.std), Python floats.
  """
  logits_NxK = np.asarray(logits_NxK, np.float64)
  if logits_NxK.ndim != 2:
    raise ValueError(f"expected logits [N, K], got shape {logits_NxK.shape}")
  num = logits_NxK.shape[0]
  if not 1 <= num_splits <= num:
    raise ValueError(f"num_splits must be in [1, N={num}], got {num_splits}")
  log_p_NxK = scipy.special.log_softmax(logits_NxK, axis=1)
  scores = []
  for i in range(num_splits):
    part_log_p = log_p_NxK[i * num // num_splits:(i + 1) * num // num_splits]
    log_marginal_K = (scipy.special.logsumexp(part_log_p, axis=0)
                      - np.log(part_log_p.shape[0]))
    kl_n = np.sum(np.exp(part_log_p) * (part_log_p - log_marginal_K[None, :]), axis=1)
    scores.append(np.exp(np.mean(kl_n)))
  return float(np.mean(scores)), float(np.std(scores))
