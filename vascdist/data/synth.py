"""Synthetic hemodialysis-access recordings: deterministic for a seed, physically motivated, never trivially easy.

Each patient has a stenosis severity s in [0, 0.9] (fractional diameter reduction; label 'stenosis' iff s >= 0.5).
A recording is built from:
  * heartbeats at 55-100 bpm with respiratory and random beat-to-beat variability;
  * a pulsatile flow envelope per beat (sin^2 systolic rise of 50-90 ms, exponential diastolic decay) on top of
    the continuous diastolic flow of a fistula; the diastolic fraction shrinks as s grows, so the
    systolic/diastolic energy ratio grows with stenosis;
  * a bruit: noise shaped by a spectrum that is flat up to a break frequency and falls as f^-2 (power f^-4)
    above it. Phonoangiography (Duncan et al.; Lees & Dewey) relates the break frequency to the jet through the
    residual lumen: f_break = f0 / (1 - s), i.e. inversely proportional to the residual diameter. The systolic
    jet is faster than the diastolic flow, so its break frequency is higher;
  * a low-frequency flow shape peaking at 40-80 Hz (as the real recordings do), falling as f^-0.75 to the break;
  * on a third of the venous-side recordings a damped pulsatility (a continuous bruit with a shallow envelope,
    like the real venous file);
  * a per-patient sensor/skin coloration (tilt, one resonance, tissue low-pass), motion bursts, broadband sensor
    noise at a random SNR, in a fifth of the recordings a faint 50 or 60 Hz mains hum, and a level drawn over
    -40..-12 dBFS RMS (recorders differ that widely; a loud motion burst may clip).
Per-patient spread of f0 and of the diastolic fraction makes severities near 0.5 genuinely ambiguous.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from vascdist.data.audio import SYNTH_MARK
from vascdist.errors import VascdistError
from vascdist.fileio import atomic_write_text

GENERATOR_VERSION = 7
"""Bump when the generated data changes, so cached data sets are regenerated."""
STENOSIS_THRESHOLD = 0.5
SITES = ("arterial_anastomosis", "mid_fistula", "venous_outflow", "upper_arm")
SITE_GAIN_DB = {"arterial_anastomosis": 1.5, "mid_fistula": 0.0, "venous_outflow": -0.5, "upper_arm": -1.5}
SNR_DB_RANGE = (12.0, 30.0)
"""Default broadband-noise SNR (dB, relative to the bruit), drawn uniformly per recording."""
BREAK_F0_HZ = 220.0
"""Break frequency of a normal access's diastolic bruit (f0 of f_break = f0 / (1 - s))."""
FLOW_PEAK_HZ = (40.0, 80.0)
"""Where a bruit's spectrum peaks (per patient): the real recordings peak at 40-80 Hz, below the break."""
HUM_PROBABILITY = 0.2
"""Fraction of recordings with mains hum; the real files show no line at all."""
HUM_DB_RANGE = (-50.0, -35.0)
"""Hum amplitude relative to the unit-RMS bruit (dB): a faint line when present."""
LEVEL_DBFS_RANGE = (-40.0, -12.0)
"""RMS level of a recording (dBFS), drawn per recording: recorders and their gains differ that widely."""
SHALLOW_PROBABILITY = 0.35
"""Fraction of the venous-side recordings (venous_outflow, upper_arm) whose pulsatility is damped, as in the
real venous file: a continuous bruit with a shallow pulsatile envelope."""
DURATION_S_RANGE = (20.0, 40.0)
MANIFEST_COLUMNS = ("path", "label", "patient_id", "recording_id", "severity", "site")


@dataclass
class Patient:
    """Latent parameters shared by all recordings of one patient."""
    patient_id: str
    severity: float
    heart_rate_bpm: float
    rise_s: float  # systolic upstroke duration
    decay_s: float  # diastolic decay time constant
    diastolic_fraction: float  # bruit amplitude in diastole relative to the systolic peak
    break_hz: float  # bruit break frequency (diastolic flow; the systolic jet's is 1.5x)
    mains_hz: float
    flow_peak_hz: float  # where the bruit spectrum peaks (below the break)
    tilt: float  # coloration: spectral tilt exponent around 200 Hz
    resonance_hz: float
    resonance_db: float
    resonance_oct: float
    tissue_lowpass_hz: float


