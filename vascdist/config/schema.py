"""The schema of vascdist's one typed config tree: a dataclass per section, a docstring per field.

Every section checks its ranges in ``check()`` with messages that name the dotted key; `loader.py` builds the
tree from defaults, YAML and overrides and calls those checks.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

from vascdist.config.batch import batch_sizes
from vascdist.errors import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {message}")


# --------------------------------------------------------------------------------------------- preprocessing
@dataclass
class AudioConfig:
    sample_rate: int = 4000
    """Rate (Hz) every recording is resampled to before anything else."""
    bandpass_low_hz: float = 25.0
    """High-pass corner (Hz): removes DC, breathing and most of the 50/60 Hz mains hum's sub-harmonics."""
    bandpass_high_hz: float = 1800.0
    """Low-pass corner (Hz); must stay below Nyquist."""
    min_rms: float = 1e-4
    """A recording whose RMS (full scale = 1) is below this is rejected as silent."""

    def check(self, key: str) -> None:
        _require(self.sample_rate >= 500, f"{key}.sample_rate", f"must be >= 500 Hz, got {self.sample_rate}")
        _require(0 < self.bandpass_low_hz < self.bandpass_high_hz, f"{key}.bandpass_low_hz",
                 "must be > 0 and below bandpass_high_hz")
        _require(self.bandpass_high_hz < self.sample_rate / 2, f"{key}.bandpass_high_hz",
                 f"must be below Nyquist ({self.sample_rate / 2} Hz), got {self.bandpass_high_hz}")


@dataclass
class CycleConfig:
    min_bpm: float = 40.0
    """Slowest heart rate the period search considers."""
    max_bpm: float = 150.0
    """Fastest heart rate the period search considers."""
    envelope_hz: float = 200.0
    """Rate (Hz) of the smoothed energy envelope that onsets are picked on."""
    envelope_smoothing_s: float = 0.03
    """Length (s) of the moving average applied to the squared signal to form the envelope."""
    min_cycles: int = 1
    """A recording with fewer usable cycle windows is rejected (counted in the shards' `excluded` table)."""
    min_periodicity: float = 0.2
    """Below this envelope autocorrelation at the heart period a recording is aperiodic (see `aperiodic`)."""
    aperiodic: str = "windows"
    """What an aperiodic recording gets: 'windows' (fixed-length windows every aperiodic_hop_s, flagged in its
    quality record) or 'refuse' (a DataError naming the reason)."""
    aperiodic_hop_s: float = 0.5
    """Hop (s) between the fixed-length windows of an aperiodic recording."""
    pad_fraction: float = 0.5
    """A window running past the end of the recording is kept, padded, if at most this fraction of it is
    missing (0: only complete windows)."""

    def check(self, key: str) -> None:
        _require(0 < self.min_bpm < self.max_bpm, f"{key}.min_bpm", "must be > 0 and below max_bpm")
        _require(-1 <= self.min_periodicity < 1, f"{key}.min_periodicity", "must be in [-1, 1)")
        _require(self.aperiodic in ("windows", "refuse"), f"{key}.aperiodic",
                 f"must be 'windows' or 'refuse', got '{self.aperiodic}'")
        _require(self.aperiodic_hop_s > 0, f"{key}.aperiodic_hop_s", "must be > 0")
        _require(0 <= self.pad_fraction < 1, f"{key}.pad_fraction", "must be in [0, 1)")
        _require(self.envelope_hz > 0, f"{key}.envelope_hz", "must be > 0")
        _require(self.envelope_smoothing_s > 0, f"{key}.envelope_smoothing_s", "must be > 0")
        _require(self.min_cycles >= 1, f"{key}.min_cycles", "must be >= 1")


RECORDING_NORMS = ("none", "band_mean")  # SpectrogramConfig.recording_norm


