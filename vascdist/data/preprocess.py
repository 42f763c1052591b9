"""`vascdist preprocess`: manifest -> audio -> cardiac cycles -> log-mel spectrograms -> HDF5 shards."""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import io
import multiprocessing
import os
import shutil
import signal
import sys
from contextlib import closing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vascdist.config import PreprocessConfig
from vascdist.data.audio import SYNTH_MARK, AudioStats, load_audio_stats
from vascdist.data.quality import absurd_reasons, normalise_level, quality_record
from vascdist.data.cycles import segment
from vascdist.data.manifest import Recording, file_sha256, read_manifest
from vascdist.data.outdir import building_shard_set
from vascdist.data.shards import SCHEMA_VERSION, ShardSetWriter
from vascdist.data.spectrogram import LogMel, cycle_windows, input_features
from vascdist.data.splits import assign_splits
from vascdist.errors import DataError
from vascdist.fileio import atomic_write_text
from vascdist.progress import ProgressReporter

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_logmel: LogMel | None = None  # one per worker process, built on first use


def analyse_recording(signal: np.ndarray, cfg: PreprocessConfig, stats: AudioStats | None = None
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A prepared signal -> (spectrograms [N, 1, n_mels, n_frames] float32, cycle numbers [N], quality record).

    The signal is segmented (cycles.segment), scaled to a fixed typical level (quality.normalise_level: the
    model never sees the recorder's gain) and cut into one window per onset, padded at the end up to
    cfg.cycles.pad_fraction. Raises DataError (without a path; callers add it) when fewer than
    cfg.cycles.min_cycles windows fit, or for an aperiodic recording under cycles.aperiodic=refuse.
    """
    global _logmel
    if _logmel is None or _logmel.cfg != cfg.spectrogram:
        _logmel = LogMel(cfg.spectrogram, cfg.audio.sample_rate)
    rate = cfg.audio.sample_rate
    seg = segment(signal, rate, cfg.cycles)
    quality = quality_record(signal, seg, rate, stats)
    sound = normalise_level(signal[: seg.active[1]], seg)
    period = int(round(seg.period_s * rate)) if seg.period_s else None
    windows, cycles = cycle_windows(sound, seg.onsets, cfg.spectrogram, cfg.cycles.pad_fraction, period)
    if len(windows) < cfg.cycles.min_cycles:
        raise DataError(f"only {len(windows)} cardiac cycle window(s) in {len(signal) / rate:.1f} s of audio "
                        f"({len(seg.onsets)} onsets, {'periodic' if seg.periodic else seg.reason}); "
                        f"need preprocess.cycles.min_cycles={cfg.cycles.min_cycles}")
    quality["windows"] = len(windows)
    spec = _logmel(torch.from_numpy(windows)).numpy()
    if cfg.spectrogram.recording_norm == "band_mean":  # the device's colouring, a constant per band in dB, goes
        spec = spec - spec.mean(axis=(0, 3), keepdims=True)  # (N, 1, F, T): mean over windows and frames
    return spec, cycles, quality


def _process(job: tuple[Recording, PreprocessConfig]) -> tuple[Recording, np.ndarray | None, np.ndarray | None, dict,
                                                             dict, str]:
    """Worker body -> (recording, spectrograms, cycle numbers, quality record, facts, error); never raises for a
    bad recording, returns the reason instead (so --skip-bad can go on). `facts`: the recording's input features
    (spectrogram.input_features: predict compares with them), whether `vascdist synth` made it, and the sha256 of
    its decoded samples (duplicates are leakage)."""
    rec, cfg = job
    try:
        signal, stats = load_audio_stats(rec.path, cfg.audio)
        spec, cycles, quality = analyse_recording(signal, cfg, stats)
        absurd = absurd_reasons(quality, cfg.audio)
        if absurd:
            raise DataError(f"physically absurd recording: {'; '.join(absurd)}")
        facts = {"input_features": [round(float(v), 3) for v in input_features(spec)],
                 "source": SYNTH_MARK if stats.synthetic else "file", "content_sha256": stats.content_sha256}
        return rec, spec.astype(np.float16), cycles, quality, facts, ""
    except DataError as exc:
        message = str(exc)
        if str(rec.path) not in message:
            message = f"{rec.path}: {message}"
        return rec, None, None, {}, {}, message


def _same_audio(rec: Recording, other: Recording) -> DataError:
    """The one line that refuses two manifest rows holding the same audio."""
    return DataError(f"{rec.path} (manifest row {rec.row}, patient {rec.patient_id}) holds the same audio as "
                     f"{other.path} (manifest row {other.row}, patient {other.patient_id}): one recording under two "
                     f"rows leaks between splits and counts twice; remove one of the rows")


def _init_worker(parent: int) -> None:
    """Per worker: one torch thread; die with the parent; leave Ctrl-C and SIGTERM to the parent."""
    torch.set_num_threads(1)  # parallelism comes from processes; threads would oversubscribe the cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool; a traceback per worker is noise
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, inherited through fork
    if sys.platform.startswith("linux"):
        # SIGKILL when the parent dies, even by kill -9: a worker would otherwise block for ever on the full
        # result pipe nobody reads.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _results(jobs: list, workers: int):
    """(recording, spectrograms, cycles, quality, error) per job in manifest order, from `workers` processes or this one."""
    threads = torch.get_num_threads()
    pool = None
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_init_worker, initargs=(os.getpid(),))
            yield from pool.map(_process, jobs, chunksize=1)
        else:
            # One thread here too: the per-recording ops are small, and on busy cores torch's spinning OpenMP
            # threads made this path 10x slower (docs/design/measurements.md, "Preprocessing").
            torch.set_num_threads(1)
            yield from map(_process, jobs)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def preprocess(manifest: str | Path, out_dir: str | Path, cfg: PreprocessConfig, workers: int = 1,
               skip_bad: bool = False, progress: bool = True, overwrite: bool = False,
               progress_interval_s: float = 30.0) -> dict:
    """Run the whole pipeline; returns the index written to out_dir/index.json.

    Progress is a bar in a terminal, else a plain line every `progress_interval_s` seconds (vascdist.progress).

    Output is all-or-nothing: the set is built beside out_dir and replaces it only when complete and verified
    (vascdist.data.outdir). With `skip_bad`, the splits are drawn over the patients that kept a recording, so
    skipped patients count in no split; the spectrograms wait in a spill directory until then. An excluded
    recording is counted in its patient's split, or, for a patient left with none, in the split the draw over
    all recordings gave it (where it would have been).
    """
    recordings = read_manifest(manifest, cfg.classes, cfg.allow_mixed_patient_labels)
    splits = assign_splits(recordings, cfg.split)  # also refuses inconsistent fixed splits before any work
    spec = cfg.spectrogram
    with building_shard_set(out_dir, "spectrogram", SCHEMA_VERSION, overwrite) as out:
        writer = ShardSetWriter(out, "spectrogram", (1, spec.n_mels, spec.n_frames), cfg.classes,
                                dataclasses.asdict(cfg), cfg.shard_size, cfg.chunk_size, file_sha256(manifest),
                                norm_axis=1)
        spill = out / ".spill"
        patients = {p: i for i, p in enumerate(sorted({r.patient_id for r in recordings}))}
        jobs = [(rec, cfg) for rec in recordings]
        bar = ProgressReporter("preprocess", len(jobs), unit="recording", enabled=progress,
                               interval_s=progress_interval_s)
        with closing(_results(jobs, workers)) as results:  # closed at once on an error: the pool stops now
            kept, skipped = _take_results(results, writer, spill if skip_bad else None, splits, patients, bar)
        bar.close()
        if skipped:
            _write_skipped(out / "skipped.csv", skipped)
        if not kept:
            raise DataError(f"{manifest}: no usable recordings ({len(skipped)} skipped, reasons in the first: "
                            f"{skipped[0][1] if skipped else 'none'})")
        first_draw = splits
        if skip_bad:  # the splits are drawn again over the patients that kept a recording
            splits, patients = _add_spilled(writer, spill, [(rec, cycles) for rec, cycles, _ in kept], cfg)
        # An excluded recording counts in its patient's split, or where the first draw put a patient left with none.
        excluded = [{"id": rec.recording_id, "patient": rec.patient_id, "path": str(rec.path), "label": rec.label,
                     "split": splits.get(rec.patient_id, first_draw[rec.patient_id]), "site": rec.site,
                     "reason": error} for rec, error in skipped]
        return writer.finish(list(patients), [
            {"id": rec.recording_id, "patient": rec.patient_id, "path": str(rec.path), "label": rec.label,
             "split": splits[rec.patient_id], "cycles": len(cycles), "site": rec.site, **entry}
            for rec, cycles, entry in kept], excluded)


def _take_results(results, writer: ShardSetWriter, spill: Path | None, splits: dict, patients: dict, bar):
    """Each analysed recording in manifest order: written to its split (or, with --skip-bad, `spill`ed until the
    splits are drawn again), or refused, or with --skip-bad skipped with its reason. The same audio under two rows
    is refused even with --skip-bad (which of them is wrong?). Returns (kept: recording, its cycle numbers, its
    index entry; skipped: recording, reason)."""
    kept: list[tuple[Recording, np.ndarray, dict]] = []
    seen: dict[str, Recording] = {}  # content sha256 -> the first row with that audio
    skipped: list[tuple[Recording, str]] = []
    for rec, x, cycles, quality, facts, error in results:
        bar.update(1)
        if not error and facts["content_sha256"] in seen:
            raise _same_audio(rec, seen[facts["content_sha256"]])
        if error:
            if spill is None:
                raise DataError(f"{error} (manifest row {rec.row}; --skip-bad goes on past bad recordings)")
            skipped.append((rec, error))
            continue
        if spill is not None:
            spill.mkdir(exist_ok=True)
            np.save(spill / f"{len(kept)}.npy", x)
        else:
            _add(writer, rec, x, cycles, splits[rec.patient_id], patients[rec.patient_id], len(kept))
        seen[facts["content_sha256"]] = rec
        kept.append((rec, cycles, {"quality": quality, **facts}))
    return kept, skipped


def _write_skipped(path: Path, skipped: list[tuple[Recording, str]]) -> None:
    """skipped.csv: path, manifest row and reason of every recording --skip-bad went past."""
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["path", "manifest_row", "reason"])
    w.writerows([str(r.path), r.row, reason] for r, reason in skipped)
    atomic_write_text(path, text.getvalue())


def _add_spilled(writer: ShardSetWriter, spill: Path, kept: list[tuple[Recording, np.ndarray]],
                 cfg: PreprocessConfig) -> tuple[dict, dict]:
    """With --skip-bad: draw the splits over the patients that kept a recording, then write the spilled
    spectrograms in their order; returns (split of each patient, patient numbers)."""
    used = [rec for rec, _ in kept]
    splits = assign_splits(used, cfg.split)
    patients = {p: i for i, p in enumerate(sorted({r.patient_id for r in used}))}
    for i, (rec, cycles) in enumerate(kept):
        _add(writer, rec, np.load(spill / f"{i}.npy"), cycles, splits[rec.patient_id], patients[rec.patient_id], i)
    shutil.rmtree(spill)
    return splits, patients


def _add(writer: ShardSetWriter, rec: Recording, x: np.ndarray, cycles: np.ndarray, split: str, patient: int,
         recording: int) -> None:
    n = len(x)
    writer.add(split, {"x": x, "y": np.full(n, rec.label, np.int64), "patient": np.full(n, patient, np.int64),
                       "recording": np.full(n, recording, np.int64), "cycle": cycles.astype(np.int64)})