def draw_severity(rng: np.random.Generator) -> float:
    """Mixture: 44% clearly normal (0.05-0.40), 44% clearly stenotic (0.60-0.90), 12% borderline (uniform
    0.40-0.60, where the cues of the two classes overlap: genuinely ambiguous)."""
    u = rng.random()
    if u < 0.44:
        s = 0.05 + 0.35 * rng.beta(2.0, 2.0)
    elif u < 0.88:
        s = 0.60 + 0.30 * rng.beta(2.0, 2.0)
    else:
        s = rng.uniform(0.40, 0.60)
    return round(float(s), 3)  # rounded first, so the label agrees with the manifest value


def draw_patient(rng: np.random.Generator, patient_id: str) -> Patient:
    """Draw one patient's latent physiology and sensor from its own random stream."""
    s = draw_severity(rng)
    return Patient(
        patient_id=patient_id,
        severity=s,
        heart_rate_bpm=rng.uniform(55.0, 100.0),
        rise_s=rng.uniform(0.05, 0.09),
        decay_s=rng.uniform(0.10, 0.22),
        diastolic_fraction=float(np.clip(0.55 - 0.55 * s + rng.normal(0.0, 0.05), 0.04, 0.7)),
        break_hz=BREAK_F0_HZ * np.exp(rng.normal(0.0, 0.12)) / (1.0 - s),
        mains_hz=float(rng.choice([50.0, 60.0])),
        flow_peak_hz=rng.uniform(*FLOW_PEAK_HZ),
        tilt=rng.uniform(-0.15, 0.15),
        resonance_hz=float(np.exp(rng.uniform(np.log(80.0), np.log(800.0)))),
        resonance_db=rng.uniform(-4.0, 4.0),
        resonance_oct=rng.uniform(0.3, 0.8),
        tissue_lowpass_hz=rng.uniform(800.0, 1600.0),
    )


def beat_onsets(rng: np.random.Generator, heart_rate_bpm: float, duration_s: float) -> np.ndarray:
    """Onset times (s) of every beat that starts in [0, duration); the recording starts at a random phase.

    RR intervals vary with breathing (respiratory sinus arrhythmia) and randomly beat to beat.
    """
    period = 60.0 / heart_rate_bpm
    rsa, hrv = rng.uniform(0.02, 0.06), rng.uniform(0.01, 0.04)
    resp_s, resp_phase = rng.uniform(3.0, 6.0), rng.uniform(0, 2 * np.pi)
    t, onsets = -rng.uniform(0.0, period), []
    while t < duration_s:
        onsets.append(t)
        rr = period * (1 + rsa * np.sin(2 * np.pi * t / resp_s + resp_phase) + hrv * rng.standard_normal())
        t += float(np.clip(rr, 0.75 * period, 1.25 * period))
    onsets = np.asarray(onsets)
    return onsets[onsets >= 0.0] if len(onsets) else onsets


def pulse_envelope(t: np.ndarray, onsets: np.ndarray, amplitudes: np.ndarray, rise_s: float, decay_s: float) -> np.ndarray:
    """Systolic flow pulse train: sin^2 rise over rise_s, then exp decay; the two latest beats overlap.

    `onsets` includes beats before t=0 so the first partial cycle is shaped too.
    """
    env = np.zeros_like(t)
    last = np.searchsorted(onsets, t, side="right") - 1  # index of the latest onset at or before each t
    for back in (0, 1):  # the current beat and the tail of the previous one
        k = last - back
        valid = k >= 0
        tau = np.where(valid, t - onsets[np.maximum(k, 0)], 0.0)
        rise = np.sin(0.5 * np.pi * np.minimum(tau / rise_s, 1.0)) ** 2
        shape = np.where(tau < rise_s, rise, np.exp(-(tau - rise_s) / decay_s))
        env += np.where(valid, amplitudes[np.maximum(k, 0)] * shape, 0.0)
    return env


def break_spectrum(freqs: np.ndarray, break_hz: float) -> np.ndarray:
    """Bruit amplitude spectrum: flat to break_hz, f^-2 above; gentle 20 Hz high-pass (no DC flow noise)."""
    hp = (freqs / 20.0) ** 2 / (1.0 + (freqs / 20.0) ** 2)
    return hp / np.sqrt(1.0 + (freqs / break_hz) ** 4)


