"""Sample quality for the digits demo, offline: a small classifier's view of the samples.

FID needs the Inception weights (a download) and says little about 16x16 grayscale digits, so
the digits are judged by a one-hidden-layer MLP trained here on the train split:

  * confident share: the fraction of images the classifier labels with probability >= 0.9
    (real test images give the reference);
  * class histogram: how many images have each of the 10 digits as their most likely digit
    (a collapsed model leaves classes empty), and the share most likely 'not a digit';
  * Frechet distance (fid.frechet_distance) between the images and the test split in the
    classifier's 64 hidden features, beside the same distance for as many real train images
    (at most 1,500) and for uniform-noise images, so a reader sees the scale.

Every image, real or generated, reaches the classifier the same way: brought to the native
8x8 (k x k box means for a size 8k, a PIL box resize otherwise), then scaled to [0, 1].

The classifier is scikit-learn's MLPClassifier (64 ReLU units, L-BFGS, fixed seed) over 11
classes: the train split's digits at the native size and once more through the data's image
size (for 16x16, bilinear up then 2x2 box down blurs each digit a little; training on both
keeps round-tripped real digits confidently classified), plus a class 'not a digit' of uniform
noise and pixel-shuffled digits. Without that class a ReLU network calls noise a digit with
confidence (62% of noise images at >= 0.9 in a trial); with it, noise is rejected and the
digits lose no accuracy. A kernel machine scores a few points higher on this split (an RBF
SVC: 95.3%), but the MLP gives the distance a small, fixed feature space and runs as two
matrix products in NumPy. Its weights are cached in an .npz named by a hash of the training
settings (and the sklearn version), so no pickle is needed and a changed setting retrains.

Measured (docs/digits.md has the tables; training the classifier takes ~15 s on a small CPU):
  * at 8x8 (the demo's size): test accuracy 91.9%, confident share of real test images 0.960;
    distance of N real train images to the test split 7.6 (N = 250), 6.2 (500), 6.0 (1,000),
    spread over 40 draws 21%, 16%, 7.8% (drawn with replacement: 19%, 19%, 14%); noise ~1,092;
  * at 16x16: test accuracy 92.3% (the last 297 of sklearn's order are harder than the first
    1,500: an RBF SVC and 3-NN also stay at ~95% on them), confident share of real test images
    0.936; real train distance 3.96 +- 0.84 (N = 250), 3.25 +- 0.51 (500), 3.12 +- 0.26
    (1,000); noise ~763; uniform noise images are all 'not a digit' at both sizes.
  So use >= 1,000 samples (eval.num_samples): the spread is then near 10% of the real-vs-test
  distance. Subsets of the 1,500 train images drawn without replacement overlap at large N and
  understate the spread; drawn with replacement they overstate it. Differences between models
  below ~1 are noise; a model far from the data shows distances in the tens or hundreds. The
  test split's own 297 images are a fixed part of the reference and not in this spread.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings

import numpy as np
import scipy.linalg
from etils import epath
from PIL import Image

from diffusion_jax.data import input_pipeline
from diffusion_jax.evaluation.metrics import fid
from diffusion_jax.utils import outputs

NATIVE_SIZE = 8
NUM_CLASSES = 10
# The classifier's extra output for images that are no digit (its training shows it noise).
NOT_A_DIGIT = NUM_CLASSES
# The train split's size: the most real train images a reference distance can use.
MAX_REAL = 1500
CONFIDENCE = 0.9


@dataclasses.dataclass(frozen=True)
class ClassifierSettings:
  """What the classifier is trained with; any change names (and trains) a new one."""
  image_size: int = 16   # the data size whose round trip is trained on beside the native 8x8
  hidden: int = 64
  alpha: float = 0.01    # L2 penalty: smaller makes it more confident, not more accurate
  max_iter: int = 1000   # L-BFGS iterations (converges in ~100)
  seed: int = 0
  distractors: int = 1000  # 'not a digit' examples: half uniform noise, half shuffled digits

  def key(self) -> str:
    """A short hash of the settings (and the sklearn version, which may change the fit)."""
    import sklearn  # pylint: disable=g-import-not-at-top
    text = json.dumps({**dataclasses.asdict(self), "sklearn": sklearn.__version__},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Classifier:
  """The MLP's weights, evaluated in float64 NumPy."""
  w_in_PxH: np.ndarray
  b_in_H: np.ndarray
  w_out_HxK: np.ndarray
  b_out_K: np.ndarray

  def hidden(self, x_NxP: np.ndarray) -> np.ndarray:
    """The ReLU hidden features [N, H] of inputs [N, 64] in [0, 1]."""
    return np.maximum(np.asarray(x_NxP, np.float64) @ self.w_in_PxH + self.b_in_H, 0.0)

  def probabilities(self, x_NxP: np.ndarray) -> np.ndarray:
    """Class probabilities [N, 11] (softmax of the output layer; the last: not a digit)."""
    logits = self.hidden(x_NxP) @ self.w_out_HxK + self.b_out_K
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def to_native(images) -> np.ndarray:
  """Images of any size as the classifier's inputs.

  Args:
    images: uint8 [N, S, S, 1] or [N, S, S], values 0..255.

  Returns:
    float64 [N, 64]: the 8x8 versions scaled to [0, 1], rows in raster order.
  """
  images = np.asarray(images)
  if images.ndim == 4:
    if images.shape[-1] != 1:
      raise ValueError(f"digits are grayscale: expected 1 channel, got shape {images.shape}")
    images = images[..., 0]
  if images.ndim != 3 or images.shape[1] != images.shape[2]:
    raise ValueError(f"expected square images [N, S, S(, 1)], got shape {images.shape}")
  n, size = images.shape[0], images.shape[1]
  x = images.astype(np.float64)
  if size % NATIVE_SIZE == 0:
    k = size // NATIVE_SIZE
    x = x.reshape(n, NATIVE_SIZE, k, NATIVE_SIZE, k).mean(axis=(2, 4))
  else:
    x = np.stack([np.asarray(Image.fromarray(im.astype(np.float32), mode="F").resize(
        (NATIVE_SIZE, NATIVE_SIZE), Image.Resampling.BOX)) for im in x]).astype(np.float64)
  return x.reshape(n, NATIVE_SIZE * NATIVE_SIZE) / 255.0


