"""`vascdist` command line: parses, builds, runs, and turns VascdistError into one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vascdist.abstain import AbstainRule
from vascdist.errors import VascdistError
from vascdist.fileio import not_a_readable_file

if TYPE_CHECKING:
    from vascdist.data.provenance import Provenance
    from vascdist.eval.results import SplitReport

PREDICT_SKIPPED = 1
"""predict's exit code when --skip-bad went past files it could not read."""
PREDICT_NO_VERDICT = 3
"""predict's exit code when every file was read but some recordings got NO VERDICT (abstain.py)."""


def _require_path(path: str, what: str) -> None:
    """A missing input is said at once, before the heavy imports of the command that reads it."""
    if not Path(path).exists():
        raise VascdistError(f"{path}: {what} not found")


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write synthetic vascular-access recordings + manifest.csv")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--patients", type=int, default=40, help="number of patients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=int, default=4000)

    def run(a):
        from vascdist.data.synth import synthesize
        manifest = synthesize(a.out, n_patients=a.patients, seed=a.seed, sample_rate=a.sample_rate)
        print(f"wrote {manifest}")
    p.set_defaults(func=run)


def _add_manifest(sub) -> None:
    p = sub.add_parser("manifest", help="build manifest.csv from folder-per-class trees or the PhysioNet 2016 layout")
    p.add_argument("roots", nargs="+", metavar="ROOT",
                   help="folder with one sub-folder per class, with a REFERENCE.csv, or with training-* folders "
                        "that have one; then optional dotted overrides, e.g. preprocess.classes=[normal,abnormal]")
    p.add_argument("--out", required=True, help="manifest.csv to write")
    p.add_argument("--config", default=None, help="config whose preprocess.classes map labels")
    p.add_argument("--patient-pattern", default=None,
                   help="regex with one group that extracts the patient id from a file name")
    p.add_argument("--site", default=None,
                   help="the site (centre) of every recording (default: a PhysioNet folder's name, else none)")
    p.set_defaults(overrides=[])  # dotted overrides after the options land here (main)

    def run(a):
        from vascdist.config import load_config
        from vascdist.data.manifest import build_manifest
        roots = [r for r in a.roots if "=" not in r]
        cfg = load_config(a.config, [r for r in a.roots if "=" in r] + a.overrides)
        n = build_manifest(roots, a.out, classes=cfg.preprocess.classes, patient_pattern=a.patient_pattern,
                           site=a.site)
        print(f"wrote {a.out} ({n} recordings)")
        if not a.patient_pattern:
            print(f"vascdist manifest: WARNING: no --patient-pattern, so each of the {n} recordings is its own patient; "
                  "recordings of one patient can then land in different splits and leak between train and test. "
                  "Give the regex whose first group is the patient id, e.g. --patient-pattern '(?i)^(p\\d+)_' for "
                  "P001_left.wav, p001_right.wav (PhysioNet 2016 publishes no patient ids: there, one recording per "
                  "patient is all one can do)", file=sys.stderr)
    p.set_defaults(func=run)


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="recordings -> cardiac cycles -> log-mel spectrograms -> HDF5 shards")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest.csv (path,label,patient_id,recording_id[,split])")
    src.add_argument("--beats", help="per-beat CSV in the MIT-BIH heartbeat layout (last column: class)")
    p.add_argument("--out", required=True, help="shards directory")
    p.add_argument("--config", default=None, help="YAML config (its preprocess section is used)")
    p.add_argument("--workers", type=int, default=1, help="parallel recording workers")
    p.add_argument("--skip-bad", action="store_true", help="skip bad recordings, listing them in skipped.csv")
    p.add_argument("--overwrite", action="store_true", help="replace a finished shard set in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. preprocess.shard_size=4096")

    def run(a):
        from vascdist.config import load_config
        cfg = load_config(a.config, a.overrides)
        source = Path(a.beats or a.manifest)
        if not source.is_file():  # said before torch and h5py are imported (seconds)
            raise VascdistError(f"{source}: {'beats CSV' if a.beats else 'manifest'} not found")
        signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: the half-built set is removed, the old one kept
        if a.beats:
            from vascdist.data.beats import preprocess_beats
            index = preprocess_beats(a.beats, a.out, cfg.preprocess, overwrite=a.overwrite)
        else:
            from vascdist.data.preprocess import preprocess
            index = preprocess(a.manifest, a.out, cfg.preprocess, workers=a.workers, skip_bad=a.skip_bad,
                               progress=not a.quiet, overwrite=a.overwrite,
                               progress_interval_s=cfg.run.progress_interval_s)
        print(f"wrote {len(index['shards'])} shards to {a.out}: " +
              ", ".join(f"{s}={c['samples']}" for s, c in index["splits"].items()))
        from vascdist.data.splits import split_problems
        for problem in split_problems(index, cfg.eval.min_patients_per_class):
            print(f"vascdist preprocess: warning: {problem.text}"
                  + ("; `vascdist train` refuses this set" if problem.fatal else ""), file=sys.stderr)
        from vascdist.data.shards import site_summary
        if site_summary(index):
            print(site_summary(index))
        if index.get("excluded"):
            from vascdist.data.shards import excluded_summary
            print(excluded_summary(index, a.out), file=sys.stderr)
    p.set_defaults(func=run)


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="inspect or verify a shards directory")
    p.add_argument("action", choices=["info", "verify"])
    p.add_argument("dir")

    def run(a):
        from vascdist.data import shards
        if a.action == "info":
            print(shards.info(a.dir))
        else:
            shards.verify(a.dir)
            print(f"{a.dir}: OK")
    p.set_defaults(func=run)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*")

    def run(a):
        from vascdist.model_names import model_names  # the registry's names, read without importing torch
        print("\n".join(model_names(a.pattern)))
    p.set_defaults(func=run)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config: every key's value, default and docstring")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML file or shipped config name; default: quickstart, what `vascdist train` runs")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01")
    p.add_argument("--diff", action="store_true", help="only the keys that differ from the defaults")
    p.add_argument("--markdown", action="store_true", help="print the config reference (docs/config.md) instead")

    def run(a):
        from vascdist.config import DEFAULT_CONFIG, load_config
        from vascdist.config.checks import check_config
        from vascdist.config.reference import format_config, markdown_reference
        if a.markdown:
            print(markdown_reference(), end="")
            return
        config, overrides = a.config, list(a.overrides)
        if config is not None and "=" in config:  # `vascdist config optim.lr=0.1`: overrides only
            config, overrides = None, [config] + overrides
        if config is None:
            print(f"# config: {DEFAULT_CONFIG} (what `vascdist train` runs when given no config)")
        cfg = load_config(config or DEFAULT_CONFIG, overrides)
        check_config(cfg)
        print(format_config(cfg, diff_only=a.diff))
    p.set_defaults(func=run)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (with no arguments: the embedded quickstart, end to end)")
    p.add_argument("config", nargs="?", default=None, help="YAML file or shipped config name; default quickstart")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01 data.batch_size=128")
    p.add_argument("--resume", default=None, help="'auto' (newest loadable checkpoint of this run name) or a file")
    p.add_argument("--run-dir", default=None, help="explicit run directory (default runs/<name>/<time>/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(a):
        config, overrides = a.config, list(a.overrides)
        if config is not None and "=" in config:  # `vascdist train optim.lr=0.1`: overrides only
            config, overrides = None, [config] + overrides
        from vascdist.launch.requeue import requeue_from_environment
        from vascdist.runner import run_training
        after_stop = requeue_from_environment()
        result = run_training(config, overrides, resume=a.resume, run_dir=a.run_dir, quiet=a.quiet,
                              after_stop=after_stop)
        if result.stopped and result.signal == "SIGTERM" and after_stop is None:
            return 143  # checkpointed, not finished: `timeout` and scripts must not take it for a finished run
        return 0
    p.set_defaults(func=run)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a run or checkpoint on a split (JSON + confusion-matrix PNG)")
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--shards", default=None, help="shards directory (default: the one the run trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="metrics JSON to write (default RUN/eval-<split>.json)")

    def run(a):
        _require_path(a.run, "run directory or checkpoint")
        from vascdist.eval.table import split_summary
        from vascdist.inference import evaluate_checkpoint
        from vascdist.runner import where_to_look
        result = evaluate_checkpoint(a.run, a.shards, a.split, a.out)
        print(split_summary(result.report, result.best_step) + "\n" + where_to_look(result.run_dir))
        _print_sites(result.report)
        print(f"checkpoint: {result.checkpoint}")
        print(result.provenance.describe())
        print(f"wrote {result.json} and {result.png}")
    p.set_defaults(func=run)


def _print_sites(report: SplitReport) -> None:
    """evaluate's metrics per site (the manifest's `site` column) with intervals, and the class-mix warning."""
    from vascdist.eval.sites import confound_warning
    from vascdist.eval.table import format_sites
    sites = report.sites or {}
    if sites:
        print(format_sites(sites, report.confidence))
    warning = confound_warning({site: row.counts for site, row in sites.items()})
    if warning:
        print(warning, file=sys.stderr)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="per-cycle probabilities and a verdict for each recording")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("files", nargs="*", help="WAV (or any soundfile-readable) recordings")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--patient", default=None, help="all FILES are of this patient: add a patient-level verdict")
    p.add_argument("--manifest", default=None,
                   help="manifest CSV (path,patient_id,...): patient ids of FILES (or, without FILES, its recordings)")
    p.add_argument("--skip-bad", action="store_true",
                   help="go on past files that cannot be read; they are listed on stderr and the exit code is 1")
    p.add_argument("--min-cycles", type=int, default=AbstainRule.min_cycles,
                   help="fewest usable cycle windows a recording needs for a verdict (default %(default)s)")
    p.add_argument("--spectral-margin", type=float, default=AbstainRule.spectral_margin,
                   help="how far (x the farthest training recording's distance) a recording's per-band log-mel "
                        "may lie from the training recordings' before it gets no verdict (default %(default)s)")

    def run(a):
        _require_path(a.checkpoint, "checkpoint or run directory")
        bad = [(f, why) for f in a.files if (why := not_a_readable_file(f))]
        if bad and not a.skip_bad:
            raise VascdistError(f"{bad[0][0]}: {bad[0][1]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1
                                                               else "") + "; --skip-bad goes on past bad files")
        if a.min_cycles < 1 or not a.spectral_margin > 0:
            raise VascdistError("predict: --min-cycles must be >= 1 and --spectral-margin > 0")
        from vascdist.inference import predict, resolve_patients
        files, patients = resolve_patients(a.files, a.manifest, a.patient)
        skipped: list[dict] | None = [] if a.skip_bad else None
        results, verdicts, provenance = predict(a.checkpoint, files, patients, skipped,
                                                AbstainRule(a.min_cycles, a.spectral_margin))
        _print_predictions(provenance, results, verdicts, bool(patients), a.json)
        for s in skipped or []:
            print(f"vascdist predict: skipped {s['reason']}", file=sys.stderr)
        if skipped:
            print(f"vascdist predict: {len(skipped)} of {len(files)} files skipped", file=sys.stderr)
            return PREDICT_SKIPPED
        abstained = [r for r in results if r["verdict"] is None]
        if abstained:
            print(f"vascdist predict: NO VERDICT for {len(abstained)} of {len(results)} recordings", file=sys.stderr)
            return PREDICT_NO_VERDICT
    p.set_defaults(func=run)


