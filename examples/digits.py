"""scikit-learn's handwritten digits (1,797 images of 8×8, 10 classes) as tensors, plus a mixed-resolution
variant for NaViT: each image resized once to its own height and width from ``sides``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train [N, 1, 8, 8] in [0, 1], y_train [N], x_test, y_test): a stratified split, fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def mixed_resolution(x: Tensor, sides=(8, 12, 16), seed: int = 0) -> list[Tensor]:
    """[N, C, 8, 8] -> list of N [C, H_i, W_i], H_i and W_i drawn independently from ``sides`` (so aspect ratios
    vary too), bilinear."""
    g = torch.Generator().manual_seed(seed)
    hw = torch.tensor(sides)[torch.randint(len(sides), (x.shape[0], 2), generator=g)].tolist()
    return [F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            for img, (h, w) in zip(x, hw)]
