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
from vascdist.data.audio import load_audio
from vascdist.data.cycles import find_cycle_onsets
from vascdist.data.manifest import Recording, file_sha256, read_manifest
from vascdist.data.shards import ShardSetWriter, prepare_output_dir
from vascdist.data.spectrogram import LogMel, cycle_windows
from vascdist.data.splits import assign_splits
from vascdist.errors import DataError
from vascdist.progress import ProgressReporter

_logmel: LogMel | None = None  # one per worker process, built on first use


def recording_spectrograms(signal: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """A prepared signal -> (spectrograms [N, 1, n_mels, n_frames] float32, cycle numbers [N]).

    Raises DataError (without a path; callers add it) when fewer than cfg.cycles.min_cycles fit.
    """
    global _logmel
    if _logmel is None or _logmel.cfg != cfg.spectrogram:
        _logmel = LogMel(cfg.spectrogram, cfg.audio.sample_rate)
    onsets = find_cycle_onsets(signal, cfg.audio.sample_rate, cfg.cycles)
    windows, cycles = cycle_windows(signal, onsets, cfg.spectrogram)
    if len(windows) < cfg.cycles.min_cycles:
        raise DataError(f"only {len(windows)} complete cardiac cycle(s) in {len(signal) / cfg.audio.sample_rate:.1f} s "
                        f"of audio; need {cfg.cycles.min_cycles}")
    spec = _logmel(torch.from_numpy(windows)).numpy()
    return spec, cycles


def _process(job: tuple[Recording, PreprocessConfig]) -> tuple[Recording, np.ndarray | None, np.ndarray | None, str]:
    """Worker body: never raises for a bad recording, returns the reason instead (so --skip-bad can go on)."""
    rec, cfg = job
    try:
        signal = load_audio(rec.path, cfg.audio)
        spec, cycles = recording_spectrograms(signal, cfg)
        return rec, spec.astype(np.float16), cycles, ""
    except DataError as exc:
        message = str(exc)
        if str(rec.path) not in message:
            message = f"{rec.path}: {message}"
        return rec, None, None, message


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
            for rec, x, cycles, error in results:
                bar.update(1)
                if error:
                    if not skip_bad:
                        raise DataError(f"{error} (manifest row {rec.row}; --skip-bad goes on past bad recordings)")
                    skipped.append((rec, error))
                    continue
                n = len(x)
                writer.add(splits[rec.patient_id], {
                    "x": x, "y": np.full(n, rec.label, np.int64),
                    "patient": np.full(n, patient_index[rec.patient_id], np.int64),
                    "recording": np.full(n, len(kept), np.int64), "cycle": cycles.astype(np.int64)})
                kept.append({"id": rec.recording_id, "patient": rec.patient_id, "path": str(rec.path),
                             "label": rec.label, "split": splits[rec.patient_id], "cycles": n})
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
        return writer.finish(patients, kept)
    except BaseException:
        writer.abort()
        raise
