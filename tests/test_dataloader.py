"""The shard stream under a stock torch DataLoader: the threaded loader's exact batches, for any number of worker
processes and ranks, across a mid-epoch checkpoint and resume; the user transform hook through real training."""

import json
import re
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import REPO, run_cli, stream_with_a_broken_shard
from vascdist.data.dataloader import ShardBatches, WorkerLoader
from vascdist.data.loader import ShardStream, StreamingLoader
from vascdist.errors import VascdistError

B = 48  # does not divide the 128-sample windows below: batches span windows and are joined from pieces
WINDOW = 2  # chunks per shuffle window


def stream(shards_dir, rank=0, world=1, split="train", **kw):
    return ShardStream(shards_dir, split, B, rank, world, seed=3, shuffle_chunks=WINDOW, train=split == "train", **kw)


def threaded(shards_dir, rank=0, world=1, epoch=0, **kw):
    loader = StreamingLoader(stream(shards_dir, rank, world, **kw), threads=1)
    loader.set_epoch(epoch)
    return list(loader)


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_dataloader_batches_equal_threaded_across_checkpoint_and_resume(shards_dir, world, workers):
    for rank in range(world):
        expected = threaded(shards_dir, rank, world, epoch=1, spec_augment=(6, 12))
        loader = WorkerLoader(stream(shards_dir, rank, world, spec_augment=(6, 12)), workers=workers)
        loader.set_epoch(1)
        it = iter(loader)
        head = [next(it) for _ in range(5)]
        state = loader.state_dict()
        assert state["epoch"] == 1 and state["batches"] == 5
        loader.close()  # the job stops here; a new process resumes from the checkpoint
        resumed = WorkerLoader(stream(shards_dir, rank, world, spec_augment=(6, 12)), workers=workers)
        resumed.load_state_dict(state)
        tail = list(resumed)
        same(head + tail, expected)
        assert resumed.epoch == 2 and resumed.batches == 0
        again = list(resumed)  # the next epoch, on the same (persistent) workers
        same(again, threaded(shards_dir, rank, world, epoch=2, spec_augment=(6, 12)))
        resumed.close()


def test_dataloader_batches_equal_threaded_with_every_augmentation(shards_dir):
    aug = {"spec_augment": (6, 12), "noise_floor_db": (-25.0, 0.0), "time_shift": True}
    for rank in range(2):
        expected = threaded(shards_dir, rank, 2, epoch=1, **aug)
        assert (expected[0]["augment"][:, 4] > 0).any() and (expected[0]["augment"][:, 5] > -2501).all()
        loader = WorkerLoader(stream(shards_dir, rank, 2, **aug), workers=2)
        loader.set_epoch(1)
        same(list(loader), expected)
        loader.close()


def test_a_checkpoint_moves_between_the_paths_and_world_sizes(shards_dir):
    full = threaded(shards_dir, epoch=0)
    loader = WorkerLoader(stream(shards_dir), workers=2)
    it = iter(loader)
    [next(it) for _ in range(3)]
    state = loader.state_dict()
    loader.close()
    threads = StreamingLoader(stream(shards_dir))
    threads.load_state_dict(state)  # DataLoader checkpoint -> threaded loader, one rank
    same(list(threads), full[3:])
    parts = []
    for rank in range(2):  # -> DataLoader on two ranks
        two = WorkerLoader(stream(shards_dir, rank, 2), workers=1)
        two.load_state_dict(state)
        parts.append(list(two))
        two.close()
    for whole, a, b in zip(full[3:], *parts):
        assert torch.equal(torch.cat([a["x"], b["x"]]), whole["x"])


def test_a_stock_dataloader_consumes_shard_batches(shards_dir):
    dataset = ShardBatches(stream(shards_dir), workers=2)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True, prefetch_factor=2,
                        generator=torch.Generator())
    same(list(loader), threaded(shards_dir, epoch=0))  # all held at once: the workers' buffer pools run out
    dataset.start(epoch=1, first_batch=4)  # persistent workers read the new position from shared memory
    same(list(loader), threaded(shards_dir, epoch=1)[4:])