def _print_predictions(provenance: Provenance, results: list[dict], verdicts: list[dict], with_patients: bool,
                       as_json: bool) -> None:
    """predict's output: JSON, or its text (predict_text.prediction_lines)."""
    import json
    if as_json:
        print(json.dumps({"recordings": results, "patients": verdicts} if with_patients else results, indent=1))
        return
    from vascdist.predict_text import prediction_lines
    print("\n".join(prediction_lines(provenance, results, verdicts)))


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="one PNG of a recording's segmentation: waveform, envelope, onsets, windows, "
                       "heart rate, periodicity, log-mel")
    p.add_argument("file", help="a recording (WAV or any soundfile-readable file)")
    p.add_argument("--config", default=None, help="YAML config whose preprocess section is used")
    p.add_argument("--out", default=None, help="PNG to write (default FILE.inspect.png beside the recording)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. preprocess.cycles.min_bpm=50")

    def run(a):
        from vascdist.config import load_config
        from vascdist.inspect import inspect_file
        cfg = load_config(a.config, a.overrides)
        print(f"wrote {inspect_file(a.file, cfg.preprocess, a.out)}")
    p.set_defaults(func=run)


def _add_env(sub) -> None:
    p = sub.add_parser("env", help="versions of the stack, extensions, devices, backends and SLURM commands "
                                   "(exit 2 when something a command needs is broken)")

    def run(a):
        from vascdist.environment import environment_report
        lines, problems = environment_report()
        print("\n".join(lines + [f"problem: {p}" for p in problems[1:]]))
        if problems:  # the first is the error line; any others are listed above it
            raise VascdistError(problems[0])
    p.set_defaults(func=run)


