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
from tqdm import tqdm

from vascdist.config import PreprocessConfig
from vascdist.data.audio import load_audio
from vascdist.data.cycles import find_cycle_onsets
from vascdist.data.manifest import Recording, file_sha256, read_manifest
from vascdist.data.outdir import building_shard_set
from vascdist.data.shards import SCHEMA_VERSION, ShardSetWriter
from vascdist.data.spectrogram import LogMel, cycle_windows
from vascdist.data.splits import assign_splits
from vascdist.errors import DataError
from vascdist.fileio import atomic_write_text

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
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
    """(recording, spectrograms, cycles, error) per job in manifest order, from `workers` processes or this one."""
    threads = torch.get_num_threads()
    pool = None
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_init_worker, initargs=(os.getpid(),))
            yield from pool.map(_process, jobs, chunksize=1)
        else:
            # One thread here too: the per-recording ops are small, and on busy cores torch's spinning OpenMP
            # threads made this path 10x slower (BENCHMARKS.md, "Preprocessing").
            torch.set_num_threads(1)
            yield from map(_process, jobs)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def preprocess(manifest: str | Path, out_dir: str | Path, cfg: PreprocessConfig, workers: int = 1,
               skip_bad: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Run the whole pipeline; returns the index written to out_dir/index.json.

    Output is all-or-nothing: the set is built beside out_dir and replaces it only when complete and verified
    (vascdist.data.outdir). With `skip_bad`, the splits are drawn over the patients that kept a recording, so
    skipped patients count in no split; the spectrograms wait in a spill directory until then.
    """
    recordings = read_manifest(manifest, cfg.classes, cfg.allow_mixed_patient_labels)
    splits = assign_splits(recordings, cfg.split)  # also refuses inconsistent fixed splits before any work
    spec = cfg.spectrogram
    with building_shard_set(out_dir, "spectrogram", SCHEMA_VERSION, overwrite) as out:
        writer = ShardSetWriter(out, "spectrogram", (1, spec.n_mels, spec.n_frames), cfg.classes,
                                dataclasses.asdict(cfg), cfg.shard_size, cfg.chunk_size, file_sha256(manifest),
                                norm_axis=1)
        spill = out / ".spill"
        kept: list[tuple[Recording, np.ndarray]] = []  # (recording, its cycle numbers)
        skipped: list[tuple[Recording, str]] = []
        patients = {p: i for i, p in enumerate(sorted({r.patient_id for r in recordings}))}
        jobs = [(rec, cfg) for rec in recordings]
        with closing(_results(jobs, workers)) as results:  # closed at once on an error: the pool stops now
            for rec, x, cycles, error in tqdm(results, total=len(jobs), desc="preprocess", unit="rec",
                                              disable=not progress):
                if error:
                    if not skip_bad:
                        raise DataError(f"{error} (manifest row {rec.row}; --skip-bad goes on past bad recordings)")
                    skipped.append((rec, error))
                elif skip_bad:
                    spill.mkdir(exist_ok=True)
                    np.save(spill / f"{len(kept)}.npy", x)
                else:
                    _add(writer, rec, x, cycles, splits[rec.patient_id], patients[rec.patient_id], len(kept))
                if not error:
                    kept.append((rec, cycles))
        if skipped:
            text = io.StringIO(newline="")
            w = csv.writer(text)
            w.writerow(["path", "manifest_row", "reason"])
            w.writerows([str(r.path), r.row, reason] for r, reason in skipped)
            atomic_write_text(out / "skipped.csv", text.getvalue())
        if not kept:
            raise DataError(f"{manifest}: no usable recordings ({len(skipped)} skipped, reasons in the first: "
                            f"{skipped[0][1] if skipped else 'none'})")
        if skip_bad:
            used = [rec for rec, _ in kept]
            splits = assign_splits(used, cfg.split)
            patients = {p: i for i, p in enumerate(sorted({r.patient_id for r in used}))}
            for i, (rec, cycles) in enumerate(kept):
                _add(writer, rec, np.load(spill / f"{i}.npy"), cycles, splits[rec.patient_id], patients[rec.patient_id], i)
            shutil.rmtree(spill)
        return writer.finish(list(patients), [
            {"id": rec.recording_id, "patient": rec.patient_id, "path": str(rec.path), "label": rec.label,
             "split": splits[rec.patient_id], "cycles": len(cycles)} for rec, cycles in kept])


def _add(writer: ShardSetWriter, rec: Recording, x: np.ndarray, cycles: np.ndarray, split: str, patient: int,
         recording: int) -> None:
    n = len(x)
    writer.add(split, {"x": x, "y": np.full(n, rec.label, np.int64), "patient": np.full(n, patient, np.int64),
                       "recording": np.full(n, recording, np.int64), "cycle": cycles.astype(np.int64)})