def training_data(settings: ClassifierSettings) -> tuple[np.ndarray, np.ndarray]:
  """The classifier's training inputs [M, 64] and labels [M] in 0..10.

  The train split at the native size and (for another image size) once more through that
  size, labelled 0..9; and `distractors` images labelled NOT_A_DIGIT: uniform noise brought
  from the image size, and train digits with their pixels shuffled (a digit's ink, no shape).
  """
  images, labels = input_pipeline.digits_split("train", NATIVE_SIZE)
  native = to_native(images)
  xs, ys = [native], [labels]
  if settings.image_size != NATIVE_SIZE:
    xs.append(to_native(input_pipeline.digits_split("train", settings.image_size)[0]))
    ys.append(labels)
  rng = np.random.default_rng([settings.seed, 2])
  num_noise = settings.distractors // 2
  num_shuffled = settings.distractors - num_noise
  # Drawn here, not by noise_images, so the noise references of `quality` are unseen images.
  size = settings.image_size
  xs.append(to_native(rng.integers(0, 256, (num_noise, size, size, 1), dtype=np.uint8)))
  picked = native[rng.choice(len(native), num_shuffled, replace=False)]
  xs.append(rng.permuted(picked, axis=1))
  ys.append(np.full(settings.distractors, NOT_A_DIGIT, np.int64))
  return np.concatenate(xs), np.concatenate(ys)


def fit_sklearn(settings: ClassifierSettings):
  """Trains the scikit-learn MLPClassifier (deterministic for fixed settings)."""
  from sklearn import exceptions  # pylint: disable=g-import-not-at-top
  from sklearn import neural_network  # pylint: disable=g-import-not-at-top
  x, y = training_data(settings)
  mlp = neural_network.MLPClassifier(
      hidden_layer_sizes=(settings.hidden,), activation="relu", solver="lbfgs",
      alpha=settings.alpha, max_iter=settings.max_iter, random_state=settings.seed)
  with warnings.catch_warnings():
    # A deliberately short run (tests) stops before convergence; that is not an error here.
    warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
    return mlp.fit(x, y)


def from_sklearn(mlp) -> Classifier:
  """The weights of a fitted one-hidden-layer MLPClassifier."""
  if len(mlp.coefs_) != 2 or mlp.out_activation_ != "softmax" or mlp.activation != "relu":
    raise ValueError("expected a one-hidden-layer ReLU MLPClassifier")
  if list(mlp.classes_) != list(range(NUM_CLASSES + 1)):
    raise ValueError(f"expected classes 0..{NOT_A_DIGIT}, got {list(mlp.classes_)}")
  (w_in, w_out), (b_in, b_out) = mlp.coefs_, mlp.intercepts_
  return Classifier(*(np.asarray(a, np.float64) for a in (w_in, b_in, w_out, b_out)))


def classifier_path(cache_dir, settings: ClassifierSettings) -> epath.Path:
  return epath.Path(cache_dir) / f"digits_classifier_{settings.key()}.npz"


def load_classifier(cache_dir, settings: ClassifierSettings = ClassifierSettings()
                    ) -> Classifier:
  """The classifier for these settings: read from cache_dir, else trained and written there.

  Args:
    cache_dir: a directory, local or gs:// (made if missing); e.g. WORKDIR/eval.
    settings: the training settings (their hash names the file).

  Returns:
    the Classifier.
  """
  path = classifier_path(cache_dir, settings)
  if path.exists():
    with path.open("rb") as f, np.load(f) as data:
      return Classifier(*(data[field.name] for field in dataclasses.fields(Classifier)))
  classifier = from_sklearn(fit_sklearn(settings))
  # Written atomically: processes training it at once (each gets the same weights) never read
  # or clobber half a file.
  outputs.write_npz(path, settings=json.dumps(dataclasses.asdict(settings)),
                    **dataclasses.asdict(classifier))
  return classifier