FLOW_SLOPE = 0.75  # amplitude falls as f^-0.75 (power f^-1.5) from the flow peak to the break


def flow_peak(freqs: np.ndarray, peak_hz: float) -> np.ndarray:
    """Low-frequency shape of turbulent-flow noise: rising as f below peak_hz, falling as f^-FLOW_SLOPE above
    (a wall-pressure spectrum), 1 at the peak; the break spectrum steepens it further above its break."""
    x = np.maximum(freqs, 1e-3) / peak_hz
    return x * (2.0 / (1.0 + x ** 2)) ** ((1.0 + FLOW_SLOPE) / 2.0)


def coloration(freqs: np.ndarray, p: Patient) -> np.ndarray:
    """Per-patient sensor + skin response: tilt, one resonance (Gaussian in octaves), first-order tissue low-pass."""
    f = np.maximum(freqs, 1.0)
    tilt = (f / 200.0) ** p.tilt
    res_db = p.resonance_db * np.exp(-0.5 * (np.log2(f / p.resonance_hz) / p.resonance_oct) ** 2)
    tissue = 1.0 / np.sqrt(1.0 + (f / p.tissue_lowpass_hz) ** 2)
    return tilt * 10 ** (res_db / 20.0) * tissue


def _shaped(spectrum_of_white: np.ndarray, response: np.ndarray, n: int) -> np.ndarray:
    """White noise spectrum x response -> time signal with unit RMS."""
    x = np.fft.irfft(spectrum_of_white * response, n=n)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def render_recording(rng: np.random.Generator, p: Patient, site: str, sample_rate: int,
                     duration_s: float, snr_db: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One recording of patient `p` at `site` -> (float32 samples in [-1, 1], true onset times in s).

    snr_db: broadband-noise SNR; None draws it from SNR_DB_RANGE.
    """
    n = int(round(duration_s * sample_rate))
    t = np.arange(n) / sample_rate
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)

    # Heartbeats, including the one in progress at t=0 (so the recording starts mid-cycle).
    onsets = beat_onsets(rng, p.heart_rate_bpm, duration_s + 1.0)
    first = onsets[0] - 60.0 / p.heart_rate_bpm if len(onsets) else -1.0
    all_onsets = np.concatenate([[first], onsets])
    amplitudes = 1.0 + 0.06 * rng.standard_normal(len(all_onsets))  # stroke-volume variability
    systole = pulse_envelope(t, all_onsets, amplitudes, p.rise_s, p.decay_s)

    # Bruit: diastolic flow noise plus the systolic jet, both shaped from one white source (coherent low band).
    d = float(np.clip(p.diastolic_fraction + rng.normal(0.0, 0.015), 0.03, 0.8))
    if site in ("venous_outflow", "upper_arm") and rng.random() < SHALLOW_PROBABILITY:
        d = 1.0 - (1.0 - d) * rng.uniform(0.4, 0.7)  # far from the anastomosis the flow pulse is damped
    fb = p.break_hz * np.exp(rng.normal(0.0, 0.04))  # small site-to-site variation
    white = np.fft.rfft(rng.standard_normal(n))
    shape = flow_peak(freqs, p.flow_peak_hz)
    bruit = d * _shaped(white, shape * break_spectrum(freqs, 0.8 * fb), n) \
        + (1 - d) * systole * _shaped(white, shape * break_spectrum(freqs, 1.5 * fb), n)

    # Motion bursts: Hann-windowed low-frequency thumps, picked up through the same sensor as the bruit.
    bruit_rms = np.sqrt(np.mean(bruit ** 2))
    burst_env = np.zeros(n)
    for _ in range(rng.poisson(duration_s / 25.0)):
        length = int(rng.uniform(0.08, 0.4) * sample_rate)
        start = int(rng.integers(0, max(1, n - length)))
        burst_env[start:start + length] += 10 ** (rng.uniform(6.0, 16.0) / 20.0) * np.hanning(length)[: n - start]
    if burst_env.any():
        thump = _shaped(np.fft.rfft(rng.standard_normal(n)), break_spectrum(freqs, rng.uniform(40.0, 200.0)), n)
        bruit = bruit + bruit_rms * burst_env * thump

    x = np.fft.irfft(np.fft.rfft(bruit) * coloration(freqs, p), n=n)
    x /= np.sqrt(np.mean(x ** 2)) + 1e-12  # unit-RMS colored bruit (bursts included)

    # Electronic noise and mains hum come after the sensor's acoustic coloration.
    snr = rng.uniform(*SNR_DB_RANGE) if snr_db is None else snr_db
    x += 10 ** (-snr / 20.0) * rng.standard_normal(n)
    if rng.random() < HUM_PROBABILITY:
        hum_amp = 10 ** (rng.uniform(*HUM_DB_RANGE) / 20.0) * np.sqrt(2)
        mains = p.mains_hz + rng.normal(0.0, 0.03)
        for harmonic, rel in ((1, 1.0), (2, rng.uniform(0.1, 0.4)), (3, rng.uniform(0.05, 0.3))):
            x += hum_amp * rel * np.sin(2 * np.pi * harmonic * mains * t + rng.uniform(0, 2 * np.pi))

    gain_db = rng.uniform(*LEVEL_DBFS_RANGE) + SITE_GAIN_DB[site] - 20 * np.log10(np.sqrt(np.mean(x ** 2)))
    x = np.clip(x * 10 ** (gain_db / 20.0), -1.0, 1.0)  # a strong motion burst may clip, as it would on a device
    truth = onsets[onsets < duration_s]
    return x.astype(np.float32), truth


def _params(n_patients: int, seed: int, sample_rate: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "n_patients": n_patients, "seed": seed,
            "sample_rate": sample_rate}


def synthesize(out_dir: str | Path, n_patients: int = 40, seed: int = 0, sample_rate: int = 4000) -> Path:
    """Write out_dir/wav/*.wav (mono PCM_16), manifest.csv, onsets.json and synth.json; return the manifest path.

    Deterministic for (n_patients, seed, sample_rate): patient i is drawn from its own stream seeded by
    (seed, i), so a bigger data set extends a smaller one. If synth.json already records the same parameters,
    nothing is regenerated. synth.json is removed first and written last, so an interrupted run is redone.
    """
    if n_patients < 1:
        raise VascdistError(f"synthesize: n_patients must be >= 1, got {n_patients}")
    if sample_rate < 1000:
        raise VascdistError(f"synthesize: sample_rate must be >= 1000 Hz, got {sample_rate}")
    out = Path(out_dir)
    manifest, marker = out / "manifest.csv", out / "synth.json"
    params = _params(n_patients, seed, sample_rate)
    if marker.is_file() and manifest.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return manifest
        except json.JSONDecodeError:
            pass  # a damaged marker: regenerate
    marker.unlink(missing_ok=True)
    (out / "wav").mkdir(parents=True, exist_ok=True)

    width = max(3, len(str(n_patients - 1)))
    rows, onsets = [], {}
    for i in range(n_patients):
        rng = np.random.default_rng([seed, i])
        patient = draw_patient(rng, f"p{i:0{width}d}")
        label = "stenosis" if patient.severity >= STENOSIS_THRESHOLD else "normal"
        sites = [SITES[k] for k in sorted(rng.choice(len(SITES), size=int(rng.integers(2, 5)), replace=False))]
        for site in sites:
            duration = round(float(rng.uniform(*DURATION_S_RANGE)), 1)
            samples, truth = render_recording(rng, patient, site, sample_rate, duration)
            rec_id = f"{patient.patient_id}_{site}"
            rel = f"wav/{rec_id}.wav"
            with sf.SoundFile(out / rel, "w", sample_rate, 1, subtype="PCM_16") as fh:
                fh.comment = f"{SYNTH_MARK} {GENERATOR_VERSION}, seed {seed}"  # the source, for provenance
                fh.write(samples)
            rows.append({"path": rel, "label": label, "patient_id": patient.patient_id, "recording_id": rec_id,
                         "severity": f"{patient.severity:.3f}", "site": site})
            onsets[rec_id] = [round(float(v), 4) for v in truth]

    lines = [",".join(MANIFEST_COLUMNS)] + [",".join(r[c] for c in MANIFEST_COLUMNS) for r in rows]
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    atomic_write_text(out / "onsets.json", json.dumps(onsets, indent=1))
    atomic_write_text(marker, json.dumps(params, indent=1))
    return manifest