def _add_script(sub) -> None:
    from vascdist.launch import SCRIPTS
    p = sub.add_parser("script", help="print a shipped launch script (train.sbatch: the sbatch template; "
                                      "torchrun.sh: multi-node torchrun), or with --path where it is installed")
    p.add_argument("name", choices=SCRIPTS)
    p.add_argument("--path", action="store_true", help="print the installed file's path instead of its text")

    def run(a):
        from vascdist.launch import script_path
        path = script_path(a.name)
        print(path if a.path else path.read_text(), end="\n" if a.path else "")
    p.set_defaults(func=run)


def _add_passthrough(sub, name: str, help: str, module: str) -> None:
    """A sub-command whose own parser lives in `module.main(argv)` (bench, submit, report, cv)."""
    p = sub.add_parser(name, help=help, add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)

    def run(a):
        import importlib
        return importlib.import_module(module).main(a.args)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vascdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_manifest, _add_preprocess, _add_shards, _add_train, _add_evaluate, _add_predict,
                _add_inspect, _add_models, _add_config, _add_env, _add_script):
        add(sub)
    _add_passthrough(sub, "bench", "benchmarks (loader, train, make-shards, scaling, preprocess, checkpoint, dist, "
                     "startup, bootstrap) and the GPU check (gpu); see BENCHMARKS.md", "vascdist.bench")
    _add_passthrough(sub, "submit", "submit training to SLURM through submitit (vascdist/launch/submit.py)",
                     "vascdist.launch.submit")
    _add_passthrough(sub, "report", "one self-contained HTML report of a run or CV directory", "vascdist.report")
    _add_passthrough(sub, "cv", "patient-level k-fold cross-validation, locally or as a SLURM job array", "vascdist.cv")
    _add_passthrough(sub, "export", "the best checkpoint as ONNX + a model card JSON, checked against torch "
                     "(needs the 'export' extra)", "vascdist.export")
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options too (`train cfg --quiet optim.lr=0.1`); argparse alone stops at the option.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra and hasattr(args, "args"):  # pass-through commands parse their own options
        args.args = list(extra) + list(args.args)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = args.func(args)
    except VascdistError as exc:
        print(f"vascdist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        by = f" by {exc}" if str(exc).startswith("SIG") else ""
        print(f"vascdist {args.command}: interrupted{by}; nothing half-written was kept", file=sys.stderr)
        return 143 if by == " by SIGTERM" else 130
    except BrokenPipeError:
        # The reader of stdout went away (`vascdist shards info DIR | head`): not an error of ours. Point stdout
        # at /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command whose pipe closed
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
