"""From a loader batch to the model's input, on the training device: float16 as stored -> float32, a noise floor
added, normalised with the train split's statistics, shifted in time, SpecAugment masks applied.

Done on the device rather than in the loader: the host then moves half the bytes (float16), and on a GPU these
elementwise kernels cost nothing next to the model. The arithmetic is the one the shards' statistics were
computed for: (x - mean) * (1 / std) in float32, per mel band (or per the index's normalisation axis).

The loader draws every sample's augmentation (vascdist.data.loader, `_augment_params`) as one int64 row of
AUGMENT_COLUMNS: SpecAugment's (freq start, freq width, time start, time width), the time shift in frames and the
noise floor in hundredths of a dB (NO_FLOOR: none). A row of zeros with NO_FLOOR leaves the sample unchanged.
"""

from __future__ import annotations

import torch

AUGMENT_COLUMNS = 6
NO_FLOOR = -(2 ** 62)  # the floor column's value for "no noise floor"


class InputTransform:
    """Callable: (x float16 (N, *sample_shape), augment (N, AUGMENT_COLUMNS) or None) -> normalised float32 on
    `device`."""

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
        floor = shift = False
        if augment is not None:
            # Which augmentations this batch uses, read on the host before the copy: a batch without a floor or a
            # shift (their options off) then costs no device synchronisation to find that out.
            floor, shift = bool((augment[:, 5] != NO_FLOOR).any()), bool((augment[:, 4] != 0).any())
            augment = augment.to(self.device, non_blocking=True)
            if floor:
                x = add_noise_floor(x, augment[:, 5])
        x.sub_(self.mean).mul_(self.inv_std)
        if augment is not None:
            if shift:
                x = shift_time(x, augment[:, 4])
            x.mul_(spec_augment_keep(augment, x.shape[-2], x.shape[-1]))
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def add_noise_floor(x: torch.Tensor, floor_cdb: torch.Tensor) -> torch.Tensor:
    """Log-mel windows (N, C, F, T) in dB with a stationary noise floor added, `floor_cdb` (N,) hundredths of a dB.

    The shards hold log-mel in dB relative to each recording's mean per band (recording_norm: band_mean), so a
    floor of L dB is power 10^(L/10) in every band: x' = 10 log10(10^(x/10) + 10^(L/10)) fills the quiet parts
    between the sounds as a noisier stethoscope or room does. Each band is then moved back to its mean over the
    window, as band_mean would have removed the floor's rise of the recording's mean. Rows with NO_FLOOR are
    returned unchanged, bit for bit.
    """
    has = floor_cdb != NO_FLOOR
    if not bool(has.any()):
        return x
    level = torch.where(has, floor_cdb, torch.zeros_like(floor_cdb)).to(torch.float32).div(100.0)
    level = level.reshape(-1, *([1] * (x.dim() - 1)))
    noisy = 10.0 * torch.log10(torch.pow(10.0, x / 10.0) + torch.pow(10.0, level / 10.0))
    noisy = noisy - noisy.mean(dim=-1, keepdim=True) + x.mean(dim=-1, keepdim=True)
    return torch.where(has.reshape(level.shape), noisy, x)


def shift_time(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each window (N, C, F, T) rolled circularly by `shift` (N,) frames along time: output frame t is input
    frame (t - shift) mod T. Heart sounds then sit anywhere in the window, as they do where the onset detector
    starts the windows at another phase of the cycle (a noisy site). A shift of 0 returns the row unchanged."""
    if not bool((shift != 0).any()):
        return x
    n_time = x.shape[-1]
    t = torch.arange(n_time, device=x.device)
    index = (t[None, :] - shift[:, None]) % n_time  # (N, T)
    return torch.gather(x, -1, index.reshape(x.shape[0], *([1] * (x.dim() - 2)), n_time).expand_as(x))


def spec_augment_keep(augment: torch.Tensor, n_freq: int, n_time: int) -> torch.Tensor:
    """(N, 1, F, T) float mask: 0 inside each sample's frequency and time mask, 1 elsewhere.

    `augment` rows start with (freq start, freq width, time start, time width), drawn by the loader per sample.
    Masked values become 0, the normalised mean.
    """
    f = torch.arange(n_freq, device=augment.device)
    t = torch.arange(n_time, device=augment.device)
    f_start, f_width, t_start, t_width = (augment[:, i:i + 1] for i in range(4))  # each (N, 1)
    f_mask = (f >= f_start) & (f < f_start + f_width)  # (N, F)
    t_mask = (t >= t_start) & (t < t_start + t_width)  # (N, T)
    keep = ~(f_mask[:, :, None] | t_mask[:, None, :])  # (N, F, T)
    return keep[:, None].float()
