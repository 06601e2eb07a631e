"""What the student sees: datasets (digits, .npz in host memory; folders, tar shards, synthetic:N held in
memory when small, else streamed by loader workers), the epoch sampler, batched on-device augmentation.
The device never holds the dataset: ``batches.TrainBatches`` sends it one step's images at a time."""

from fastkd.data.datasets import Dataset, fingerprint, load_data
from fastkd.data.sampler import EpochSampler

__all__ = ["Dataset", "EpochSampler", "fingerprint", "load_data"]