@dataclass
class SpectrogramConfig:
    n_fft: int = 256
    """FFT size (samples) of the short-time transform."""
    hop_length: int = 40
    """Hop (samples) between frames; the cycle window is hop_length * (n_frames - 1) samples long."""
    n_mels: int = 40
    """Mel bands (the F of 1 x F x T)."""
    n_frames: int = 100
    """Frames per cycle (the T of 1 x F x T)."""
    f_min: float = 20.0
    """Lowest mel filter edge (Hz)."""
    f_max: float = 2000.0
    """Highest mel filter edge (Hz); at most Nyquist."""
    top_db: float = 80.0
    """Dynamic range kept by the amplitude-to-dB step."""
    recording_norm: str = "none"
    """Per-recording normalisation of the log-mel: 'none', or 'band_mean' (subtract from every mel band its mean
    over all of the recording's windows and frames, in dB). A stethoscope's or a skin contact's frequency response
    multiplies the spectrum, i.e. adds a constant per band in dB: band_mean removes it (cepstral mean
    normalisation), so a model cannot tell devices apart by their colouring and must use what changes within the
    recording (the cardiac cycle's sounds and murmurs)."""

    def check(self, key: str) -> None:
        for name in ("n_fft", "hop_length", "n_mels", "n_frames"):
            _require(getattr(self, name) > 0, f"{key}.{name}", "must be > 0")
        _require(0 <= self.f_min < self.f_max, f"{key}.f_min", "must be >= 0 and below f_max")
        _require(self.recording_norm in RECORDING_NORMS, f"{key}.recording_norm",
                 f"must be one of {', '.join(RECORDING_NORMS)}, got '{self.recording_norm}'")


@dataclass
class SplitConfig:
    seed: int = 0
    """Seed of the patient-level split (the same seed always gives the same split)."""
    val_fraction: float = 0.15
    """Fraction of patients (per label) held out for validation."""
    test_fraction: float = 0.2
    """Fraction of patients (per label) held out for test."""

    def check(self, key: str) -> None:
        _require(0 <= self.val_fraction < 1, f"{key}.val_fraction", "must be in [0, 1)")
        _require(0 <= self.test_fraction < 1, f"{key}.test_fraction", "must be in [0, 1)")
        _require(self.val_fraction + self.test_fraction < 1, f"{key}.test_fraction",
                 "plus val_fraction must leave patients for training")


