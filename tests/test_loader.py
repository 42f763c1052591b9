"""The streaming loader on real shards: coverage, determinism, world-size invariance, exact mid-epoch resume."""

import threading

import numpy as np
import pytest
import torch

from helpers import stream_with_a_broken_shard
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.data.shards import load_index
from vascdist.data.transform import InputTransform
from vascdist.errors import ConfigError, DataError

B = 32


def batches(shards_dir, rank=0, world=1, workers=0, epoch=0, batch=B, **kw):
    loader = StreamingLoader(ShardStream(shards_dir, "train", batch, rank, world, seed=3, **kw), threads=workers)
    loader.set_epoch(epoch)
    return [b for b in loader], loader


def positions(bs):
    return [b["position"].tolist() for b in bs]


def test_epoch_covers_train_split_once(shards_dir):
    bs, loader = batches(shards_dir)
    n = loader.stream.num_samples
    assert len(bs) == len(loader) == n // B
    keys = np.concatenate([np.stack([b["recording"].numpy(), b["cycle"].numpy()], 1) for b in bs])
    assert len({tuple(k) for k in keys}) == len(keys) == (n // B) * B  # no sample twice, only the tail dropped
    assert all(b["x"].shape == (B, 1, 40, 100) and b["x"].dtype == torch.float16 for b in bs)


def test_shuffle_is_deterministic_and_changes_per_epoch(shards_dir):
    a, _ = batches(shards_dir, epoch=0)
    b, _ = batches(shards_dir, epoch=0, workers=2)
    c, _ = batches(shards_dir, epoch=1)
    assert positions(a) == positions(b)
    assert all(torch.equal(x["x"], y["x"]) for x, y in zip(a, b))
    ids = lambda bs: [tuple(zip(x["recording"].tolist(), x["cycle"].tolist())) for x in bs]
    assert ids(a) == ids(b) and ids(a) != ids(c)
    first = sorted(i for batch in ids(a) for i in batch)
    assert first != [i for batch in ids(a) for i in batch]  # actually shuffled


@pytest.mark.parametrize("world", [2, 4])
def test_every_world_size_draws_the_same_samples_per_step(shards_dir, world):
    single, _ = batches(shards_dir)
    per_rank = [batches(shards_dir, rank=r, world=world, workers=r % 2)[0] for r in range(world)]
    assert all(len(p) == len(single) for p in per_rank)  # no rank waits at the end of the epoch
    for step, whole in enumerate(single):
        joined = torch.cat([per_rank[r][step]["x"] for r in range(world)])
        assert torch.equal(joined, whole["x"])
        assert torch.equal(torch.cat([per_rank[r][step]["y"] for r in range(world)]), whole["y"])


def test_resume_mid_epoch_sees_exactly_the_unseen_batches(shards_dir):
    full, _ = batches(shards_dir, epoch=1)
    stream = ShardStream(shards_dir, "train", B, seed=3)
    loader = StreamingLoader(stream, threads=1)
    loader.set_epoch(1)
    it = iter(loader)
    seen = [next(it) for _ in range(5)]
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 5
    # resume on two ranks from a one-rank checkpoint: the same global sequence continues
    resumed = []
    for rank in range(2):
        l2 = StreamingLoader(ShardStream(shards_dir, "train", B, rank, 2, seed=3), threads=rank)
        l2.load_state_dict(state)
        resumed.append(list(l2))
    assert len(resumed[0]) == len(full) - 5
    for i, whole in enumerate(full[5:]):
        assert torch.equal(torch.cat([resumed[0][i]["x"], resumed[1][i]["x"]]), whole["x"])
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(seen, full[:5]))


def test_resume_with_another_global_batch_is_refused(shards_dir):
    loader = StreamingLoader(ShardStream(shards_dir, "train", B, seed=3))
    state = loader.state_dict()
    other = StreamingLoader(ShardStream(shards_dir, "train", 2 * B, seed=3))
    with pytest.raises(ConfigError, match=f"resume with data.batch_size={B}"):
        other.load_state_dict(state)


def model_inputs(shards_dir, bs):
    inputs = InputTransform(load_index(shards_dir))
    return [inputs(b["x"], b.get("augment")) for b in bs]


def test_normalisation_uses_train_statistics(shards_dir):
    bs, _ = batches(shards_dir)
    x = torch.cat(model_inputs(shards_dir, bs)).double()
    per_band = x.mean(dim=(0, 1, 3))
    assert per_band.abs().max() < 0.05 and abs(x.std().item() - 1) < 0.1
    val = list(StreamingLoader(ShardStream(shards_dir, "val", B, train=False)))
    assert sum(len(b["y"]) for b in val) == load_index(shards_dir)["splits"]["val"]["samples"]


def test_eval_split_is_partitioned_across_ranks(shards_dir):
    one = torch.cat([b["position"] for b in StreamingLoader(ShardStream(shards_dir, "test", B, train=False))])
    two = [torch.cat([b["position"] for b in StreamingLoader(ShardStream(shards_dir, "test", B, r, 2, train=False))])
           for r in range(2)]
    assert torch.equal(torch.cat(two), one)


