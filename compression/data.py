"""scikit-learn's digits as the project's accuracy benchmark: 8x8 images upsampled to 32x32.

Fixed split (stratified, ``random_state=0``, 25 % held out: 1347 train / 450 test), so every
accuracy in edgesplit is measured on the same held-out images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import CodecError

DIGITS_CLASSES = 10


@dataclass(frozen=True)
class Dataset:
    """Train and held-out tensors: images (N, 1, S, S) float32, labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_digits_split(image_px: int = 32, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """Digits, upsampled (bilinear) to ``image_px`` and standardised with training statistics.

    Args:
        image_px: side of the upsampled image.
        test_fraction: share held out for testing.
        split_seed: ``random_state`` of the stratified split (keep 0 to compare with other results).
    Returns:
        The dataset.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise CodecError("the digits benchmark needs scikit-learn: pip install 'edgesplit[test]'") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(image_px, image_px), mode="bilinear", align_corners=False)  # (N, 1, S, S)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=split_seed, stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Dataset(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], DIGITS_CLASSES)