@dataclass
class PreprocessConfig:
    classes: list[str] = field(default_factory=lambda: ["normal", "stenosis"])
    """Class names in index order; 'normal' first. Manifest labels must be one of these."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    cycles: CycleConfig = field(default_factory=CycleConfig)
    spectrogram: SpectrogramConfig = field(default_factory=SpectrogramConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    shard_size: int = 8192
    """Samples per HDF5 shard file."""
    chunk_size: int = 256
    """HDF5 chunk length along N; the loader reads whole chunks."""
    allow_mixed_patient_labels: bool = False
    """Whether one patient may carry recordings of different labels (e.g. a stenosis at one site only)."""

    def check(self, key: str) -> None:
        _require(len(self.classes) >= 2, f"{key}.classes", "needs at least two classes")
        _require(len(set(self.classes)) == len(self.classes), f"{key}.classes", "has duplicates")
        _require(self.shard_size >= self.chunk_size > 0, f"{key}.shard_size", "must be >= chunk_size > 0")
        _require(self.spectrogram.f_max <= self.audio.sample_rate / 2, f"{key}.spectrogram.f_max",
                 f"must be at most Nyquist ({self.audio.sample_rate / 2} Hz)")


# --------------------------------------------------------------------------------------------- training
@dataclass
class DataConfig:
    shards: str = "data/quickstart/shards"
    """Directory of shards written by `vascdist preprocess` (holds index.json)."""
    split_file: str = ""
    """JSON of patient ids per split (train / val / test) replacing the shards' own split, without rewriting them;
    `vascdist cv` writes one per fold (vascdist/data/folds.py). Empty: the split the shards were written with."""
    synth_patients: int = 0
    """If > 0 and `shards` does not exist, `vascdist train` synthesises this many patients and preprocesses them."""
    synth_seed: int = 0
    """Seed of that synthetic data set."""
    batch_size: int = 64
    """Global batch size (all ranks together, per optimiser step before accumulation)."""
    loader: str = "threads"
    """'threads' (reader threads in the training process; the faster for the shipped pipeline, BENCHMARKS.md) or
    'dataloader' (a stock torch DataLoader with worker processes: for CPU-heavy Python in data.transform)."""
    reader_threads: int = 2
    """data.loader=threads: reader threads per rank (0: read in the training thread)."""
    windows_ahead: int = 2
    """data.loader=threads: shuffle windows each reader thread prepares ahead (8 KB x chunk_size x shuffle_chunks
    each: 32 MB by default)."""
    workers: int = 2
    """data.loader=dataloader: DataLoader worker processes per rank (0: read in the training process)."""
    worker_prefetch_factor: int = 2
    """data.loader=dataloader: batches each worker prepares ahead (DataLoader's prefetch_factor)."""
    persistent_workers: bool = True
    """data.loader=dataloader: keep the worker processes from epoch to epoch (DataLoader's persistent_workers)."""
    verify_checksums: bool = True
    """Check the shard set before training (rank 0): index.json's checksum, every shard's size and header against
    it (about 1 ms per shard, whatever its size). Every chunk's checksums are verified as it is read either way;
    `vascdist shards verify` hashes every byte."""
    shuffle_chunks: int = 16
    """Chunks mixed together by the shuffle window (bigger: better shuffle, more memory)."""
    transform: str = ""
    """Dotted path ('package.module:function') of a callable (batch, generator) -> batch applied to every training
    batch in the loader (worker process or reader thread), e.g. audio-domain augmentation; '' for none. README."""
    spec_augment: bool = False
    """Apply SpecAugment (time and frequency masking) to training batches."""
    freq_mask: int = 6
    """Widest frequency mask (mel bands) of SpecAugment."""
    time_mask: int = 12
    """Widest time mask (frames) of SpecAugment."""
    noise_floor_db: list[float] = field(default_factory=list)
    """[lowest, highest]: add to every training window a stationary noise floor drawn uniformly between these
    levels, in dB relative to the recording's mean per mel band (needs shards with
    preprocess.spectrogram.recording_norm: band_mean); imitates a noisier stethoscope or room. Empty: none."""
    time_shift: bool = False
    """Roll every training window circularly in time by a random number of frames (the heart sounds then sit at
    any phase of the window, as where the onset detection starts windows elsewhere in the cycle)."""

    def check(self, key: str) -> None:
        _require(self.batch_size > 0, f"{key}.batch_size", "must be > 0")
        _require(self.loader in ("threads", "dataloader"), f"{key}.loader",
                 f"must be 'threads' or 'dataloader', got '{self.loader}'")
        _require(self.reader_threads >= 0, f"{key}.reader_threads", "must be >= 0")
        _require(self.windows_ahead >= 1, f"{key}.windows_ahead", "must be >= 1")
        _require(self.workers >= 0, f"{key}.workers", "must be >= 0")
        _require(self.worker_prefetch_factor >= 1, f"{key}.worker_prefetch_factor", "must be >= 1")
        _require(self.shuffle_chunks >= 1, f"{key}.shuffle_chunks", "must be >= 1")
        _require(not self.noise_floor_db or (len(self.noise_floor_db) == 2 and self.noise_floor_db[0] <= self.noise_floor_db[1]),
                 f"{key}.noise_floor_db", f"must be empty or [lowest, highest] dB with lowest <= highest, got {self.noise_floor_db}")


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Registry name; `vascdist models` lists them."""
    stem: str = "small"
    """ResNet stem: 'imagenet' (7x7/2 + max-pool) or 'small' (3x3/1, no pool; suits 40 x 100 inputs)."""
    width: float = 1.0
    """Width multiplier on every channel count (0.25 trains on a CPU in minutes)."""
    dropout: float = 0.0
    """Dropout before the classifier."""
    norm: str = "batch"
    """ResNet normalisation: 'batch' (BatchNorm; dist.sync_batchnorm makes it SyncBatchNorm on GPUs) or 'group'
    (GroupNorm: no batch statistics, so identical on any number of ranks, CPUs included)."""

    def check(self, key: str) -> None:
        from vascdist.model_names import NORMS, STEMS  # torch-free; models/resnet.py builds them
        _require(self.stem in STEMS, f"{key}.stem", f"must be one of {', '.join(STEMS)}; got '{self.stem}'")
        _require(self.width > 0, f"{key}.width", "must be > 0")
        _require(0 <= self.dropout < 1, f"{key}.dropout", "must be in [0, 1)")
        _require(self.norm in NORMS, f"{key}.norm", f"must be one of {', '.join(NORMS)}; got '{self.norm}'")


@dataclass
class LossConfig:
    name: str = "bce_onehot"
    """'bce_onehot' (softmax + BCE on one-hot labels), 'cross_entropy' or 'focal'."""
    class_weights: list[float] = field(default_factory=list)
    """Per-class weights (empty: none)."""
    label_smoothing: float = 0.0
    """Label smoothing of cross_entropy."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss."""
    focal_alpha: list[float] = field(default_factory=list)
    """Per-class balance of the focal loss (empty: none)."""

    def check(self, key: str) -> None:
        _require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)")
        _require(self.focal_gamma >= 0, f"{key}.focal_gamma", "must be >= 0")


