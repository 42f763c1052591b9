"""`vascdist bench ...`: benchmarks of the loader, training step, cost growth, distributed overhead, start-up
time and the evaluation bootstrap; and `vascdist bench gpu`, the whole GPU check in one command.

Each sub-command lives in its own module and prints one table; BENCHMARKS.md records the commands and results.
"""

from __future__ import annotations

import argparse

from vascdist.bench import abstain, bootstrap, checkpoint, dist, gpu, load, loader, makeshards, preprocess, scaling, startup, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vascdist bench", description=__doc__)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default). On a shared or small CPU host 1 gives "
                             "stable timings: idle OpenMP threads spin, and a descheduled one stalls the others")
    sub = parser.add_subparsers(dest="bench", required=True)
    for module in (loader, train, makeshards, scaling, preprocess, checkpoint, dist, startup, bootstrap, load, gpu,
                   abstain):
        module.add_parser(sub)
    return parser


def main(argv: list[str]) -> int:
    """Run one benchmark; returns the exit code (VascdistError is turned into one line by the vascdist CLI)."""
    import torch

    args = build_parser().parse_args(argv)
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    finally:
        torch.set_num_threads(before)  # callers in the same process (tests) keep their setting


__all__ = ["main"]
