"""scikit-learn's bundled digits (no download), upsampled, normalised and split."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """Images (N, H, W, 1) float32 and integer labels (N,) of the train and test sets."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(
    image_size: int = 16, test_fraction: float = 0.2, split_seed: int = 0
) -> Split:
    """The 1,797 8x8 digits, resized, normalised, with a fixed stratified split.

    Args:
      image_size: Side of the (bilinearly) resized images; 8 keeps them as they are.
      test_fraction: Share of the images held out for testing (stratified by class).
      split_seed: Seed of the split; fixed, so every run sees the same sets.

    Returns:
      A ``Split``; pixels are standardised with the training set's mean and std.

    Raises:
      ValueError: for an image size below 8 or a test fraction outside (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8), values in [0, 1]
    if image_size != 8:
        images = np.asarray(
            jax.image.resize(images, (len(images), image_size, image_size), "bilinear")
        )
    images = images[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
    )
    mean, std = x_train.mean(), x_train.std()
    return Split(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train,
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test,
    )
