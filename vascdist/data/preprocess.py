"""`vascdist preprocess`: manifest -> audio -> cardiac cycles -> log-mel spectrograms -> HDF5 shards."""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from vascdist.config import PreprocessConfig
from vascdist.data.audio import AudioStats, load_audio_stats
from vascdist.data.quality import normalise_level, quality_record
from vascdist.data.cycles import segment
from vascdist.data.manifest import Recording, file_sha256, read_manifest
from vascdist.data.shards import ShardSetWriter, prepare_output_dir
from vascdist.data.spectrogram import LogMel, cycle_windows
from vascdist.data.splits import assign_splits
from vascdist.errors import DataError
from vascdist.progress import ProgressReporter

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
    return spec, cycles, quality


def recording_spectrograms(signal: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """analyse_recording without the quality record."""
    spec, cycles, _ = analyse_recording(signal, cfg)
    return spec, cycles


def _process(job: tuple[Recording, PreprocessConfig]) -> tuple[Recording, np.ndarray | None, np.ndarray | None, dict, str]:
    """Worker body: never raises for a bad recording, returns the reason instead (so --skip-bad can go on)."""
    rec, cfg = job
    try:
        signal, stats = load_audio_stats(rec.path, cfg.audio)
        spec, cycles, quality = analyse_recording(signal, cfg, stats)
        return rec, spec.astype(np.float16), cycles, quality, ""
    except DataError as exc:
        message = str(exc)
        if str(rec.path) not in message:
            message = f"{rec.path}: {message}"
        return rec, None, None, {}, message


def _init_worker() -> None:
    torch.set_num_threads(1)  # parallelism comes from processes; threads would oversubscribe the cores


def preprocess(manifest: str | Path, out_dir: str | Path, cfg: PreprocessConfig, workers: int = 1,
               skip_bad: bool = False, progress: bool = True, overwrite: bool = False,
               progress_interval_s: float = 30.0) -> dict:
    """Run the whole pipeline; returns the index written to out_dir/index.json.

    Progress is a bar in a terminal, else a plain line every `progress_interval_s` seconds (vascdist.progress).

    Output is all-or-nothing: on an error every shard written by this run is removed again.
    """
    recordings = read_manifest(manifest, cfg.classes, cfg.allow_mixed_patient_labels)
    splits = assign_splits(recordings, cfg.split)
    out = prepare_output_dir(out_dir, "spectrogram", overwrite)
    spec = cfg.spectrogram
    writer = ShardSetWriter(out, "spectrogram", (1, spec.n_mels, spec.n_frames), cfg.classes,
                            dataclasses.asdict(cfg), cfg.shard_size, cfg.chunk_size, file_sha256(manifest), norm_axis=1)
    patients = sorted({r.patient_id for r in recordings})
    patient_index = {p: i for i, p in enumerate(patients)}
    kept: list[dict] = []
    skipped: list[tuple[Recording, str]] = []
    excluded: list[dict] = []  # the same recordings, with split and label, for index.json's counts
    jobs = [(rec, cfg) for rec in recordings]
    threads = torch.get_num_threads()
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker)
            results = pool.map(_process, jobs, chunksize=1)
        else:
            # One thread here too: the per-recording ops are small, and on busy cores torch's spinning OpenMP
            # threads made this path 10x slower (BENCHMARKS.md, "Preprocessing").
            torch.set_num_threads(1)
            pool, results = None, map(_process, jobs)
        try:
            bar = ProgressReporter("preprocess", len(jobs), unit="recording", enabled=progress,
                                   interval_s=progress_interval_s)
            for rec, x, cycles, quality, error in results:
                bar.update(1)
                if error:
                    if not skip_bad:
                        raise DataError(f"{error} (manifest row {rec.row}; --skip-bad goes on past bad recordings)")
                    skipped.append((rec, error))
                    excluded.append({"id": rec.recording_id, "patient": rec.patient_id, "path": str(rec.path),
                                     "label": rec.label, "split": splits[rec.patient_id], "reason": error})
                    continue
                n = len(x)
                writer.add(splits[rec.patient_id], {
                    "x": x, "y": np.full(n, rec.label, np.int64),
                    "patient": np.full(n, patient_index[rec.patient_id], np.int64),
                    "recording": np.full(n, len(kept), np.int64), "cycle": cycles.astype(np.int64)})
                kept.append({"id": rec.recording_id, "patient": rec.patient_id, "path": str(rec.path),
                             "label": rec.label, "split": splits[rec.patient_id], "cycles": n,
                             "site": rec.site, "quality": quality})
            bar.close()
        finally:
            torch.set_num_threads(threads)
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if skipped:
            with open(out / "skipped.csv", "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "manifest_row", "reason"])
                w.writerows([str(r.path), r.row, reason] for r, reason in skipped)
        if not kept:
            raise DataError(f"{manifest}: no usable recordings (see {out / 'skipped.csv'})")
        return writer.finish(patients, kept, excluded)
    except BaseException:
        writer.abort()
        raise
