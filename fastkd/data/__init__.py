"""What the student sees: datasets (uint8, in memory), the epoch sampler, batched augmentation."""

from fastkd.data.datasets import Dataset, fingerprint, load_data
from fastkd.data.sampler import EpochSampler

__all__ = ["Dataset", "EpochSampler", "fingerprint", "load_data"]
