"""Tests for diffusion_jax.evaluation.metrics: FID, Inception Score and the FID Inception network.

FID and IS are checked against closed forms and independent float64 NumPy computations.
The Flax Inception is checked against pytorch-fid's own model with weights drawn from a NumPy
seed (torch is not needed here). Golden values: tests/golden/inception_fid_seeded.npz; after an
intended change to the reference, regenerate with torch in a separate environment,

    /tmp/torchenv/bin/python tests/golden/make_inception_golden.py

(see that file for the setup) and explain the change in the commit message. The full network
is compiled once per test run, by the module-scoped `network_outputs` fixture.
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation.metrics import fid as fid_lib
from diffusion_jax.evaluation.metrics import inception as inception_lib
from diffusion_jax.tools import convert_inception

_GOLDEN_DIR = pathlib.Path(__file__).resolve().parents[1] / "golden"
_spec = importlib.util.spec_from_file_location("make_inception_golden",
                                               _GOLDEN_DIR / "make_inception_golden.py")
golden_lib = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_lib)

# pytorch-fid's own float32 output differs from its float64 output by ~5e-7 of the largest
# value (stored in the golden file); a different conv algorithm and summation order over ~95
# layers adds the same order again. 1e-4 of the largest value leaves two orders of margin while
# any wrong layer, padding, pool or eps shows up at 1e-3 or far above.
NETWORK_RTOL = 1e-4
# The resize is two interpolation matrices applied in another order than torch's loop: a few
# float32 ulps (1.2e-7 each) of values in [0, 1]; 1.2e-7 measured on CPU. A source coordinate
# rounded twice in float32 (instead of once, which is what the stored torch outputs agree with)
# shows up as 6e-7.
RESIZE_ATOL = 4e-7


def _assert_close_to_scale(actual, expected, rtol):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape
  scale = np.abs(expected).max()
  err = np.abs(actual - expected).max() / scale
  assert err < rtol, f"max abs error {err:.3g} of the largest value (tolerance {rtol})"
  return err


# ------------------------------------------------------------------------ FID: reference math

def _spd(rng, dim, cond=10.0):
  q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  return (q * np.geomspace(1.0, 1.0 / cond, dim)) @ q.T


def _psd_sqrt(mat):
  w, v = np.linalg.eigh((mat + mat.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _fid_by_eigh(mu1, sigma1, mu2, sigma2):
  """Independent FID: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), symmetric eigh only."""
  root1 = _psd_sqrt(sigma1)
  middle_eigs = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  tr_covmean = np.sqrt(np.clip(middle_eigs, 0.0, None)).sum()
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  var1, var2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  got = fid_lib.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_commuting_covariances():
  rng = np.random.default_rng(1)
  dim = 24
  q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  eig1, eig2 = rng.uniform(0.01, 5.0, dim), rng.uniform(0.01, 5.0, dim)
  sigma1, sigma2 = (q * eig1) @ q.T, (q * eig2) @ q.T
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2)
  got = fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_random_spd_against_eigh():
  rng = np.random.default_rng(2)
  dim = 64
  sigma1, sigma2 = _spd(rng, dim, cond=1e3), 2.0 * _spd(rng, dim, cond=1e2)
  mu1, mu2 = rng.standard_normal(dim), 0.1 * rng.standard_normal(dim)
  got = fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(_fid_by_eigh(mu1, sigma1, mu2, sigma2), rel=1e-9)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(3)
  sigma = _spd(rng, 32)
  mu = rng.standard_normal(32)
  assert abs(fid_lib.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)


def test_frechet_distance_near_singular_from_few_samples():
  # Fewer samples than dimensions: both covariances are singular (rank 11 and 15 of 32).
  rng = np.random.default_rng(4)
  feats1 = rng.standard_normal((12, 32))
  feats2 = 1.5 * rng.standard_normal((16, 32)) + 0.3
  mu1, sigma1 = fid_lib.compute_statistics(feats1)
  mu2, sigma2 = fid_lib.compute_statistics(feats2)
  assert np.linalg.matrix_rank(sigma1) == 11
  got = fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(_fid_by_eigh(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_frechet_distance_singular_fallback_adds_eps(monkeypatch):
  # Older SciPy returns non-finite roots for singular products; force that path.
  rng = np.random.default_rng(5)
  sigma1, sigma2 = _spd(rng, 8), _spd(rng, 8)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  real_sqrtm = fid_lib.scipy.linalg.sqrtm
  calls = []

  def flaky_sqrtm(mat):
    calls.append(mat)
    return np.full_like(mat, np.nan) if len(calls) == 1 else real_sqrtm(mat)

  monkeypatch.setattr(fid_lib.scipy.linalg, "sqrtm", flaky_sqrtm)
  eps = 1e-3
  with pytest.warns(RuntimeWarning, match="singular"):
    got = fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
  offset = eps * np.eye(8)
  np.testing.assert_allclose(calls[1], (sigma1 + offset) @ (sigma2 + offset), rtol=1e-14)
  tr_covmean = np.sqrt(np.linalg.eigvals((sigma1 + offset) @ (sigma2 + offset)).real).sum()
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2) - 2 * tr_covmean
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_imaginary_component(monkeypatch):
  rng = np.random.default_rng(6)
  sigma = _spd(rng, 4)
  mu = np.zeros(4)
  real_sqrtm = fid_lib.scipy.linalg.sqrtm
  # A round-off sized imaginary part is dropped ...
  monkeypatch.setattr(fid_lib.scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 1e-9j)
  assert fid_lib.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
  # ... a large one means the inputs were not covariances.
  monkeypatch.setattr(fid_lib.scipy.linalg, "sqrtm", lambda m: real_sqrtm(m) + 0.1j)
  with pytest.raises(ValueError, match="imaginary"):
    fid_lib.frechet_distance(mu, sigma, mu, sigma)


def test_frechet_distance_dimension_mismatch():
  with pytest.raises(ValueError, match="2048.*64"):
    fid_lib.frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), np.eye(64))
  with pytest.raises(ValueError):
    fid_lib.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------- statistics

def test_compute_statistics_against_numpy():
  rng = np.random.default_rng(7)
  feats = rng.standard_normal((50, 6)).astype(np.float32) * np.arange(1, 7) + 3.0
  mu, sigma = fid_lib.compute_statistics(feats)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  feats64 = feats.astype(np.float64)
  centered = feats64 - feats64.sum(axis=0) / 50
  np.testing.assert_allclose(mu, feats64.sum(axis=0) / 50, rtol=1e-14)
  np.testing.assert_allclose(sigma, centered.T @ centered / 49, rtol=1e-12)
  with pytest.raises(ValueError):
    fid_lib.compute_statistics(feats[:1])


def test_statistics_roundtrip_and_dimension_check(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = fid_lib.compute_statistics(rng.standard_normal((20, 64)))
  path = tmp_path / "stats.npz"
  fid_lib.save_statistics(path, mu, sigma)
  with np.load(path) as data:  # TTUR format: exactly `mu` and `sigma`
    assert sorted(data.files) == ["mu", "sigma"]
  mu2, sigma2 = fid_lib.load_statistics(path, dim=64)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  fid_lib.load_statistics(path, dim=None)
  with pytest.raises(ValueError, match="dimension 64, expected 2048"):
    fid_lib.load_statistics(path)  # default dim is pool_3's 2048
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="mu"):
    fid_lib.load_statistics(tmp_path / "bad.npz", dim=64)


def test_fid_from_features_matches_parts():
  rng = np.random.default_rng(9)
  feats, ref = rng.standard_normal((40, 8)), rng.standard_normal((60, 8)) + 0.5
  mu_ref, sigma_ref = fid_lib.compute_statistics(ref)
  mu, sigma = fid_lib.compute_statistics(feats)
  assert fid_lib.fid_from_features(feats, mu_ref, sigma_ref) == pytest.approx(
      _fid_by_eigh(mu, sigma, mu_ref, sigma_ref), rel=1e-9)


# --------------------------------------------------------------------------- Inception Score

def _inception_score_numpy(logits, splits):
  """The improved-GAN recipe, written out: softmax, then per part exp(mean KL(p || mean p))."""
  logits = np.asarray(logits, np.float64)
  shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
  preds = shifted / shifted.sum(axis=1, keepdims=True)
  n = preds.shape[0]
  scores = []
  for i in range(splits):
    part = preds[i * n // splits:(i + 1) * n // splits]
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part) - np.log(marginal)), axis=1)
    scores.append(np.exp(kl.mean()))
  return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("num,splits", [(200, 10), (203, 7), (50, 1)])
def test_inception_score_against_numpy(num, splits):
  rng = np.random.default_rng(num)
  logits = 3.0 * rng.standard_normal((num, 20)).astype(np.float32)
  mean, std = fid_lib.inception_score(logits, num_splits=splits)
  ref_mean, ref_std = _inception_score_numpy(logits, splits)
  assert mean == pytest.approx(ref_mean, rel=1e-12)
  assert std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
  assert 1.0 <= mean <= 20.0


def test_inception_score_limits():
  num_classes = 12
  uniform = np.full((120, num_classes), 0.7)
  mean, std = fid_lib.inception_score(uniform, num_splits=10)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  # Certain predictions, each part holding every class equally often: the score is K.
  labels = np.arange(240) % num_classes
  confident = 1000.0 * np.eye(num_classes)[labels]  # exp(-1000) underflows to 0 exactly
  mean, std = fid_lib.inception_score(confident, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-12) and std < 1e-10
  # All mass on one class: no diversity, score 1.
  assert fid_lib.inception_score(1000.0 * np.eye(num_classes)[np.zeros(40, int)],
                                 num_splits=4)[0] == pytest.approx(1.0)


def test_inception_score_errors():
  with pytest.raises(ValueError, match="num_splits"):
    fid_lib.inception_score(np.zeros((5, 3)), num_splits=10)
  with pytest.raises(ValueError):
    fid_lib.inception_score(np.zeros(5))


# --------------------------------------------------------------------- resize and weights I/O

@pytest.fixture(scope="module")
def golden():
  with np.load(_GOLDEN_DIR / "inception_fid_seeded.npz") as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("size", golden_lib.RESIZE_OUT_SIZES, ids=str)
def test_resize_matches_torch_bilinear(golden, size):
  height, width = size
  got = inception_lib.resize_bilinear(golden["resize_input"], height, width)
  assert got.shape == (2, height, width, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), golden[f"resize_{height}x{width}"],
                             rtol=0, atol=RESIZE_ATOL)


def test_resize_differs_from_antialiased_jax_resize(golden):
  # Why the resize is written out: jax.image.resize antialiases by default when shrinking,
  # which torch's F.interpolate does not.
  x = golden["resize_input"]
  antialiased = jax.image.resize(x, (2, 5, 40, 3), "bilinear")
  assert np.abs(np.asarray(antialiased) - golden["resize_5x40"]).max() > 0.1


def test_bilinear_resize_matrix_properties():
  for in_size, out_size in [(64, 299), (299, 64), (7, 7), (1, 5), (5, 1)]:
    weights = inception_lib.bilinear_resize_matrix(in_size, out_size)
    assert weights.shape == (out_size, in_size)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    assert (weights >= 0).all() and ((weights > 0).sum(axis=1) <= 2).all()
  np.testing.assert_array_equal(inception_lib.bilinear_resize_matrix(7, 7), np.eye(7))


def _np_bilinear_matrix_float64(in_size, out_size):
  """The real-valued formula in float64: src = in/out * (dst + 0.5) - 0.5, clamped at 0."""
  dst = np.arange(out_size)
  src = np.maximum(in_size / out_size * (dst + 0.5) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size))
  np.add.at(weights, (dst, lo), 1.0 - frac)
  np.add.at(weights, (dst, hi), frac)
  return weights


@pytest.mark.parametrize("in_size,out_size", [
    (32, 299), (28, 299), (64, 299), (299, 64), (13, 40), (17, 5), (3, 1000), (1, 5), (5, 1)])
def test_bilinear_resize_matrix_matches_float64_formula(in_size, out_size):
  got = inception_lib.bilinear_resize_matrix(in_size, out_size).astype(np.float64)
  want = _np_bilinear_matrix_float64(in_size, out_size)
  # The float32 scale is off by <= 2**-24 relative, i.e. the coordinate by <= in_size * 2**-24;
  # rounding the coordinate (< in_size) to float32 adds <= in_size * 2**-24, and 1 - lambda in
  # float32 another 2**-25. A weight moves by as much as the coordinate, also where the
  # rounding crosses an integer (the mass then shifts by that amount to the next pixel). A
  # wrong offset, scale or neighbour moves weights by whole fractions of a pixel.
  tol = (2 * in_size + 1) * 2.0 ** -24
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)


def test_preprocess_at_full_size_is_affine():
  images = np.random.default_rng(10).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  got = inception_lib.preprocess_images(images)
  np.testing.assert_allclose(np.asarray(got), images / 255.0 * 2.0 - 1.0, atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    inception_lib.preprocess_images(np.zeros((2, 8, 8, 1), np.uint8))


def test_missing_weight_file_says_where_to_get_it(tmp_path):
  missing = tmp_path / "inception_fid.npz"
  with pytest.raises(FileNotFoundError) as excinfo:
    inception_lib.load_inception_params(missing)
  message = str(excinfo.value)
  assert inception_lib.FID_WEIGHTS_URL in message
  assert "pt_inception-2015-12-05-6726825d.pth" in message
  assert "python -m diffusion_jax.tools.convert_inception" in message
  with pytest.raises(FileNotFoundError, match="releases/download/fid_weights"):
    convert_inception.load_torch_state_dict(tmp_path / "missing.pth")


def test_name_mapping_is_one_to_one():
  names = ["Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch3x3dbl_3b.bn.running_var",
           "Mixed_5b.branch_pool.bn.weight", "fc.bias", "fc.weight"]
  for name in names:
    assert inception_lib.flax_to_torch_name(inception_lib.torch_to_flax_name(name)) == name
  assert inception_lib.torch_to_flax_name("Mixed_5b.branch1x1.bn.running_mean") == (
      "batch_stats", "Mixed_5b", "branch1x1", "bn", "mean")
  assert inception_lib.torch_to_flax_name("Conv2d_1a_3x3.bn.num_batches_tracked") is None
  with pytest.raises(KeyError):
    inception_lib.torch_to_flax_name("AuxLogits.fc.weight.extra")


# ----------------------------------------------------------------------- network vs pytorch-fid

@pytest.fixture(scope="module")
def torch_shapes():
  return convert_inception.expected_torch_shapes()


@pytest.fixture(scope="module")
def seeded_variables(torch_shapes):
  state_dict = golden_lib.seeded_state_dict(torch_shapes)
  return state_dict, convert_inception.convert_state_dict(state_dict)


def test_flax_variables_match_pytorch_fid_state_dict(golden, torch_shapes, seeded_variables):
  # The golden keys are pytorch-fid's (checked there by a strict load_state_dict).
  assert sorted(torch_shapes) == list(golden["torch_keys"])
  assert len(torch_shapes) == 472
  n_params = sum(int(np.prod(s)) for k, s in torch_shapes.items()
                 if not k.endswith(("running_mean", "running_var")))
  assert n_params == 23_850_960  # 21,751,136 conv + 34,432 BN affine + 2,065,392 fc
  state_dict, _ = seeded_variables
  np.testing.assert_allclose(golden_lib.weights_checksum(state_dict),
                             golden["weights_checksum"], rtol=1e-12,
                             err_msg="NumPy drew different weights from the seed")


def test_convert_state_dict_rejects_other_networks(seeded_variables):
  state_dict, _ = seeded_variables
  broken = dict(state_dict)
  del broken["Mixed_6a.branch3x3.conv.weight"]
  broken["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  broken["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError, match="Mixed_6a.branch3x3.conv.weight") as excinfo:
    convert_inception.convert_state_dict(broken)
  assert "AuxLogits.fc.weight" in str(excinfo.value)
  assert "fc.weight: (1000, 2048)" in str(excinfo.value)


def test_weights_npz_roundtrip(tmp_path, seeded_variables):
  _, variables = seeded_variables
  path = tmp_path / "inception_fid.npz"
  inception_lib.save_inception_params(path, variables)
  loaded = inception_lib.load_inception_params(path)
  flat_a = jax.tree_util.tree_leaves_with_path(variables)
  flat_b = jax.tree_util.tree_leaves_with_path(loaded)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (_, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(a, b)
  # Torch layout -> Flax layout: conv OIHW -> HWIO, fc [out, in] -> [in, out].
  state_dict, _ = seeded_variables
  np.testing.assert_array_equal(
      loaded["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
      state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"],
                                state_dict["fc.weight"].T)


_FEATURE_BATCH = 3  # 4 golden images -> one full and one padded batch


@pytest.fixture(scope="module")
def golden_images_299(golden):
  """The golden images at 299x299, float in [0, 255], so one compiled shape serves all.

  The 64x64 ones are resized here (a cheap program of its own); resizing before or after
  the /255 scaling differs only by float32 rounding.
  """
  small = inception_lib.resize_bilinear(golden["images_small"].astype(np.float32), 299, 299)
  return np.concatenate([np.asarray(small), golden["image_big"].astype(np.float32)])


@pytest.fixture(scope="module")
def feature_fn(seeded_variables):
  _, variables = seeded_variables
  return inception_lib.make_feature_fn(variables, batch_size=_FEATURE_BATCH)


@pytest.fixture(scope="module")
def network_outputs(feature_fn, golden_images_299):
  return feature_fn(golden_images_299)


def test_inception_matches_pytorch_fid(golden, network_outputs):
  pool, logits = network_outputs
  assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
  assert pool.dtype == np.float32 and logits.dtype == np.float32
  # Sanity of the golden weights themselves: activations O(1), not vanishing or exploding.
  assert 0.1 < np.abs(golden["pool"]).mean() < 10.0
  assert (golden["torch_f32_vs_f64"] < 1e-5).all()
  err_pool = _assert_close_to_scale(pool, golden["pool"], NETWORK_RTOL)
  err_logits = _assert_close_to_scale(logits, golden["logits_unbiased"], NETWORK_RTOL)
  print(f"max error / max |value|: pool {err_pool:.2e}, logits {err_logits:.2e}")


def test_classifier_head_with_bias_matches_torch_fc(golden, seeded_variables, network_outputs):
  _, variables = seeded_variables
  pool, logits = network_outputs
  with_bias = inception_lib.logits_from_pool(variables, pool, fc_bias=True)
  _assert_close_to_scale(with_bias, golden["logits_fc"], NETWORK_RTOL)
  without = inception_lib.logits_from_pool(variables, pool)
  np.testing.assert_allclose(np.asarray(without), logits, rtol=1e-5, atol=1e-5)


def test_feature_fn_streams_batches(feature_fn, golden_images_299, network_outputs):
  # A stream of uneven chunks gives the same rows as one array (same compiled program).
  pool, logits = feature_fn(iter([golden_images_299[:1], golden_images_299[1:]]))
  np.testing.assert_allclose(pool, network_outputs[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, network_outputs[1], rtol=1e-5, atol=1e-6)
  empty_pool, empty_logits = feature_fn([])
  assert empty_pool.shape == (0, 2048) and empty_logits.shape == (0, 1008)
  with pytest.raises(ValueError):
    inception_lib.make_feature_fn({}, batch_size=0)
