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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. preprocess.shard_size=4096")

    def run(a):
        from vascdist.config import load_config
        cfg = load_config(a.config, a.overrides)
        if a.beats:
            from vascdist.data.beats import preprocess_beats
            index = preprocess_beats(a.beats, a.out, cfg.preprocess)
        else:
            from vascdist.data.preprocess import preprocess
            index = preprocess(a.manifest, a.out, cfg.preprocess, workers=a.workers, skip_bad=a.skip_bad,
                               progress=not a.quiet)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vascdist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_manifest, _add_preprocess, _add_shards, _add_models):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
