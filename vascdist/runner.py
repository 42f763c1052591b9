"""What `vascdist train` runs, in whichever process launched it (plain, torchrun, srun, submitit):
resolve the config, make sure the data exist, pick the run directory, train, report, clean up."""

from __future__ import annotations

import difflib
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vascdist.config import DEFAULT_CONFIG, Config, batch_sizes, load_config, save_config
from vascdist.config.checks import check_against_index, check_config
from vascdist.config.drift import check_resume, effective_config, record_changes
from vascdist.data.shard_format import INDEX
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_json, said_if_disk_full
from vascdist.lockfile import exclusive
from vascdist.preemption import StopSignals
from vascdist.train.layout import RunLayout, saved_step_of

if TYPE_CHECKING:  # vascdist.dist imports torch, vascdist.eval scikit-learn (seconds): loaded only once the config
    from vascdist.dist import DistEnv  # has passed its checks
    from vascdist.eval.results import RunResult, SiteRow, SplitReport

def synthesis_requested(overrides: list[str]) -> bool:
    """Whether the config's data.synth_patients applies to its data.shards: not when data.shards alone is given on
    the command line (a typo of a real path must not turn into a fresh synthetic data set)."""
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    return "data.shards" not in keys or "data.synth_patients" in keys


def ensure_data(cfg: Config, quiet: bool, may_synthesise: bool = True) -> None:
    """If the configured shards are missing and data.synth_patients > 0 (and `may_synthesise`: see
    `synthesis_requested`), synthesise and preprocess them (cached). Anything else without a shard set is refused
    in one line; a directory of shard files without index.json is never written into."""
    shards = Path(cfg.data.shards)
    if (shards / INDEX).exists():
        return
    if shards.is_dir() and any(shards.glob("shard-*.h5")):
        raise VascdistError(f"data.shards '{shards}' holds shard files but no index.json (preprocessing did not "
                            f"finish, or it was deleted); rebuild it with `vascdist preprocess --out {shards} "
                            "--overwrite`, or remove it")
    if cfg.data.synth_patients <= 0 or not may_synthesise:
        raise VascdistError(f"data.shards '{shards}' holds no shard set{did_you_mean(shards)}; run `vascdist "
                            f"preprocess --out {shards}` first" + ("" if cfg.data.synth_patients <= 0 else
                            ", or give data.synth_patients too to synthesise a data set there"))
    from vascdist.data.preprocess import preprocess
    from vascdist.data.synth import synthesize
    raw = shards.parent / "recordings"
    if not quiet:
        print(f"synthesising {cfg.data.synth_patients} patients into {raw} (seed {cfg.data.synth_seed})", flush=True)
    manifest = synthesize(raw, n_patients=cfg.data.synth_patients, seed=cfg.data.synth_seed,
                          sample_rate=cfg.preprocess.audio.sample_rate)
    preprocess(manifest, shards, cfg.preprocess, workers=2, progress=not quiet,
               progress_interval_s=cfg.run.progress_interval_s)