def _distance_to_test(classifier: Classifier, image_size: int):
  """f(images) -> the Frechet distance of their hidden features to the test split's (brought
  through `image_size` like the images)."""
  test_images, _ = input_pipeline.digits_split("test", image_size)
  reference_stats = fid.compute_statistics(classifier.hidden(to_native(test_images)))

  def distance(images) -> float:
    mu, sigma = fid.compute_statistics(classifier.hidden(to_native(images)))
    with warnings.catch_warnings():
      # ReLU units silent on a whole set make its covariance singular and scipy warns; the
      # root is still accurate here (the test split against itself gives 0 to 1e-6).
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      return fid.frechet_distance(mu, sigma, *reference_stats)
  return distance


def noise_images(num: int, image_size: int, seed: int) -> np.ndarray:
  """uint8 [num, size, size, 1], each pixel uniform in 0..255."""
  rng = np.random.default_rng([seed, 1])
  return rng.integers(0, 256, size=(num, image_size, image_size, 1), dtype=np.uint8)


def quality(images, classifier: Classifier, *, confidence: float = CONFIDENCE,
            seed: int = 0, labels=None) -> dict:
  """The digits sample-quality measures of a set of images, with real and noise references.

  Args:
    images: uint8 [N, S, S, 1] (N >= 2), e.g. samples of a model trained at size S.
    classifier: from `load_classifier`.
    confidence: the probability a label needs to count as confident.
    seed: picks the real train images and draws the noise images of the references.
    labels: optional int [N], the class each image was asked to be (a class-conditional
      model's samples).

  Returns:
    a dict: `confident` (share of the images given a digit with probability >= confidence),
    `confident_test_real` (the same for the real test images), `not_a_digit` (share whose
    most likely class is 'not a digit'), `class_counts` (int [10], images per most likely
    digit, summing to N), `frechet_test` (distance of the images to the
    test split), `frechet_train_real` (of min(N, 1500) random real train images),
    `frechet_noise` (of N noise images), `num_images`, `num_train_real`; with `labels`,
    `label_accuracy` (share of the images whose most likely digit is their label).
  """
  images = np.asarray(images)
  n, size = images.shape[0], images.shape[1]
  test_images, _ = input_pipeline.digits_split("test", size)
  train_images, _ = input_pipeline.digits_split("train", size)
  distance = _distance_to_test(classifier, size)
  probs = classifier.probabilities(to_native(images))
  test_probs = classifier.probabilities(to_native(test_images))
  digit_probs = probs[:, :NUM_CLASSES]
  num_train = min(n, MAX_REAL)
  rng = np.random.default_rng([seed, 0])
  train_subset = train_images[np.sort(rng.permutation(len(train_images))[:num_train])]
  extra = {}
  if labels is not None:
    extra["label_accuracy"] = float(np.mean(digit_probs.argmax(axis=1) == np.asarray(labels)))
  return dict(
      **extra,
      confident=float(np.mean(digit_probs.max(axis=1) >= confidence)),
      confident_test_real=float(np.mean(test_probs[:, :NUM_CLASSES].max(axis=1) >= confidence)),
      not_a_digit=float(np.mean(probs.argmax(axis=1) == NOT_A_DIGIT)),
      class_counts=np.bincount(digit_probs.argmax(axis=1), minlength=NUM_CLASSES),
      frechet_test=distance(images),
      frechet_train_real=distance(train_subset),
      frechet_noise=distance(noise_images(n, size, seed)),
      num_images=int(n),
      num_train_real=int(num_train))


def distance_spread(classifier: Classifier, counts, *, image_size: int = 16,
                    repeats: int = 20, replace: bool = False, seed: int = 0
                    ) -> dict[int, dict[str, float]]:
  """How much the distance of N real train images to the test split varies with the draw.

  Args:
    classifier: from `load_classifier`.
    counts: the N to try (each at most 1,500).
    image_size: the size real images pass through.
    repeats: random train subsets (and noise sets) per N.
    replace: draw the subsets with replacement (a bootstrap). Without, large subsets of the
      1,500 overlap and understate the spread; with, repeats shrink the effective count and
      overstate it: the two bracket the spread of N independent images.
    seed: the draws.

  Returns:
    {N: {'mean', 'std', 'relative_std'} of the real train distance over the subsets, and
    'noise_mean' of the noise distance}.
  """
  train_images, _ = input_pipeline.digits_split("train", image_size)
  distance = _distance_to_test(classifier, image_size)
  out = {}
  for num in counts:
    rng = np.random.default_rng([seed, num])
    real = [distance(train_images[rng.choice(len(train_images), num, replace=replace)])
            for _ in range(repeats)]
    noise = [distance(noise_images(num, image_size, seed * 1000 + r)) for r in range(repeats)]
    out[int(num)] = dict(mean=float(np.mean(real)), std=float(np.std(real)),
                         relative_std=float(np.std(real) / np.mean(real)),
                         noise_mean=float(np.mean(noise)))
  return out
