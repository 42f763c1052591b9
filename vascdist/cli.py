"""`vascdist` command line: parses, builds, runs, and turns VascdistError into one line and exit code 2."""

from __future__ import annotations

import argparse
import sys

from vascdist.errors import VascdistError


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
    p = sub.add_parser("manifest", help="build manifest.csv from a folder-per-class tree or a REFERENCE.csv")
    p.add_argument("root", help="folder with one sub-folder per class, or with a REFERENCE.csv")
    p.add_argument("--out", required=True, help="manifest.csv to write")
    p.add_argument("--config", default=None, help="config whose preprocess.classes map labels")
    p.add_argument("--patient-pattern", default=None,
                   help="regex with one group that extracts the patient id from a file name")

    def run(a):
        from vascdist.config import load_config
        from vascdist.data.manifest import build_manifest
        cfg = load_config(a.config)
        n = build_manifest(a.root, a.out, classes=cfg.preprocess.classes, patient_pattern=a.patient_pattern)
        print(f"wrote {a.out} ({n} recordings)")
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
        if a.beats:
            from vascdist.data.beats import preprocess_beats
            index = preprocess_beats(a.beats, a.out, cfg.preprocess, overwrite=a.overwrite)
        else:
            from vascdist.data.preprocess import preprocess
            index = preprocess(a.manifest, a.out, cfg.preprocess, workers=a.workers, skip_bad=a.skip_bad,
                               progress=not a.quiet, overwrite=a.overwrite)
        print(f"wrote {len(index['shards'])} shards to {a.out}: " +
              ", ".join(f"{s}={c['samples']}" for s, c in index["splits"].items()))
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
        from vascdist.models import list_models
        print("\n".join(list_models(a.pattern)))
    p.set_defaults(func=run)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (with no arguments: the embedded quickstart, end to end)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (path or name in configs/); default quickstart")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.01 data.batch_size=128")
    p.add_argument("--resume", default=None, help="'auto' (newest loadable checkpoint of this run name) or a file")
    p.add_argument("--run-dir", default=None, help="explicit run directory (default runs/<name>/<time>/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(a):
        config, overrides = a.config, list(a.overrides)
        if config is not None and "=" in config:  # `vascdist train optim.lr=0.1`: overrides only
            config, overrides = None, [config] + overrides
        from vascdist.runner import run_training
        summary = run_training(config, overrides, resume=a.resume, run_dir=a.run_dir, quiet=a.quiet)
        return 0
    p.set_defaults(func=run)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a run or checkpoint on a split (JSON + confusion-matrix PNG)")
    p.add_argument("run", help="run directory or checkpoint file")
    p.add_argument("--shards", default=None, help="shards directory (default: the one the run trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="metrics JSON to write (default RUN/eval-<split>.json)")

    def run(a):
        from vascdist.inference import evaluate_checkpoint
        from vascdist.runner import format_summary
        result = evaluate_checkpoint(a.run, a.shards, a.split, a.out)
        classes = result["classes"]
        text = format_summary({"test": result["metrics"], "classes": classes, "best_step": result["best_step"],
                               "run_dir": result["run_dir"], "test_intervals": result["intervals"],
                               "test_counts": result["counts"], "test_record": {"confidence": result["confidence"]}}).replace("test set", f"{a.split} set")
        if a.split == "val":  # no thresholds from elsewhere: each level's is chosen on the validation set itself
            text = text.replace("thresholds chosen on validation", "thresholds chosen on this set")
        print(text)
        print(f"checkpoint: {result['checkpoint']}")
        print(f"wrote {result['json']} and {result['png']}")
    p.set_defaults(func=run)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="per-cycle probabilities and a verdict for each recording")
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument("files", nargs="+", help="WAV (or any soundfile-readable) recordings")
    p.add_argument("--json", action="store_true", help="print JSON")

    def run(a):
        import json
        from vascdist.inference import predict_files
        results = predict_files(a.checkpoint, a.files)
        if a.json:
            print(json.dumps(results, indent=1))
            return
        for r in results:
            probs = "  ".join(f"P({k})={v:.3f}" for k, v in r["probabilities"].items())
            per_cycle = " ".join(f"{list(c['probabilities'].values())[-1]:.2f}" for c in r["cycles"])
            print(f"{r['file']}: {r['verdict'].upper()}  {probs}  ({len(r['cycles'])} cycles; "
                  f"per-cycle P({list(r['probabilities'])[-1]}): {per_cycle})")
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


def _add_passthrough(sub, name: str, help: str, module: str) -> None:
    """A sub-command whose own parser lives in `module.main(argv)` (bench, submit)."""
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
                _add_models, _add_env):
        add(sub)
    _add_passthrough(sub, "bench", "benchmarks (loader, train, make-shards, scaling, preprocess, checkpoint, dist); "
                     "see BENCHMARKS.md", "vascdist.bench")
    _add_passthrough(sub, "submit", "submit training to SLURM through submitit (launch/submit.py)", "launch.submit")
    _add_passthrough(sub, "report", "one self-contained HTML report of a run or CV directory", "vascdist.report")
    _add_passthrough(sub, "cv", "patient-level k-fold cross-validation, locally or as a SLURM job array", "vascdist.cv")
    return parser


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
    except KeyboardInterrupt:
        print(f"vascdist {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