def did_you_mean(path: Path) -> str:
    """" (did you mean 'data/shards'?)" when the first missing part of `path` has a near name beside it."""
    missing = path
    while missing.parent != missing and not missing.parent.exists():
        missing = missing.parent
    if missing.exists():
        return ""
    try:
        names = [p.name for p in missing.parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(missing.name, names, n=1)
    return f" (did you mean '{missing.parent / close[0] / path.relative_to(missing)}'?)" if close else ""


def check_splits(cfg: Config, index: dict, env: DistEnv) -> None:
    """Refuse splits whose metrics would be undefined (before the run directory exists); state the weaker ones."""
    from vascdist.data.splits import split_problems
    where = f"data.shards '{cfg.data.shards}'" + (f" with data.split_file '{cfg.data.split_file}'"
                                                  if cfg.data.split_file else "")
    problems = split_problems(index, cfg.eval.min_patients_per_class)
    for problem in problems:
        if problem.fatal:
            raise VascdistError(f"{where}: {problem.text}, so its metrics would be undefined; rebuild the set from "
                                "more patients or with other preprocess.split fractions")
    for problem in problems if env.is_main else []:  # on stdout: stderr is for what ends a run
        print(f"note: {where}: {problem.text}", flush=True)


def pick_run_dir(cfg: Config, resume: str | None, run_dir: str | None) -> Path:
    """runs/<name>/<time>/; with --resume auto, the newest run of that name that has checkpoints."""
    if run_dir:
        return Path(run_dir)
    newest = RunLayout.newest_with_checkpoints(cfg.run.out_dir, cfg.run.name) if resume == "auto" else None
    return (newest or RunLayout.create_new(cfg.run.out_dir, cfg.run.name)).root


def claim_run_dir(cfg: Config, resume: str | None, run_dir: str | None, stack: ExitStack) -> Path:
    """`pick_run_dir`'s directory, locked by this process until `stack` closes (the training's whole life): a
    second writer (a run of the same directory, a --resume auto beside a live run) is refused before it writes."""
    layout = RunLayout(pick_run_dir(cfg, resume, run_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    stack.enter_context(exclusive(layout.lock, f"{layout.root}: another training is writing this run directory",
                                  "wait for it to end, or start a new run (without --resume, or another --run-dir)"))
    return layout.root


def forget_if_unused(layout: RunLayout) -> None:
    """Remove a run directory that holds nothing but its lock (a start refused after it was claimed)."""
    if {p.name for p in layout.root.iterdir()} <= {layout.lock.name}:
        layout.lock.unlink(missing_ok=True)
        layout.root.rmdir()


def sites_of_test(layout: RunLayout, index: dict, report: SplitReport, cfg: Config) -> dict[str, SiteRow]:
    """Per-site metrics with intervals of the test predictions the loop saved (vascdist.eval.sites), at the test
    report's thresholds."""
    import numpy as np
    from vascdist.eval.sites import split_sites
    with np.load(layout.test_predictions) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return split_sites(arrays, index, report.thresholds, cfg.eval)


def site_lines(report: SplitReport) -> list[str]:
    """The per-site table of a report and the class-mix warning, as lines (none without sites)."""
    from vascdist.eval.sites import confound_warning
    from vascdist.eval.table import format_sites
    if not report.sites:
        return []
    warning = confound_warning({site: row.counts for site, row in report.sites.items()})
    return [format_sites(report.sites, report.confidence)] + ([warning] if warning else [])


def test_summary(result: RunResult) -> str:
    """What `vascdist train` prints for a finished run: the test table, the per-site table and the TensorBoard
    command (the run directory was printed once, at the start)."""
    from vascdist.eval.table import split_summary
    return "\n".join([split_summary(result.test, result.best_step), *site_lines(result.test),
                      where_to_look(result.run_dir, name_it=False)])


def where_to_look(run_dir: str | Path, name_it: bool = True) -> str:
    """The line after a summary: the run directory (unless it was printed already) and its TensorBoard command."""
    board = f"tensorboard --logdir {RunLayout(run_dir).tensorboard}"
    return f"run directory: {run_dir}  ({board})" if name_it else board


def prepare_run_dir(cfg: Config, layout: RunLayout, resume: str | None) -> str | None:
    """The checkpoint file `resume` picks (None: a fresh start), after checking the change of config it makes.

    A resume may only make safe changes (recorded in the config history); a new run writes config.yaml, and the
    original is never rewritten. Runs on global rank 0 (it creates the run directory).
    """
    from vascdist.train.state import resolve_resume
    resume_from = resolve_resume(resume, layout.checkpoints) if resume else None
    origin = resume_from.parent.parent if resume_from else None  # <run>/checkpoints/step-*.pt
    previous = effective_config(origin) if origin else None
    changes = check_resume(cfg, previous) if previous is not None else {}
    if resume == "auto" and resume_from is None:  # a SLURM job's first attempt starts this way: never silently
        print(f"--resume auto: no earlier checkpoint of this run to resume; starting a new run in {layout.root}",
              flush=True)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.config.exists():
        save_config(cfg, layout.config)
    elif changes:
        record_changes(layout.root, saved_step_of(resume_from), changes)
    print(f"run directory: {layout.root}", flush=True)
    return str(resume_from) if resume_from else None


def conclude(cfg: Config, index: dict, layout: RunLayout, result: RunResult,
             after_stop: Callable[[int], str] | None) -> RunResult:
    """Rank 0 after training: a stopped run says where its checkpoint is and follows the launcher's requeue policy
    (`after_stop`); a finished one writes test_metrics.json (with what preprocessing excluded and the metrics per
    site), prints the test table and writes the report. Returns the result with that final test report."""
    if result.stopped:
        print(f"stopped at step {result.step} ({result.signal or 'requested'}); "
              f"checkpoint saved in {layout.checkpoints}; continue with --resume auto", flush=True)
        if after_stop is not None:
            print(after_stop(cfg.dist.max_requeues), flush=True)
        return result
    from vascdist.data.folds import split_index
    from vascdist.data.shards import excluded_counts
    from vascdist.eval.results import Excluded
    report = result.test.with_excluded(Excluded.from_fields(
        excluded_counts(split_index(cfg.data.shards, cfg.data.split_file), "test")))
    if index["kind"] == "spectrogram":
        report = report.with_sites(sites_of_test(layout, index, report, cfg))
    with said_if_disk_full(layout.test_metrics):
        atomic_write_json(layout.test_metrics, report.to_record())
    result = result.with_report(report)
    print(test_summary(result), flush=True)
    from vascdist.report import write_report
    print(f"report: {write_report(layout.root)}", flush=True)
    return result


def run_training(config: str | None, overrides: list[str], resume: str | None = None, run_dir: str | None = None,
                 quiet: bool = False, stop_requested: Callable[[], bool] = lambda: False,
                 env: DistEnv | None = None, after_stop: Callable[[int], str] | None = None) -> RunResult:
    """Check, parse, build, train, report; the process group is torn down on every exit path.

    `after_stop` is the launcher's requeue policy (vascdist.launch.requeue): after a stop signal, once the
    checkpoint is saved, global rank 0 calls it with dist.max_requeues and logs the line it returns.

    Everything that needs only the config is checked before anything is imported, synthesised or written;
    what needs the shards' index right after it is read, before the run directory exists.
    """
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    check_config(cfg)
    from vascdist.dist import init_distributed, run_on_main, shutdown
    from vascdist.train.precision import use_deterministic_kernels
    use_deterministic_kernels(cfg.train.deterministic)  # before the first CUDA kernel (the memory check's forward)
    own_env = env is None
    env = env or init_distributed(cfg.train.device, cfg.dist.timeout_s)
    lock = ExitStack()  # rank 0's lock of the run directory, held until the training's end
    try:
        batch_sizes(cfg.data.batch_size, env.world_size, cfg.train.grad_accum)  # before any data or run dir is made
        if cfg.dist.engine == "deepspeed":  # a contradicting DeepSpeed JSON fails before any data or run dir is made
            from vascdist.train.deepspeed_engine import build_deepspeed_config
            build_deepspeed_config(cfg, env.world_size, env.device)
        run_on_main(env, lambda: ensure_data(cfg, quiet, synthesis_requested(overrides)))  # its error reaches every rank
        from vascdist.data.folds import split_index
        index = split_index(cfg.data.shards, cfg.data.split_file)
        check_against_index(cfg, index, env.world_size)
        check_splits(cfg, index, env)
        if cfg.train.check_memory:
            from vascdist.train.memory import check_memory
            check_memory(cfg, index, env)
        layout = RunLayout(run_on_main(env, lambda: str(claim_run_dir(cfg, resume, run_dir, lock))))
        try:
            resume_from = run_on_main(env, lambda: prepare_run_dir(cfg, layout, resume))  # every rank stops alike
        except VascdistError:
            if env.is_main:
                forget_if_unused(layout)
            raise
        path = layout.root
        from vascdist.train.loop import train
        with StopSignals((cfg.dist.requeue_signal, "TERM")) as signals:
            result = train(cfg, env, path, resume=resume_from, quiet=quiet,
                           stop_requested=lambda: signals.requested() or stop_requested())
        result = replace(result, signal=signals.received.name if signals.received else None)
        if result.complete:
            if env.is_main:
                print(f"{layout.root}: the run is complete ({result.finished}); its test table is in "
                      f"{layout.test_metrics}, its report in {layout.report}", flush=True)
            return result
        if env.is_main:  # rank 0 alone reports and requeues
            result = conclude(cfg, index, layout, result, after_stop)
        return result
    finally:
        lock.close()
        if own_env:
            shutdown(env)
