"""`vascdist cv`: patient-level stratified k-fold or leave-one-site-out cross-validation, locally or as a SLURM job array.

    vascdist cv quickstart --folds 5 [--repeats 2] [--seed 0] [--out DIR] [overrides]
    vascdist cv configs/physionet2016.yaml --group-by site [overrides]          # train on the other sites, test on one
    vascdist cv quickstart --folds 5 --submit --nodes 1 --time 120 [--wait]     # one array task per fold
    vascdist cv --report DIR                                                    # aggregate (again)

Each fold is a normal run directory under the CV directory (vascdist/cv/run.py); the aggregate (per-fold
metrics, mean and spread, pooled out-of-fold metrics with bootstrap intervals) is printed, written to
aggregate.json, and summarised in report.html.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from vascdist.errors import VascdistError

if TYPE_CHECKING:
    from vascdist.cv.results import CvResult


def build_parser() -> argparse.ArgumentParser:
    from vascdist.launch.cv_jobs import add_submit_options
    p = argparse.ArgumentParser(prog="vascdist cv", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("config", nargs="?", default=None, help="YAML file or shipped config name; default quickstart")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every fold")
    p.add_argument("--group-by", choices=["patient", "site"], default="patient",
                   help="what a fold holds out: patients (stratified k-fold, the default) or a whole site "
                        "(leave-one-site-out over the manifest's `site` column)")
    p.add_argument("--folds", type=int, default=None,
                   help="k of k-fold (default 5; patients per class must be at least k); not with --group-by site")
    p.add_argument("--repeats", type=int, default=1, help="repeat the k-fold with other shuffles")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--out", default=None, help="CV directory (default <run.out_dir>/<run.name>/cv-<time>); "
                                               "an existing one with the same options is resumed")
    p.add_argument("--report", metavar="DIR", default=None, help="only aggregate the CV directory DIR")
    p.add_argument("--submit", action="store_true", help="run the folds as a SLURM job array (submitit)")
    p.add_argument("--wait", action="store_true", help="with --submit: wait for the array, then aggregate")
    p.add_argument("--verbose", action="store_true", help="progress bars of the fold runs")
    add_submit_options(p)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    from vascdist.launch.submit import parse_with_overrides
    return parse_with_overrides(build_parser(), argv)


def report(cv_dir) -> CvResult:
    """Aggregate, print, and write report.html; returns the aggregate."""
    from vascdist.cv.aggregate import aggregate, format_aggregate
    from vascdist.report import write_report
    result = aggregate(cv_dir)
    print(format_aggregate(result), flush=True)
    print(f"report: {write_report(cv_dir)}", flush=True)
    return result


def main(argv: list[str]) -> int:
    """`vascdist cv ...`; returns the exit code (1 when a fold is missing)."""
    args = parse_args(argv)
    if args.report:
        return 0 if not report(args.report).missing else 1
    from vascdist.cv.run import make_plan, run_local
    if args.group_by == "site" and (args.folds is not None or args.repeats != 1):
        raise VascdistError("--group-by site makes one fold per site; --folds and --repeats apply to --group-by patient")
    cv_dir, plan = make_plan(args.config, args.overrides, args.folds or 5, args.repeats, args.seed, args.out,
                             args.group_by)
    print(f"cross-validation directory: {cv_dir} ({len(plan['entries'])} folds)", flush=True)
    from vascdist.data.shards import load_index
    from vascdist.eval.sites import class_mix, confound_warning
    warning = confound_warning(class_mix(load_index(plan["shards"])))
    if warning:  # the confound that lets a model learn the site: said before hours of training
        print(f"vascdist cv: {warning}", file=sys.stderr, flush=True)
    if args.submit:
        from vascdist.launch.cv_jobs import submit_folds, wait_and_name_failures
        from vascdist.fileio import atomic_write_json
        from vascdist.train.layout import CvLayout
        layout = CvLayout(cv_dir)
        todo = [e for e in plan["entries"] if not layout.fold(e["dir"]).test_metrics.is_file()]
        if not todo:
            print("every fold has finished already")
        else:
            jobs = submit_folds(args, cv_dir, plan, todo)
            if not args.wait:
                print(f"when the array is done: vascdist cv --report {cv_dir}")
                return 0
            from vascdist.config import load_config
            metric = load_config(plan["config"], plan["overrides"]).train.early_stop_metric
            atomic_write_json(layout.failures, wait_and_name_failures(jobs, todo, cv_dir, metric))
    else:
        run_local(cv_dir, plan, quiet=not args.verbose)
    return 0 if not report(cv_dir).missing else 1


__all__ = ["main"]