@dataclass
class OptimConfig:
    name: str = "sgd"
    """'sgd', 'adam', 'adamw' or 'adabound'."""
    lr: float = 0.05
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    weight_decay: float = 1e-4
    """L2 penalty (decoupled for adamw)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam-family betas."""
    final_lr: float = 0.1
    """AdaBound: the SGD learning rate the bounds converge to."""
    bound_gamma: float = 1e-3
    """AdaBound: convergence speed of the bounds."""

    def check(self, key: str) -> None:
        # Ranges every optimiser shares; its name and the options only one optimiser takes are checked by the
        # registry in train/optim.py (config/checks.py asks it before any work starts).
        _require(math.isfinite(self.lr), f"{key}.lr", f"must be finite, got {self.lr}")
        _require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _require(0 <= self.momentum < 1, f"{key}.momentum", "must be in [0, 1)")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
                 "must be two numbers in [0, 1)")


@dataclass
class SchedConfig:
    name: str = "step"
    """'none', 'step', 'exponential', 'cosine' (linear warm-up then cosine), 'onecycle' or 'plateau'."""
    step_size: int = 1
    """StepLR: epochs between decays (unless step_fraction is set)."""
    step_fraction: float = 0.0
    """StepLR: if > 0, decay every this fraction of the run's optimiser steps instead of every step_size epochs,
    so the schedule keeps its shape when train.min_steps lengthens a run on a small data set."""
    gamma: float = 0.5
    """StepLR / ExponentialLR / plateau decay factor."""
    warmup_steps: int = 0
    """Linear warm-up steps of 'cosine'."""
    min_lr: float = 0.0
    """Floor of 'cosine'."""
    patience: int = 2
    """ReduceLROnPlateau: evaluations without improvement before a decay."""

    def check(self, key: str) -> None:
        _require(self.step_size >= 1, f"{key}.step_size", "must be >= 1")
        _require(0 <= self.step_fraction < 1, f"{key}.step_fraction", "must be in [0, 1)")
        _require(0 < self.gamma <= 1, f"{key}.gamma", "must be in (0, 1]")
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 10
    """Epochs to train (at least; see min_steps)."""
    min_steps: int = 0
    """Train at least this many optimiser steps: when epochs x steps per epoch is fewer, the epoch count is
    raised to reach it, so a small data set (1,500 cycles: 24 steps per epoch at batch 64) is not undertrained."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: no limit)."""
    seed: int = 0
    """Seed of model init, shuffling and augmentation."""
    grad_accum: int = 1
    """Micro-batches per optimiser step; the global batch is split into this many."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0: off)."""
    precision: str = "auto"
    """'fp32', 'bf16' (autocast) or 'auto' (bf16 on GPUs that support it, else fp32)."""
    channels_last: bool = False
    """Use channels_last memory format for 2-D models."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    max_bad_steps: int = 5
    """Stop after this many non-finite losses in a row (each is skipped and counted)."""
    eval_every: int = 0
    """Evaluate every N steps (0: at the end of every epoch)."""
    early_stop_metric: str = "recording/balanced_accuracy"
    """Validation metric that picks the best checkpoint and drives early stopping / plateau; a tie (a metric
    saturated at 1.0) goes to the lower validation loss."""
    early_stop_patience: int = 0
    """Evaluations without improvement before stopping (0: never stop early)."""
    keep_last: int = 2
    """Checkpoints kept besides best.pt."""
    checkpoint_every: int = 0
    """Also checkpoint every N steps (0: only after each evaluation)."""
    log_every: int = 10
    """Steps between metrics.jsonl lines (gradient norm, samples/s, data wait); loss and lr go to TensorBoard every step."""
    device: str = "auto"
    """'auto' (CUDA if present), 'cpu' or 'cuda'."""
    check_memory: bool = True
    """Refuse to start when the estimated memory of a training step exceeds the device's free memory."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, warn-only; cuDNN deterministic, no autotuning):
    on a GPU, runs of the same config and a resumed run repeat bit for bit, at some cost in speed. A CPU run is
    deterministic without it."""

    def planned_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps the run takes: epochs x steps_per_epoch, capped by max_steps."""
        total = self.epochs * steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    def check(self, key: str) -> None:
        _require(self.epochs >= 1, f"{key}.epochs", "must be >= 1")
        _require(self.max_steps >= 0, f"{key}.max_steps", "must be >= 0")
        _require(self.min_steps >= 0, f"{key}.min_steps", "must be >= 0")
        _require(self.grad_accum >= 1, f"{key}.grad_accum", "must be >= 1")
        _require(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0")
        _require(self.precision in ("auto", "fp32", "bf16"), f"{key}.precision", "must be auto, fp32 or bf16")
        _require(self.max_bad_steps >= 1, f"{key}.max_bad_steps", "must be >= 1")
        _require(self.keep_last >= 1, f"{key}.keep_last", "must be >= 1")
        _require(self.log_every >= 1, f"{key}.log_every", "must be >= 1")
        _require(self.device in ("auto", "cpu", "cuda"), f"{key}.device", "must be auto, cpu or cuda")


@dataclass
class DistConfig:
    engine: str = "ddp"
    """'ddp': torch itself (one process; DistributedDataParallel over several) or 'deepspeed': DeepSpeed's engine,
    in one process too (a one-rank process group is made for it)."""
    ddp_one_rank: bool = False
    """With dist.engine=ddp and a single process: wrap the model in DistributedDataParallel over a one-rank
    process group anyway (NCCL on CUDA, gloo on CPU), so the DDP and collective path runs on one GPU (`vascdist
    bench gpu`); the arithmetic is that of one process."""
    timeout_s: int = 600
    """Collective / rendezvous timeout."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients alias the all-reduce buckets (saves a copy)."""
    static_graph: bool = False
    """DDP static_graph."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm (batch statistics over all ranks)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON; keys that contradict this config are an error."""
    requeue_signal: str = "USR2"
    """Signal that asks for checkpoint-and-requeue (SIGTERM is always handled too)."""
    max_requeues: int = 10
    """Requeues allowed before the job gives up."""

    def check(self, key: str) -> None:
        _require(self.engine in ("ddp", "deepspeed"), f"{key}.engine", "must be ddp or deepspeed")
        _require(self.timeout_s > 0, f"{key}.timeout_s", "must be > 0")
        _require(self.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", "must be 0, 1, 2 or 3")


@dataclass
class EvalConfig:
    bootstrap_resamples: int = 1000
    """Patient resamples of the bootstrap behind every metric's confidence interval (0: no intervals)."""
    bootstrap_seed: int = 0
    """Seed of those resamples (the same seed and predictions always give the same intervals)."""
    confidence: float = 0.95
    """Coverage of the percentile intervals."""
    threshold: str = "youden"
    """Rule choosing each level's binary threshold on validation: 'youden', 'sensitivity:0.90' (the highest
    threshold reaching that sensitivity), 'specificity:0.90' or 'fixed:0.5'."""
    min_patients_per_class: int = 3
    """Fewer validation patients than this in some class: the rule is not trusted, 0.5 is used (with a warning)."""
    calibrate: str = "none"
    """'none' or 'temperature': one softmax temperature fitted on validation only, saved in the checkpoint and
    applied by test evaluation, `vascdist evaluate` and `vascdist predict`."""

    def check(self, key: str) -> None:
        from vascdist.eval.thresholds import ThresholdRule
        _require(self.bootstrap_resamples >= 0, f"{key}.bootstrap_resamples", "must be >= 0")
        _require(0 < self.confidence < 1, f"{key}.confidence", f"must be in (0, 1), got {self.confidence}")
        ThresholdRule.parse(self.threshold, f"{key}.threshold")
        _require(self.min_patients_per_class >= 0, f"{key}.min_patients_per_class", "must be >= 0")
        _require(self.calibrate in ("none", "temperature"), f"{key}.calibrate",
                 f"must be none or temperature, got '{self.calibrate}'")


@dataclass
class RunConfig:
    name: str = "run"
    """Run name: runs/<name>/<time>/."""
    out_dir: str = "runs"
    """Parent of all run directories."""
    progress_interval_s: float = 30.0
    """Seconds between plain progress lines when stdout is not a terminal (0: a line every step)."""

    def check(self, key: str) -> None:
        _require(self.progress_interval_s >= 0, f"{key}.progress_interval_s", "must be >= 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self, key: str = "") -> None:
        batch_sizes(self.data.batch_size, 1, self.train.grad_accum)  # the world size is checked again at launch
