"""Everything distributed lives here: reading the launcher's environment, the process group, devices,
collectives the loop needs, and rank-0-only side effects. Other modules get a `DistEnv` as a plain argument.

Launchers understood (first match wins):
  torchrun / torch.distributed.run: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  srun without torchrun:            SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_JOB_NODELIST
                                    as master, port derived from SLURM_JOB_ID (every task agrees without talking)
  otherwise:                        a single process
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from vascdist.errors import ConfigError, VascdistError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: str = "single"  # 'single', 'torchrun' or 'slurm'
    local_world_size: int = 1  # ranks on this host (they share its memory)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('n[1-2],gpu07' -> 'n1'); scontrol when present, else parsed here."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass  # containers often lack scontrol (submitit issue 1601): parse the common forms ourselves
    match = re.match(r"([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not match:
        raise VascdistError(f"cannot parse SLURM_JOB_NODELIST '{nodelist}'")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def slurm_master_port(job_id: str) -> int:
    """A port every task of the job derives alike (the submitit convention), in 20000-29999."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 10000


def local_world_size(environ: dict | None = None) -> int:
    """Ranks on this host: torchrun's LOCAL_WORLD_SIZE, else SLURM's SLURM_NTASKS_PER_NODE, else 1."""
    env = os.environ if environ is None else environ
    return int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1")) or 1)


def read_launch_env(environ: dict | None = None) -> tuple[str, int, int, int]:
    """(launcher, rank, world_size, local_rank) from the environment; sets MASTER_* for srun tasks."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_NODELIST" in env:
        env.setdefault("MASTER_ADDR", first_slurm_host(env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(slurm_master_port(env.get("SLURM_JOB_ID", "0"))))
        return "slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return "single", 0, 1, 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise VascdistError("train.device=cuda but no CUDA device is visible")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def rendezvous_store(rank: int, world_size: int, timeout: datetime.timedelta) -> torch_dist.Store:
    """The key-value store ranks meet in, with a prefix per torchrun restart attempt.

    After an elastic restart torchrun hands the workers the same agent store again, and the process group's
    keys from the failed attempt are still in it: gloo then dials the dead workers' addresses and init fails
    with 'connectFullMesh ... Connection refused' (seen with torch 2.11). A prefix per attempt avoids them.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = torch_dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                is_master=not agent_store and rank == 0, timeout=timeout)
    return torch_dist.PrefixStore(f"vascdist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(device_preference: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Set up the process group (NCCL on CUDA, gloo on CPU) from whatever launched us."""
    launcher, rank, world_size, local_rank = read_launch_env()
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            _init_process_group(backend, store=rendezvous_store(rank, world_size, timeout), rank=rank,
                                world_size=world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        except Exception as exc:  # a rendezvous that never completes ends here after the timeout
            raise VascdistError(f"rank {rank}/{world_size}: process group init failed via "
                                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({exc})") from None
    return DistEnv(rank, world_size, local_rank, device, launcher, local_world_size())


def _init_process_group(backend: str, **kwargs) -> None:
    """torch's init_process_group, with torch.distributed.nn imported first.

    torch.distributed.nn.functional's collectives take `group=group.WORLD` as a default argument, evaluated at
    import. DistributedDataParallel imports that module (through torch._dynamo); imported after the default group
    exists, its defaults hold that group for good: destroy_process_group cannot free it, and gloo's threads live on
    into interpreter finalization, where a thread that takes the GIL aborts the process with "terminate called
    without an active exception" (exit -6: a worker that finished its work fails its torchrun or SLURM job now and
    then). Imported before, the defaults are None, and shutdown() joins those threads.
    """
    import torch.distributed.nn  # noqa: F401 (see above; fast: torch.distributed is loaded already)
    torch_dist.init_process_group(backend, **kwargs)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group while the interpreter is fully alive, so that its threads are joined here."""
    if env.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        torch_dist.barrier()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if `flag` is True on any (one small all-reduce)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def global_mean(value: torch.Tensor, env: DistEnv) -> float:
    """Mean of a scalar over all ranks (one all-reduce); NaN/inf on any rank makes it non-finite everywhere,
    so the same value serves the log (the global loss) and the NaN guard (all ranks skip together)."""
    t = value.detach().float().reshape(1)
    if env.distributed:
        t = t.clone()
        torch_dist.all_reduce(t)
        t /= env.world_size
    return float(t.item())


def gather_arrays(arrays: dict[str, np.ndarray], env: DistEnv) -> dict[str, np.ndarray]:
    """Concatenate each rank's arrays in rank order on every rank (exact metrics: raw scores, not averages)."""
    if not env.distributed:
        return arrays
    parts: list = [None] * env.world_size
    torch_dist.all_gather_object(parts, arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value of `obj` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(env: DistEnv, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs) on global rank 0 only (a rank-0-only side effect); None elsewhere."""
    return fn(*args, **kwargs) if env.is_main else None


def main_print(env: DistEnv, text: str) -> None:
    """Print (flushed) on global rank 0 only."""
    if env.is_main:
        print(text, flush=True)


def run_on_main(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """Rank 0 runs fn() while the others wait; its result, or its VascdistError, reaches every rank.

    A rank-0 failure while the others wait in a barrier would leave them there until the launcher
    kills them; here they raise the same one-line error at once.
    """
    outcome: tuple[str, Any] = ("ok", None)
    if env.is_main:
        try:
            outcome = ("ok", fn())
        except VascdistError as exc:
            outcome = ("error", str(exc))
    outcome = broadcast_object(outcome, env)
    if outcome[0] == "error":
        raise VascdistError(outcome[1])
    return outcome[1]


# --------------------------------------------------------------------------------------------- wrapping
def wrap_ddp(module: nn.Module, env: DistEnv, dist_cfg) -> nn.Module:
    """DistributedDataParallel around `module` with dist.bucket_cap_mb, gradient_as_bucket_view, static_graph."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   bucket_cap_mb=dist_cfg.bucket_cap_mb,
                                   gradient_as_bucket_view=dist_cfg.gradient_as_bucket_view,
                                   static_graph=dist_cfg.static_graph)


def convert_sync_batchnorm(module: nn.Module, env: DistEnv) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over all ranks) when several ranks run; unchanged for one."""
    if not env.distributed:
        return module
    if env.device.type != "cuda":
        raise ConfigError("dist.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on CPU); "
                          "use model.norm=group for batch-size-independent normalisation on CPU")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def ensure_process_group(env: DistEnv) -> None:
    """A process group even for one process (DeepSpeed needs one; vascdist itself makes one only for several)."""
    if not torch_dist.is_initialized():
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        _init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if env.distributed:
        for buffer in module.buffers():
            torch_dist.broadcast(buffer, src=0)