def test_a_shared_slot_returns_to_its_worker_once_its_batch_is_garbage(shards_dir):
    loader = WorkerLoader(stream(shards_dir), workers=2)
    slots = loader.dataset.slots
    first = None
    for batch in loader:
        first = batch if first is None else first  # held to the end: its slot stays claimed
    del batch
    assert int(slots.held.sum()) == 1 and int(slots.claimed.sum()) == 1  # every other slot came back
    same([first], threaded(shards_dir, epoch=0)[:1])  # never overwritten while held
    del first
    assert int(slots.held.sum()) == 0 and int(slots.claimed.sum()) == 0
    loader.close()


def test_evaluation_splits_and_the_short_last_batch(shards_dir):
    for split in ("val", "test"):
        expected = list(StreamingLoader(stream(shards_dir, split=split)))
        assert len(expected[-1]["y"]) < B
        loader = WorkerLoader(stream(shards_dir, split=split), workers=2)
        same(list(loader), expected)
        same(list(loader), expected)  # evaluation reads the whole split every time
        loader.close()


def test_leaving_an_epoch_early_and_a_newer_iteration(shards_dir):
    loader = WorkerLoader(stream(shards_dir), workers=2)
    first = iter(loader)
    for _ in range(3):
        next(first)
    assert loader.batches == 3
    loader.set_epoch(1)
    same(list(loader), threaded(shards_dir, epoch=1))  # the stale prefetched batches of epoch 0 are dropped
    with pytest.raises(VascdistError, match="stopped by a newer iteration"):
        next(first)
    assert loader.epoch == 2
    loader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vascdist-reader")]


def test_a_worker_error_reaches_the_training_process(shards_dir, tmp_path):
    s, victim = stream_with_a_broken_shard(shards_dir, tmp_path, B)
    with pytest.raises(Exception, match=f"{victim}: cannot read the shard"):
        list(WorkerLoader(s, workers=2))


# ------------------------------------------------------------------------------------------- the transform hook
def readme_transform(tmp_path):
    """The README's example transform, written out as a user's module (so the README's code is what is tested)."""
    text = (REPO / "README.md").read_text()
    code = re.search(r"<!-- transform example -->\s*```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "my_augment.py").write_text(code)
    return {"PYTHONPATH": f"{tmp_path}:{REPO}"}


def train(shards_dir, tmp_path, name, env, *extra):
    args = ["train", f"data.shards={shards_dir}", f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}",
            "model.width=0.125", "model.stem=imagenet", "data.batch_size=32", "train.epochs=1", "train.max_steps=12",
            "train.device=cpu", "--quiet", *extra]
    done = run_cli(*args, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    run = next((tmp_path / "runs" / name).iterdir())
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(lines):
    return [(r["step"], r["train/loss"]) for r in lines if r.get("split") == "train"]


@pytest.mark.slow
def test_transform_runs_in_training_and_both_paths_agree(shards_dir, tmp_path):
    env = {**readme_transform(tmp_path), "OMP_NUM_THREADS": "1"}
    hook = "data.transform=my_augment:gain_and_shift"
    plain = train(shards_dir, tmp_path, "plain", env, "data.loader=dataloader", "data.workers=1")
    threads = train(shards_dir, tmp_path, "threads", env, hook, "data.loader=threads")
    workers = train(shards_dir, tmp_path, "workers", env, hook, "data.loader=dataloader", "data.workers=2")
    assert train_losses(threads) == train_losses(workers)  # the same draws, made in a thread or a worker process
    test = lambda lines: [json.dumps({k: v for k, v in r.items() if k != "time"}, sort_keys=True)  # NaN-safe
                          for r in lines if r.get("split") == "test"]
    assert test(threads) == test(workers) and len(test(threads)) == 1
    assert train_losses(plain) != train_losses(threads)  # the transform did change the batches


def test_a_transform_that_cannot_be_imported_is_refused_before_training(shards_dir, tmp_path):
    for bad, why in (("no_such_module:fn", "cannot import module 'no_such_module'"),
                     ("json:no_such_function", "module 'json' has no callable 'no_such_function'"),
                     ("nodots", "must look like 'package.module:function'")):
        done = run_cli("train", f"data.shards={shards_dir}", f"run.out_dir={tmp_path / 'runs'}", f"data.transform={bad}")
        assert done.returncode == 2
        assert f"config key 'data.transform'" in done.stderr and why in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing was started
