"""The DeepSpeed engine (`dist.engine: deepspeed`): ZeRO stages 0-2 behind the loop's engine interface.

DeepSpeed owns gradient accumulation, clipping and (for ZeRO) the partitioned optimiser state; the optimiser
itself is still vascdist's (`build_optimizer`), so `LRSchedule` keeps driving its param groups' lr (ZeRO
steps the client optimiser over flat fp32 partitions placed in those same param groups).

The DeepSpeed config is derived from the vascdist config (`derive_deepspeed_config`) and may be extended by
the JSON file `dist.deepspeed_config`; a key in that file that contradicts the vascdist config is a
ConfigError naming both. On a CPU it runs on DeepSpeed's CPU accelerator over gloo, in the process group
that `vascdist.dist.init_distributed` created (a one-rank group is made here for a single process).

Checkpoints: every rank writes its partition into <checkpoints>/deepspeed/step-N/ (DeepSpeed needs all
ranks), then global rank 0 writes the usual vascdist step file (full model weights plus loop state), whose
presence marks the pair complete; `evaluate`, `predict` and `--resume auto` read the step file as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vascdist.compat import deepspeed_internals
from vascdist.config import Config, batch_sizes
from vascdist.config.checks import check_deepspeed_options
from vascdist.dist import DistEnv, barrier, broadcast_buffers, ensure_process_group, on_main
from vascdist.errors import ConfigError, VascdistError
from vascdist.fileio import disk_full, disk_full_message
from vascdist.train.checkpoint import fsync_tree
from vascdist.train.engines import grad_norm
from vascdist.train.precision import uses_bf16
from vascdist.train.saved import EngineState, SavedCheckpoint, with_deepspeed_tag
from vascdist.train.state import CheckpointManager, deepspeed_root, deepspeed_tag, prune_deepspeed_tags

# Keys of a DeepSpeed JSON that vascdist builds itself from its own config sections.
_OWNED_SECTIONS = {"optimizer": "optim.*", "scheduler": "sched.*"}


# --------------------------------------------------------------------------------------------- config
def derive_deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict[str, tuple[Any, str]]:
    """{dotted DeepSpeed key: (value, the vascdist setting it comes from)} for the keys vascdist decides."""
    batch, accum = cfg.data.batch_size, cfg.train.grad_accum
    sizes = batch_sizes(batch, world_size, accum)
    bf16 = uses_bf16(cfg.train.precision, device)
    precision = f"train.precision={cfg.train.precision}" + (f" ({'bf16' if bf16 else 'fp32'} here)"
                                                             if cfg.train.precision == "auto" else "")
    return {
        "train_batch_size": (batch, f"data.batch_size={batch}"),
        "gradient_accumulation_steps": (accum, f"train.grad_accum={accum}"),
        "train_micro_batch_size_per_gpu": (sizes.micro,
                                           f"data.batch_size/world size/train.grad_accum={batch}/{world_size}/{accum}"),
        "gradient_clipping": (cfg.train.grad_clip, f"train.grad_clip={cfg.train.grad_clip}"),
        "zero_optimization.stage": (cfg.dist.zero_stage, f"dist.zero_stage={cfg.dist.zero_stage}"),
        "bf16.enabled": (bf16, precision),
        "fp16.enabled": (False, precision),  # vascdist has no fp16 (no loss scaling); never on a CPU
    }


def read_deepspeed_json(path: str) -> dict:
    """The DeepSpeed JSON named by dist.deepspeed_config; ConfigError naming the file if unreadable."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config key 'dist.deepspeed_config': file '{path}' not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a JSON object of DeepSpeed settings")
    return data


def build_deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict:
    """The dict handed to deepspeed.initialize: the JSON file (if any) plus the derived keys, checked.

    A derived key that the file leaves out or sets to "auto" is filled in; any other value must equal the
    derived one, else ConfigError "FILE sets KEY=V but SETTING" (one line).
    """
    derived = derive_deepspeed_config(cfg, world_size, device)
    path = cfg.dist.deepspeed_config
    merged = read_deepspeed_json(path) if path else {}
    for section, owner in _OWNED_SECTIONS.items():
        if section in merged:
            raise ConfigError(f"{path} sets '{section}' but vascdist builds it from {owner}; remove '{section}'")
    for dotted, (value, source) in derived.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: '{part}' must be an object")
        given = node.get(leaf, "auto")
        if given != "auto" and not _same(given, value):
            raise ConfigError(f"{path} sets {dotted}={json.dumps(given)} but {source}; "
                              "remove the key (or set it to \"auto\") or make them agree")
        node[leaf] = value
    merged.setdefault("zero_allow_untested_optimizer", True)  # the client optimiser is vascdist's own (SGD, AdaBound...)
    merged.setdefault("steps_per_print", 2 ** 31)  # vascdist logs; DeepSpeed's progress lines would duplicate it
    return merged


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(given, bool):
        return given is value
    if isinstance(value, (int, float)) and isinstance(given, (int, float)):
        return float(given) == float(value)
    return given == value


