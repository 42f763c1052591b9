"""Checkpoints: exact round trips, RNG restore, pruning, corrupt-file skipping, atomicity of writes."""

import collections
import random

import numpy as np
import pytest
import torch

from vascdist.errors import VascdistError
from vascdist.train.checkpoint import atomic_torch_save, capture_rng_state, restore_rng_state
from vascdist.train.state import CheckpointManager, resolve_resume


def _train_state(seed: int = 0) -> dict:
    """A small model + Adam after two real steps, so the optimiser holds per-parameter tensors."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 2))  # (B, 1, 6, 6) -> (B, 4, 4, 4) -> (B, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 1, 6, 6)).sum().backward()
        opt.step()
        sched.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "step": 2, "config": {"optim": {"lr": 1e-3, "betas": [0.9, 0.999]}}, "rng": capture_rng_state()}


def _draws() -> tuple:
    return torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn(3)


def _assert_same(a, b, key="state"):
    """Exact structural equality of nested dict/list/tensor states."""
    assert type(a) is type(b), key
    if isinstance(a, dict):
        assert list(a) == list(b), key
        for k in a:
            _assert_same(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{key}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    else:
        assert a == b, key


def test_round_trip_is_exact_and_weights_only_loadable(tmp_path):
    state = _train_state()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    path = manager.save(2, state)
    assert path.name == "step-00000002.pt"
    # The manager loads with the safe unpickler; do it once more by hand to make the claim explicit.
    _assert_same(state, torch.load(path, weights_only=True))
    _assert_same(state, manager.load(path))


def test_restoring_rng_reproduces_draws_after_a_checkpoint_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leave numpy with a cached gaussian, part of its state
    path = tmp_path / "rng.pt"
    atomic_torch_save({"rng": capture_rng_state()}, path)
    expected = _draws()
    _draws()  # move every generator further on
    restore_rng_state(torch.load(path, weights_only=True)["rng"])
    got = _draws()
    assert torch.equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    np.testing.assert_array_equal(expected[3], got[3])


def test_keep_last_prunes_old_steps_and_keeps_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        manager.save(step, {"step": step, "w": torch.full((3,), float(step))}, is_best=(step == 20))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "step-00000030.pt", "step-00000040.pt"]
    assert manager.load(manager.best_path)["step"] == 20
    assert not (tmp_path / "best.pt").is_symlink()
    manager.save(50, {"step": 50}, is_best=True)
    assert manager.load(tmp_path / "best.pt")["step"] == 50
    assert [s for s, _ in manager.step_files()] == [40, 50]


def test_save_never_prunes_the_file_it_just_wrote(tmp_path):
    # Resuming from an older checkpoint in the same directory writes a lower step than files on disk.
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(100, {"step": 100})
    manager.save(50, {"step": 50})
    assert [s for s, _ in manager.step_files()] == [50]


def test_latest_loadable_skips_truncated_and_garbage_files_with_a_warning(tmp_path, capfd):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, {"step": step, "w": torch.arange(1000.0)})
    newest = manager.step_path(3)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated mid-write by hand
    manager.step_path(2).write_bytes(np.random.default_rng(0).bytes(4096))  # random bytes
    found = manager.latest_loadable()
    assert found is not None
    path, state = found
    assert path == manager.step_path(1) and state["step"] == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"skipping corrupt checkpoint {newest}: ")
    assert lines[1].startswith(f"skipping corrupt checkpoint {manager.step_path(2)}: ")


def test_latest_loadable_none_when_nothing_loads(tmp_path, capfd):
    assert CheckpointManager(tmp_path / "missing", keep_last=1).latest_loadable() is None
    (tmp_path / "step-00000001.pt").write_bytes(b"")
    assert CheckpointManager(tmp_path, keep_last=1).latest_loadable() is None
    assert "skipping corrupt checkpoint" in capfd.readouterr().err


def test_leftover_temp_file_is_ignored_then_cleaned_up(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, {"step": 1})
    # What a kill -9 during torch.save of step 2 leaves behind: a complete-looking temp file.
    stale = tmp_path / ".step-00000002.pt.4242.deadbeef.tmp"
    torch.save({"step": 2}, stale)
    path, state = manager.latest_loadable()
    assert state["step"] == 1 and path.name == "step-00000001.pt"
    assert resolve_resume("auto", tmp_path) == path
    manager.save(3, {"step": 3})
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001.pt", "step-00000003.pt"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while pickling")


def test_failed_write_leaves_target_unchanged_and_no_temp_file(tmp_path):
    target = tmp_path / "step-00000001.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(100)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"step": 2, "w": torch.zeros(100), "bad": _Unpicklable()}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]
    # The manager path goes through the same write (weights_only=False so its pre-check lets the object in).
    manager = CheckpointManager(tmp_path, keep_last=1, weights_only=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        manager.save(2, {"bad": _Unpicklable()})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001.pt"]


def test_save_rejects_values_the_safe_unpickler_would_refuse(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(VascdistError, match=r"'state\.scheduler\.best' holds a numpy\.float64"):
        manager.save(1, {"scheduler": {"best": np.float64(0.5)}})
    with pytest.raises(VascdistError, match=r"'state\.counts' holds a collections\.defaultdict"):
        manager.save(1, {"counts": collections.defaultdict(int)})
    assert list(tmp_path.iterdir()) == []
    # weights_only=False accepts arbitrary python objects and loads them back.
    loose = CheckpointManager(tmp_path, keep_last=1, weights_only=False)
    loose.save(1, {"best": np.float64(0.5)})
    assert loose.latest_loadable()[1]["best"] == np.float64(0.5)


def test_load_errors_name_the_file(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(VascdistError, match="does not exist"):
        manager.load(tmp_path / "nope.pt")
    bad = tmp_path / "step-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(VascdistError, match=f"checkpoint '{bad}' is unreadable: "):
        manager.load(bad)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(VascdistError, match="not a vascdist checkpoint"):
        manager.load(tmp_path / "list.pt")


def test_resolve_resume(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert resolve_resume("auto", ckpts) is None
    assert resolve_resume("", ckpts) is None
    manager = CheckpointManager(ckpts, keep_last=3)
    manager.save(5, {"step": 5})
    manager.save(7, {"step": 7})
    assert resolve_resume("auto", ckpts) == manager.step_path(7)
    assert resolve_resume(str(manager.step_path(5)), tmp_path / "elsewhere") == manager.step_path(5)
    assert resolve_resume(str(ckpts), tmp_path / "elsewhere") == manager.step_path(7)
    with pytest.raises(VascdistError, match="not found"):
        resolve_resume(str(tmp_path / "missing.pt"), ckpts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VascdistError, match="no loadable"):
        resolve_resume(str(empty), ckpts)


def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path, capfd):
    # torch.load alone would return the damaged tensor; the CRC check of the zip members catches it.
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(1, {"w": torch.arange(10_000.0)})
    manager.save(2, {"w": torch.arange(10_000.0)})
    raw = bytearray(manager.step_path(2).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    manager.step_path(2).write_bytes(bytes(raw))
    assert manager.latest_loadable()[0] == manager.step_path(1)
    assert "fails its CRC-32 check" in capfd.readouterr().err
    with pytest.raises(VascdistError, match="CRC-32"):
        manager.load(manager.step_path(2))