def test_spec_augment_masks_are_deterministic_per_sample(shards_dir):
    plain = model_inputs(shards_dir, batches(shards_dir)[0])
    aug1 = model_inputs(shards_dir, batches(shards_dir, spec_augment=(6, 12))[0])
    aug2 = [model_inputs(shards_dir, batches(shards_dir, rank=r, world=2, spec_augment=(6, 12), workers=r)[0])
            for r in range(2)]
    assert not torch.equal(plain[0], aug1[0])
    zeroed = (aug1[0] == 0).float().mean()
    assert 0 < zeroed < 0.5
    assert torch.equal(torch.cat([aug2[0][0], aug2[1][0]]), aug1[0])
    kept = aug1[0] != 0
    assert torch.equal(aug1[0][kept], plain[0][kept])  # outside the masks, the same normalised values


def test_batch_sizes_that_do_not_divide_windows_still_cover_the_epoch(shards_dir):
    # 48 does not divide the 64-sample chunks: batches span windows and are joined from two pieces
    one, loader = batches(shards_dir, batch=48, shuffle_chunks=2)
    threads, _ = batches(shards_dir, batch=48, shuffle_chunks=2, workers=3)
    assert len(one) == len(loader) and all(len(b["y"]) == 48 for b in one)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, threads) for k in a)
    pos = torch.cat([b["position"] for b in one])
    assert torch.equal(pos, torch.arange(len(pos)))  # positions are consecutive: nothing skipped or repeated


def test_leaving_an_epoch_early_stops_the_reader_threads(shards_dir):

    loader = StreamingLoader(ShardStream(shards_dir, "train", 8, seed=3, shuffle_chunks=1), threads=2,
                             windows_ahead=1)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert not [t for t in threading.enumerate() if t.name.startswith("vascdist-reader")]
    assert loader.batches == 3


def test_a_reader_error_reaches_the_consumer(shards_dir, tmp_path):
    stream, victim = stream_with_a_broken_shard(shards_dir, tmp_path, B)
    with pytest.raises(DataError, match=f"{victim}: cannot read the shard"):
        list(StreamingLoader(stream, threads=2))


def test_a_second_iteration_stops_the_first_and_reuses_its_readers(shards_dir):
    loader = StreamingLoader(ShardStream(shards_dir, "train", B, seed=3), threads=2)
    first = iter(loader)
    head = [next(first) for _ in range(2)]
    loader.set_epoch(1)
    again = list(loader)  # the suspended first iteration is stopped, its threads and buffers reused
    assert len(again) == len(loader) and loader.epoch == 2
    expected, _ = batches(shards_dir, epoch=1)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(again, expected))
    assert head[0]["x"].shape == (B, 1, 40, 100)
    loader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vascdist-reader")]


def test_batch_buffers_are_reused_only_once_dropped(tmp_path):
    from vascdist.data.reader import ChunkLayout, WindowReader
    reader = WindowReader(ChunkLayout(tmp_path, chunk_size=8, sample_shape=(1, 4, 5), samples={}), (1, 4, 5), batch_rows=6)
    a, rows = reader.batch_buffer(6)
    assert len(rows) == 6 and all(len(r) == 40 for r in rows)  # one float16 row of 1 x 4 x 5 each
    first = a.data_ptr()
    a.fill_(1)
    b, _ = reader.batch_buffer(3)  # a is alive: another buffer
    assert b.data_ptr() != first
    view = a[2:4]
    del a
    c, _ = reader.batch_buffer(6)  # a view of the first buffer is still alive
    assert c.data_ptr() not in (first, b.data_ptr()) and torch.all(view == 1)
    del view
    d, _ = reader.batch_buffer(6)  # now nothing holds it: reused
    assert d.data_ptr() == first


def test_an_iteration_stopped_by_a_newer_one_says_so_instead_of_ending_the_epoch(shards_dir):
    from vascdist.errors import VascdistError
    loader = StreamingLoader(ShardStream(shards_dir, "train", B, seed=3), threads=1)
    first = iter(loader)
    next(first)
    second = iter(loader)
    next(second)  # starting the second stops the first
    with pytest.raises(VascdistError, match="stopped by a newer iteration"):
        next(first)
    assert loader.epoch == 0 and loader.batches == 2  # nothing counted as a finished epoch
    second.close()


def test_a_shard_that_disagrees_with_the_index_is_refused(shards_dir, tmp_path):
    import shutil

    import h5py
    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    stream = ShardStream(copy, "train", B, seed=3, shuffle_chunks=1)
    victim = stream.chunks[0].file
    with h5py.File(copy / victim, "a") as f:  # one sample fewer than index.json records, same chunking
        x = f["x"][:-1]
        del f["x"]
        f.create_dataset("x", data=x, chunks=(64, *x.shape[1:]))
    with pytest.raises(DataError, match=f"{victim}: field 'x' has shape"):
        list(StreamingLoader(stream))
