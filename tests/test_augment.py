"""Augmentation that imitates another site (data.noise_floor_db, data.time_shift): what each does to real
log-mel windows of real shards, drawn per sample and the same on any number of ranks, and refused where the
shards cannot take it."""

import pytest
import torch

from vascdist.config.checks import check_against_index
from vascdist.config.loader import load_config
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.shards import load_index
from vascdist.data.transform import AUGMENT_COLUMNS, NO_FLOOR, InputTransform, add_noise_floor, shift_time
from vascdist.errors import ConfigError

B = 32


def first_batch(shards_dir, rank=0, world=1, **kw):
    loader = StreamingLoader(ShardStream(shards_dir, "train", B, rank, world, seed=3, **kw), threads=0)
    return next(iter(loader))


def test_noise_floor_fills_the_quiet_parts_and_keeps_each_band_mean(shards_dir):
    x = first_batch(shards_dir)["x"][:8].float()  # real log-mel windows in dB
    x = x - x.mean(dim=-1, keepdim=True)  # as recording_norm: band_mean leaves them (about 0 dB per band)
    floors = torch.tensor([NO_FLOOR, -6000, -2000, -1000, 0, 0, 0, 0])
    y = add_noise_floor(x, floors)
    assert torch.equal(y[0], x[0])  # no floor: bit for bit
    assert (y[1] - x[1]).abs().max() < 0.01  # -60 dB below the band mean: nothing visible
    torch.testing.assert_close(y.mean(dim=-1), x.mean(dim=-1), atol=1e-4, rtol=0)  # band means kept
    spread = lambda t: (t.amax(dim=-1) - t.amin(dim=-1)).mean().item()  # noqa: E731
    assert spread(y[2]) < spread(x[2]) and spread(y[3]) < spread(y[2]) * 1.001 and spread(y[4]) < spread(x[4]) * 0.8
    quiet = x[4] < x[4].median()  # the quiet half rises relative to the loud half
    assert (y[4] - x[4])[quiet].mean() > (y[4] - x[4])[~quiet].mean() + 1.0


def test_time_shift_is_a_circular_roll_per_sample(shards_dir):
    x = first_batch(shards_dir)["x"][:3].float()
    y = shift_time(x, torch.tensor([0, 1, 37]))
    assert torch.equal(y[0], x[0])
    assert torch.equal(y[1], torch.roll(x[1], 1, dims=-1)) and torch.equal(y[2], torch.roll(x[2], 37, dims=-1))
    assert torch.equal(shift_time(x, torch.zeros(3, dtype=torch.int64)), x)


def test_augmentation_is_drawn_per_sample_the_same_on_any_number_of_ranks(shards_dir):
    kw = {"spec_augment": (6, 12), "noise_floor_db": (-25.0, 0.0), "time_shift": True}
    one = first_batch(shards_dir, **kw)
    two = [first_batch(shards_dir, rank=r, world=2, **kw) for r in range(2)]
    assert one["augment"].shape == (B, AUGMENT_COLUMNS)
    assert torch.equal(torch.cat([two[0]["augment"], two[1]["augment"]]), one["augment"])
    floors = one["augment"][:, 5]
    assert floors.min() >= -2500 and floors.max() <= 0 and len(floors.unique()) > B // 2
    assert one["augment"][:, 4].max() > 0
    masks_only = first_batch(shards_dir, spec_augment=(6, 12))["augment"]
    assert torch.equal(masks_only[:, :4], one["augment"][:, :4])  # SpecAugment's masks do not move
    assert (masks_only[:, 4] == 0).all() and (masks_only[:, 5] == NO_FLOOR).all()
    inputs = InputTransform(load_index(shards_dir))
    plain = inputs(one["x"])
    augmented = inputs(one["x"], one["augment"])
    assert augmented.shape == plain.shape and torch.isfinite(augmented).all() and not torch.equal(augmented, plain)


def test_noise_floor_needs_band_mean_shards(shards_dir):
    index = load_index(shards_dir)  # written with recording_norm none
    cfg = load_config(None, [f"data.shards={shards_dir}", "data.noise_floor_db=[-25,0]"])
    with pytest.raises(ConfigError, match="data.noise_floor_db.*recording_norm=band_mean.*'none'"):
        check_against_index(cfg, index)
    with pytest.raises(ConfigError, match="noise_floor_db"):
        load_config(None, ["data.noise_floor_db=[0,-25]"])
