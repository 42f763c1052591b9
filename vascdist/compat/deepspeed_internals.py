"""Every use of DeepSpeed's private API in vascdist, behind one version check.

vascdist drives DeepSpeed's engine from its own loop and touches two internals: the shared-memory op table
(`deepspeed.ops.__compatible_ops__`) and the engine's step counters (`micro_steps`, `global_steps`,
`skipped_steps`). Both were read off deepspeed 0.19; another release may rename them, so import fails early.
"""

from __future__ import annotations

from vascdist.compat import require_minor

TESTED = "0.19"


def check_version() -> str:
    """The installed deepspeed version, or VascdistError naming what vascdist needs it for."""
    return require_minor("deepspeed", TESTED, "its engine step counters and op table (vascdist/compat/deepspeed_internals.py)")


def disable_shm_comm(deepspeed_ops) -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a minute of g++ per machine) that only
    its inference all-reduce uses; marking it incompatible keeps training on plain gloo collectives."""
    deepspeed_ops.__compatible_ops__["deepspeed_shm_comm"] = False


def count_skipped_step(engine) -> None:
    """Advance the engine's counters as its own step() does for an overflow-skipped step (no update)."""
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.skipped_steps += 1


def micro_step(engine) -> int:
    """The engine's micro-step counter (for error messages)."""
    return engine.micro_steps