# --------------------------------------------------------------------------------------------- runtime
def import_deepspeed(env: DistEnv):
    """Import deepspeed for `env.device` without JIT-building anything, and check the accelerator it picked."""
    if env.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at the first get_accelerator()
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # DeepSpeed asserts it (srun without torchrun lacks it)
    deepspeed_internals.check_version()
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    deepspeed_internals.disable_shm_comm(deepspeed.ops)
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.setLevel(logging.WARNING)  # its INFO lines dump the whole config on every rank
    if not any(isinstance(f, _ExpectedWarnings) for f in ds_logger.filters):
        ds_logger.addFilter(_ExpectedWarnings())
    accelerator = get_accelerator().device_name()
    if accelerator != env.device.type:
        raise VascdistError(f"DeepSpeed picked the '{accelerator}' accelerator but vascdist runs on "
                            f"{env.device.type} (train.device); set DS_ACCELERATOR={env.device.type}")
    return deepspeed


class _ExpectedWarnings(logging.Filter):
    """Drops DeepSpeed's per-rank warning about a ZeRO client optimiser it has not tested (SGD, AdaBound ...):
    vascdist always passes its own optimiser, and the tests compare ZeRO against DDP step by step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


class DeepSpeedEngine:
    """deepspeed.initialize around vascdist's module and optimiser, driven by the loop's calls (engines.Engine).

    The loop calls backward() grad_accum times, then step() once. DeepSpeed counts micro-steps itself and
    wants step() after every backward: backward() calls it between micro-batches (no update there), and
    step() makes the call on the accumulation boundary, where DeepSpeed reduces, clips and updates.
    """

    name = "deepspeed"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
        check_deepspeed_options(cfg)  # also run by check_config, before any work; here for direct callers
        ds_config = build_deepspeed_config(cfg, env.world_size, env.device)
        deepspeed = import_deepspeed(env)
        ensure_process_group(env)
        if ds_config["bf16"]["enabled"]:
            # DeepSpeed casts parameters to bf16 but not buffers, and batch_norm refuses bf16 weights with fp32
            # running statistics; cast both here (in place: the optimiser's parameter references stay valid).
            module.to(torch.bfloat16)
        self._ds, wrapped, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module, self.optimizer, self.cfg, self.env = module, optimizer, cfg, env
        self.zero_stage = cfg.dist.zero_stage
        # Stage 0 in fp32 steps the client optimiser itself: DeepSpeed clips there but reports no norm and
        # has no overflow check, so step() measures the norm and skip() drops the gradients itself.
        self._plain = wrapped is optimizer
        if not self._plain and wrapped.param_groups is not optimizer.param_groups:
            raise VascdistError(f"DeepSpeed's {type(wrapped).__name__} does not step vascdist's optimiser param "
                                "groups, so the lr schedule would not reach it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward, through DeepSpeed's engine (its hooks, its dtype)."""
        return self._ds(x)

    def micro_step_context(self, is_last: bool) -> contextlib.AbstractContextManager:
        """DeepSpeed decides itself when to reduce gradients (its own micro-step count)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; `loss` is already divided by grad_accum, so DeepSpeed must not divide again."""
        # x * (1 + 0 * x) is x bit for bit when x is finite and NaN otherwise: a non-finite loss then always gives
        # non-finite gradients, which DeepSpeed's overflow check in skip() relies on.
        loss = loss * (1 + 0 * loss.detach())
        self._ds.backward(loss, scale_wrt_gas=False)
        if not self._ds.is_gradient_accumulation_boundary():
            self._ds.step()  # only advances DeepSpeed's micro-step counter

    def step(self, want_norm: bool = True) -> float:
        """Reduce, clip (gradient_clipping), update, zero the grads; returns the global gradient norm before clipping
        (DeepSpeed computes it anyway under ZeRO; without ZeRO only when `want_norm`)."""
        self._check_boundary()
        norm = grad_norm(self.module) if self._plain and want_norm else None
        self._ds.step()
        if norm is None and want_norm and not self._plain:
            norm = self._ds.get_global_grad_norm()
        self._sync_buffers()
        return math.nan if norm is None else float(norm)

    def skip(self) -> None:
        """Drop this step's gradients (some rank's loss was not finite); weights and optimiser state stay as they are."""
        self._check_boundary()
        if self._plain:
            # DeepSpeed would step the client optimiser with no overflow check (and its clipping fails on no
            # gradients), so drop the gradients here and count the step as skipped, as its step() would.
            self._ds.zero_grad()
            deepspeed_internals.count_skipped_step(self._ds)
        else:
            # ZeRO and bf16 optimisers keep reduced gradients in their own buffers and clear them only in step(),
            # which sees the non-finite gradients that backward() made sure of and skips the update as an overflow.
            self._ds.step()
            if self._ds.was_step_applied():
                raise VascdistError("DeepSpeed applied an update that vascdist asked it to skip (non-finite loss)")
        self._sync_buffers()

    def _check_boundary(self) -> None:
        if not self._ds.is_gradient_accumulation_boundary():
            raise VascdistError(f"DeepSpeed is not at a gradient accumulation boundary (micro step {deepspeed_internals.micro_step(self._ds)},"
                                f" gradient_accumulation_steps={self._ds.gradient_accumulation_steps()}): "
                                "backward() must run train.grad_accum times per step")

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm running statistics on every rank (DDP does this each forward; DeepSpeed never),
        so that all ranks evaluate the model the checkpoint holds."""
        broadcast_buffers(self.module, self.env)

    def state_dict(self) -> dict:
        """Full model weights (replicated under ZeRO 0-2); the optimiser state lives in the DeepSpeed directory."""
        return EngineState(self.name, self.module.state_dict(), zero_stage=self.zero_stage).to_dict()

    def save_checkpoint(self, manager: CheckpointManager, step: int, state: dict, is_best: bool = False) -> None:
        """Every rank writes its DeepSpeed partition; then rank 0 writes the step file that marks both complete."""
        root, tag = deepspeed_root(manager.directory), deepspeed_tag(step)
        # a crashed attempt's leftover: never mix its files with this save
        on_main(self.env, shutil.rmtree, root / tag, ignore_errors=True)
        barrier(self.env)
        try:
            self._ds.save_checkpoint(str(root), tag=tag, save_latest=False)
        except (OSError, RuntimeError) as exc:
            self._refuse_if_disk_full(exc, root / tag)
            raise
        barrier(self.env)  # every partition is on disk before the step file claims it

        def write_step_file() -> None:
            fsync_tree(root / tag)
            try:
                manager.save(step, with_deepspeed_tag(state, tag), is_best=is_best)
            except VascdistError:  # e.g. a full disk under the step file: no step file claims this tag, drop it
                shutil.rmtree(root / tag, ignore_errors=True)
                raise
            prune_deepspeed_tags(manager)
        on_main(self.env, write_step_file)

    @staticmethod
    def _refuse_if_disk_full(exc: BaseException, tag_dir: Path) -> None:
        """A full disk under DeepSpeed's own writes is one line; the half-written tag directory is removed, so the
        previous step file and its tag stay the last checkpoint. torch.save reports a full disk as a RuntimeError
        ('file write failed' from its zip writer), not as ENOSPC, hence the free-space probe taken before clean-up."""
        full = disk_full(exc) or shutil.disk_usage(tag_dir.parent).free < 16 * 2**20
        if not full:
            return
        shutil.rmtree(tag_dir, ignore_errors=True)
        raise VascdistError(disk_full_message(tag_dir)) from None

    def load_checkpoint(self, manager: CheckpointManager, path: str | Path) -> SavedCheckpoint:
        """Every rank reads the step file and loads weights plus its optimiser partition from the tag directory."""
        path = Path(path)
        saved = manager.read(path)
        engine = saved.engine
        if engine.name != self.name:
            raise VascdistError(f"checkpoint '{path}' was written by dist.engine={engine.name}; resume it with "
                                "that engine (its optimiser state is not in DeepSpeed's format)")
        if engine.zero_stage != self.zero_stage or saved.world_size != self.env.world_size:
            raise VascdistError(f"checkpoint '{path}' holds ZeRO-{engine.zero_stage} state of {saved.world_size} "
                                f"ranks; resume it with dist.zero_stage={engine.zero_stage} on {saved.world_size} "
                                f"ranks (now {self.zero_stage} on {self.env.world_size})")
        if engine.deepspeed_tag is None:
            raise VascdistError(f"checkpoint '{path}' names no DeepSpeed directory (written before its partitions)")
        tag_dir = deepspeed_root(path.parent) / engine.deepspeed_tag
        if not tag_dir.is_dir():
            raise VascdistError(f"checkpoint '{path}' has no DeepSpeed directory '{tag_dir}' (pruned or not copied)")
        try:
            loaded, _ = self._ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False, load_module_strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:  # another architecture or optimiser than the checkpoint's
            raise ConfigError(f"checkpoint {path} does not fit this run's model or optimiser "
                              f"({str(exc).strip().splitlines()[0][:200]}); resume it with the config it was "
                              "trained with") from None
        if loaded is None:
            raise VascdistError(f"DeepSpeed could not load '{tag_dir}'")
        return saved
