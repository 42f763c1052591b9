"""Per site and class, what the PhysioNet 2016 recordings look like: the medians behind
docs/design/physionet2016-recipe.md ("The signal").

Usage: python tests/physionet2016_signal.py ../shared/realdata/physionet2016
Prints, per site and class: length, level (dBFS), in-recording contrast (90th minus 10th percentile of the 50 ms
frame energy in 25-400 Hz, dB), spectral centroid in 20-900 Hz and the share of that power above 200 Hz.
"""

import csv
import sys

import numpy as np
import soundfile as sf
from scipy.signal import butter, sosfiltfilt, welch

RATE = 2000
HEART_BAND = butter(4, [25, 400], btype="band", fs=RATE, output="sos")


def describe(x: np.ndarray) -> list[float]:
    """[length s, level dBFS, contrast dB, centroid Hz, share of 20-900 Hz power above 200 Hz]."""
    y = sosfiltfilt(HEART_BAND, x)
    frames = y[: len(y) // 100 * 100].reshape(-1, 100)  # 50 ms at 2 kHz
    energy = 10 * np.log10((frames ** 2).mean(1) + 1e-12)
    f, p = welch(x, fs=RATE, nperseg=512)
    band = (f >= 20) & (f <= 900)
    centroid = (f[band] * p[band]).sum() / p[band].sum()
    high = p[(f > 200) & band].sum() / p[band].sum()
    return [len(x) / RATE, 10 * np.log10((x ** 2).mean() + 1e-12),
            np.percentile(energy, 90) - np.percentile(energy, 10), centroid, high]


def main(root: str) -> None:
    for site in ("training-a", "training-b"):
        rows = list(csv.reader(open(f"{root}/{site}/REFERENCE.csv")))
        for label, name in (("-1", "normal"), ("1", "abnormal")):
            stats = np.array([describe(sf.read(f"{root}/{site}/{rec}.wav")[0]) for rec, lab in rows if lab == label])
            med = np.median(stats, 0)
            print(f"{site} {name:8s} n={len(stats):3d} length {med[0]:.1f} s  level {med[1]:.1f} dBFS  "
                  f"contrast {med[2]:.1f} dB  centroid {med[3]:.0f} Hz  above 200 Hz {100 * med[4]:.1f} %")


if __name__ == "__main__":
    main(sys.argv[1])
