"""From a loader batch to the model's input, on the training device: float16 as stored -> float32, normalised
with the train split's statistics, SpecAugment masks applied.

Done on the device rather than in the loader: the host then moves half the bytes (float16), and on a GPU these
elementwise kernels cost nothing next to the model. The arithmetic is the one the shards' statistics were
computed for: (x - mean) * (1 / std) in float32, per mel band (or per the index's normalisation axis).
"""

from __future__ import annotations

import torch


class InputTransform:
    """Callable: (x float16 (N, *sample_shape), augment (N, 4) or None) -> normalised float32 on `device`."""

    def __init__(self, data: dict, device: torch.device | str = "cpu", channels_last: bool = False):
        """`data`: a shard set's index.json, or the `data` entry of a checkpoint (both hold "normalization" and
        "sample_shape")."""
        normalization = data["normalization"]
        shape = [1] * (1 + len(data["sample_shape"]))  # (1, C, F, T): broadcast over the batch
        if normalization["axis"] >= 0:
            shape[1 + normalization["axis"]] = -1
        self.device = torch.device(device)
        self.mean = torch.tensor(normalization["mean"], dtype=torch.float32).reshape(shape).to(self.device)
        self.inv_std = (1.0 / torch.tensor(normalization["std"], dtype=torch.float32)).reshape(shape).to(self.device)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, augment: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).to(torch.float32, copy=True)  # never the caller's: in place below
        x.sub_(self.mean).mul_(self.inv_std)
        if augment is not None:
            x.mul_(spec_augment_keep(augment.to(self.device, non_blocking=True), x.shape[-2], x.shape[-1]))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def spec_augment_keep(augment: torch.Tensor, n_freq: int, n_time: int) -> torch.Tensor:
    """(N, 1, F, T) float mask: 0 inside each sample's frequency and time mask, 1 elsewhere.

    `augment` rows are (freq start, freq width, time start, time width), drawn by the loader per sample.
    Masked values become 0, the normalised mean.
    """
    f = torch.arange(n_freq, device=augment.device)
    t = torch.arange(n_time, device=augment.device)
    f_start, f_width, t_start, t_width = (augment[:, i:i + 1] for i in range(4))  # each (N, 1)
    f_mask = (f >= f_start) & (f < f_start + f_width)  # (N, F)
    t_mask = (t >= t_start) & (t < t_start + t_width)  # (N, T)
    keep = ~(f_mask[:, :, None] | t_mask[:, None, :])  # (N, F, T)
    return keep[:, None].float()
