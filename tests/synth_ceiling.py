"""How hard is the synthetic set? Hand-made spectral features + logistic regression, patient-level CV.

Usage: python tests/synth_ceiling.py OUT_DIR [N_PATIENTS=200] [SEED=0]
Prints: ambiguous fraction, recording-level balanced accuracy of (a) hand features measured from the audio
(b) the generator's own latent cues (true break frequency, true diastolic fraction) = ceiling of a perfect
feature extractor for those two cues.
"""
import csv, sys, time
from pathlib import Path

import numpy as np
from scipy.signal import welch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vascdist.config import AudioConfig, CycleConfig
from vascdist.data.audio import load_audio
from vascdist.data.cycles import segment
from vascdist.data.synth import draw_patient, synthesize

out = Path(sys.argv[1]); n_pat = int(sys.argv[2]) if len(sys.argv) > 2 else 200
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
t0 = time.time(); manifest = synthesize(out, n_patients=n_pat, seed=seed)
print(f"synthesize({n_pat}) {time.time() - t0:.1f} s")
rows = list(csv.DictReader(open(manifest)))
acfg, ccfg = AudioConfig(), CycleConfig(); fs = acfg.sample_rate


def rolloff(f, p, q):
    c = np.cumsum(p); return f[np.searchsorted(c, q * c[-1])]


def features(x):
    """Break-frequency proxies from the Welch PSD and a systolic/diastolic energy ratio per cycle."""
    f, p = welch(x, fs, nperseg=1024)
    band = (f >= 30) & (f <= 1800)
    f, p = f[band], p[band]
    centroid = np.sum(f * p) / np.sum(p)
    onsets = segment(x, fs, ccfg).onsets  # an aperiodic recording: its fixed windows (ratio near 0)
    sys_e, dia_e, sys_c, dia_c = [], [], [], []
    for a, b in zip(onsets[:-1], onsets[1:]):
        L = b - a
        s, d = x[a:a + int(0.3 * L)], x[a + int(0.6 * L):b]
        sys_e.append(np.mean(s ** 2)); dia_e.append(np.mean(d ** 2))
    sd_ratio = np.median(np.log(np.array(sys_e) / np.array(dia_e)))
    return [np.log(centroid), np.log(rolloff(f, p, 0.5)), np.log(rolloff(f, p, 0.85)), np.log(rolloff(f, p, 0.95)),
            sd_ratio]


t0 = time.time()
X = np.array([features(load_audio(out / r["path"], acfg)) for r in rows])
print(f"features {time.time() - t0:.1f} s for {len(rows)} recordings")
y = np.array([r["label"] == "stenosis" for r in rows], int)
groups = np.array([r["patient_id"] for r in rows])
sev = {r["patient_id"]: float(r["severity"]) for r in rows}
s = np.array(list(sev.values()))
print(f"patients {len(sev)}: stenosis {np.mean(s >= 0.5):.2f}; |severity-0.5|<0.05: {np.mean(np.abs(s - 0.5) < 0.05):.3f}; "
      f"<0.10: {np.mean(np.abs(s - 0.5) < 0.10):.3f}")

# Latent cues straight from the generator (same draws as synthesize: stream (seed, i), patient drawn first).
lat = {}
for i in range(n_pat):
    p = draw_patient(np.random.default_rng([seed, i]), f"p{i:0{max(3, len(str(n_pat - 1)))}d}")
    lat[p.patient_id] = [np.log(p.break_hz), p.diastolic_fraction]
XL = np.array([lat[g] for g in groups])


def cv_bacc(X, repeats=5):
    scores, pat_scores = [], []
    for rep in range(repeats):
        pred = np.zeros(len(y))
        for tr, te in StratifiedGroupKFold(5, shuffle=True, random_state=rep).split(X, y, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=10.0, max_iter=1000)).fit(X[tr], y[tr])
            pred[te] = model.predict_proba(X[te])[:, 1]
        scores.append(balanced_accuracy_score(y, pred >= 0.5))
        pp = {g: pred[groups == g].mean() for g in set(groups)}
        yy = {g: y[groups == g][0] for g in set(groups)}
        pat_scores.append(balanced_accuracy_score([yy[g] for g in pp], [pp[g] >= 0.5 for g in pp]))
    return np.mean(scores), np.min(scores), np.max(scores), np.mean(pat_scores)


for name, feats in [("hand features (audio)", X), ("break freq only (audio)", X[:, :4]),
                    ("sys/dia ratio only (audio)", X[:, 4:]), ("latent cues (oracle extractor)", XL)]:
    m, lo, hi, pm = cv_bacc(feats)
    print(f"{name:32s} recording bal.acc {m:.3f} (5 CV repeats: {lo:.3f}-{hi:.3f}); patient bal.acc {pm:.3f}")
