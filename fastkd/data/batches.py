"""``TrainBatches``: the student's training split on the device, (ids, view) → an augmented batch.

The one place the trainer and the cache builder make training images, so a cache replays exactly the
images the run will see (augmentation is a pure function of (seed, view, sample id))."""

from __future__ import annotations

import torch

from fastkd.data.augment import AugmentConfig, augment_batch
from fastkd.data.datasets import Dataset


class TrainBatches:
    def __init__(self, data: Dataset, aug: AugmentConfig, seed: int, device: torch.device):
        self.data, self.aug, self.seed = data, aug, seed
        self.x_train = data.x_train.to(device)
        self.y_train = data.y_train.to(device)

    def __call__(self, ids: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x normalised [B, C, H, W], y_soft [B, num_classes], y_hard [B]) of samples ``ids`` in ``view``."""
        d = self.data
        return augment_batch(
            self.x_train,
            self.y_train,
            ids,
            seed=self.seed,
            view=view,
            cfg=self.aug,
            num_classes=d.num_classes,
            mean=d.mean,
            std=d.std,
        )
