"""Sample-quality metrics: the FID Inception network (inception.py), FID / IS (fid.py) and the
offline measures of the digits demo (digits.py, imported on its own)."""
from diffusion_jax.evaluation.metrics.fid import (
    compute_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)
from diffusion_jax.evaluation.metrics.inception import (
    FID_WEIGHTS_URL,
    InceptionV3,
    inception_apply,
    load_inception_params,
    make_feature_fn,
    preprocess_images,
)

__all__ = [
    "FID_WEIGHTS_URL",
    "InceptionV3",
    "compute_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_apply",
    "inception_score",
    "load_inception_params",
    "load_statistics",
    "make_feature_fn",
    "preprocess_images",
    "save_statistics",
]
