"""Planning and running a cross-validation (patient-level k-fold, or leave-one-site-out with --group-by site): one
split file and one normal run directory per fold.

    CV_DIR/cv.json                  the plan: config, overrides, folds, repeats, seed, one entry per fold
    CV_DIR/splits/r0-f1.json        fold 1 of repeat 0 as a split file (vascdist/data/folds.py)
    CV_DIR/r0-f1/                   that fold's run directory (checkpoints, tb, metrics.jsonl, test_* files)
                                    (leave-one-site-out: CV_DIR/site-<name>.json and CV_DIR/site-<name>/)
    CV_DIR/failures.json            why a fold failed, when it failed here (local runs)
    CV_DIR/aggregate.json, report.html

A fold is `vascdist train CONFIG OVERRIDES data.split_file=CV_DIR/splits/<fold>.json --run-dir CV_DIR/<fold>`,
run here one after another, or as one task of a SLURM job array (vascdist.launch.cv_jobs); either way it is
preemptible and resumable like any run (re-running `vascdist cv` with the same --out resumes unfinished folds).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from vascdist.config import DEFAULT_CONFIG, load_config
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_json
from vascdist.train.layout import CvLayout


GROUPINGS = ("patient", "site")  # --group-by: what a fold holds out


def fold_name(repeat: int, fold: int, site: str | None = None) -> str:
    """r<repeat>-f<fold>, or site-<name> for leave-one-site-out (a name safe as a file name)."""
    if site is None:
        return f"r{repeat}-f{fold}"
    return "site-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in site)


def make_plan(config: str | None, overrides: list[str], folds: int, repeats: int, seed: int,
              out: str | None, group_by: str = "patient") -> tuple[Path, dict]:
    """Make the data if needed, write the split files and cv.json; an existing plan must match the options.

    group_by "patient": stratified patient-level k-fold (`folds` x `repeats`); "site": leave-one-site-out, one
    fold per site of the shards (`folds` and `repeats` are then the number of sites and 1)."""
    if group_by not in GROUPINGS:
        raise VascdistError(f"--group-by {group_by}: must be one of {', '.join(GROUPINGS)}")
    from vascdist.runner import ensure_data, synthesis_requested
    if any(o.split("=", 1)[0].strip() == "data.split_file" for o in overrides):
        raise VascdistError("`vascdist cv` writes data.split_file for every fold itself; do not override it")
    config = config or DEFAULT_CONFIG
    cfg = load_config(config, overrides)
    cv_dir = Path(out) if out else Path(cfg.run.out_dir) / cfg.run.name / f"cv-{time.strftime('%Y%m%d-%H%M%S')}"
    cv_dir = cv_dir.resolve()
    wanted = {"config": config, "overrides": list(overrides), "folds": folds, "repeats": repeats, "seed": seed,
              "group_by": group_by}
    layout = CvLayout(cv_dir)
    if layout.plan.is_file():
        plan = json.loads(layout.plan.read_text())
        plan.setdefault("group_by", "patient")  # plans written before --group-by existed
        if group_by == "site":
            wanted.update(folds=plan["folds"], repeats=1)  # set by the shards' sites
        differs = [k for k, v in wanted.items() if plan.get(k) != v]
        if differs:
            raise VascdistError(f"{cv_dir} holds a cross-validation with other {', '.join(differs)}; "
                                "give another --out, or the same options to resume it")
        return cv_dir, plan
    from vascdist.config.checks import check_config
    check_config(cfg)  # a config error is named before any data are made (and before torch is imported)
    ensure_data(cfg, quiet=False, may_synthesise=synthesis_requested(overrides))
    from vascdist.data.folds import fold_assignment, site_assignment, write_split_file  # the reader imports torch
    from vascdist.data.shards import load_index
    index = load_index(cfg.data.shards)
    val_fraction = cfg.preprocess.split.val_fraction
    if group_by == "site":
        parts = site_assignment(index, seed, val_fraction)
        wanted.update(folds=len(parts), repeats=1)
    else:
        parts = fold_assignment(index, folds, repeats, seed, val_fraction)
    entries = []
    for part in parts:
        name = fold_name(part["repeat"], part["fold"], part.get("site"))
        split_file = layout.split_file(name)
        write_split_file(split_file, cfg.data.shards, part)
        entries.append({"name": name, "repeat": part["repeat"], "fold": part["fold"], "dir": name,
                        "split_file": str(split_file), "patients": {s: len(part[s]) for s in ("train", "val", "test")},
                        **({"site": part["site"]} if "site" in part else {})})
    plan = {**wanted, "classes": index["classes"], "shards": str(Path(cfg.data.shards).resolve()), "entries": entries}
    cv_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(layout.plan, plan)
    return cv_dir, plan


def fold_overrides(plan: dict, entry: dict) -> list[str]:
    return [*plan["overrides"], f"data.split_file={entry['split_file']}"]


def run_local(cv_dir: Path, plan: dict, quiet: bool = True) -> None:
    """Every unfinished fold in this process, one after another; a failing fold is recorded and skipped."""
    from vascdist.runner import run_training
    layout = CvLayout(cv_dir)
    failures = json.loads(layout.failures.read_text()) if layout.failures.is_file() else {}
    for entry in plan["entries"]:
        run_dir = layout.fold(entry["dir"]).root
        if layout.fold(entry["dir"]).test_metrics.is_file():
            print(f"{entry['name']}: finished before, kept", flush=True)
            continue
        print(f"{entry['name']}: training ({entry['patients']['train']} train / {entry['patients']['val']} val / "
              f"{entry['patients']['test']} test patients) in {run_dir}", flush=True)
        try:
            result = run_training(plan["config"], fold_overrides(plan, entry), resume="auto", run_dir=str(run_dir),
                                  quiet=quiet)
        except Exception as exc:  # one fold failing must not lose the others; the reason goes to the report
            failures[entry["name"]] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{entry['name']}: FAILED ({failures[entry['name']]})", flush=True)
            if not isinstance(exc, VascdistError):
                traceback.print_exc()
        else:
            if result.stopped:
                failures[entry["name"]] = f"stopped at step {result.step}; re-run `vascdist cv` to resume"
            else:
                failures.pop(entry["name"], None)
        atomic_write_json(layout.failures, failures)
