"""Metrics per site (the manifest's `site` column: a centre, or a recording site on the arm) within one split, each
with a patient-bootstrap interval, and the warning when the classes' proportions differ strongly between sites.

A model can learn which site a recording comes from instead of its class when the sites' class mixes differ: in the
PhysioNet 2016 subsets a and b, 71 % and 21 % of the recordings are abnormal, and a classifier trained on both
learned the subset. The warning's rule (CONFOUND_GAP): among the sites with at least CONFOUND_MIN_RECORDINGS
recordings, the share of some class differs between two sites by more than 20 percentage points.
"""

from __future__ import annotations

import numpy as np

from vascdist.config import EvalConfig
from vascdist.eval.bootstrap import bootstrap_intervals
from vascdist.eval.metrics import evaluate_levels
from vascdist.eval.results import SiteRow, estimates

CONFOUND_GAP = 0.20  # largest minus smallest share of a class across sites (fraction of recordings)
CONFOUND_MIN_RECORDINGS = 10  # a site with fewer recordings has too noisy a share to compare
SITE_LEVELS = ("recording", "patient")


def recording_sites(index: dict) -> np.ndarray:
    """The site of every recording of the shard index, by recording number ('' where the manifest gave none)."""
    return np.array([r.get("site", "") for r in index["recordings"]], dtype=object)


def site_metrics(arrays: dict[str, np.ndarray], index: dict, thresholds: dict[str, float] | None,
                 cfg: EvalConfig | None = None) -> dict[str, SiteRow]:
    """{site: SiteRow} for the recording and patient levels of every site in the split, at the split's thresholds
    (those chosen on validation), with patient-bootstrap intervals by `cfg` (none when cfg is None or
    eval.bootstrap_resamples is 0) and the site's recordings per class. Empty when no recording names a site."""
    sites = recording_sites(index)
    if not len(arrays["recording"]) or not any(sites):
        return {}
    site_of = sites[np.asarray(arrays["recording"]).astype(np.int64)]
    classes = index["classes"]
    out = {}
    for site in sorted(set(site_of) - {""}):
        keep = site_of == site
        part = {k: np.asarray(arrays[k])[keep] for k in ("probs", "y", "recording", "patient")}
        metrics = evaluate_levels(part["probs"], part["y"], part["recording"], part["patient"], classes, thresholds)
        metrics = {k: v for k, v in metrics.items() if k.split("/")[0] in SITE_LEVELS}
        intervals = {}
        if cfg is not None and cfg.bootstrap_resamples:
            levels = {lv: thresholds[lv] for lv in SITE_LEVELS} if thresholds else None
            intervals = bootstrap_intervals(part["probs"], part["y"], part["recording"], part["patient"], classes,
                                            levels, cfg.bootstrap_resamples, cfg.bootstrap_seed, cfg.confidence,
                                            SITE_LEVELS)
        recordings = np.unique(part["recording"])
        labels = np.array([index["recordings"][r]["label"] for r in recordings], dtype=np.int64)
        confusion = {k.split("/")[0]: metrics.pop(k) for k in [k for k in metrics if k.endswith("/confusion")]}
        out[site] = SiteRow(estimates(metrics, intervals), confusion,
                            dict(zip(classes, np.bincount(labels, minlength=len(classes)).tolist())))
    return out


def split_sites(arrays: dict[str, np.ndarray], index: dict, thresholds: dict[str, float], cfg: EvalConfig
                ) -> dict[str, SiteRow]:
    """site_metrics of a split at the thresholds its metrics used (binary; `thresholds` is ignored otherwise), with
    intervals by `cfg`."""
    return site_metrics(arrays, index, thresholds if len(index["classes"]) == 2 else None, cfg)


def class_mix(index: dict, recordings: list[int] | None = None) -> dict[str, dict[str, int]]:
    """{site: {class: recordings}} over the given recording numbers (default: every recording of the index)."""
    classes = index["classes"]
    mix: dict[str, dict[str, int]] = {}
    for i in (range(len(index["recordings"])) if recordings is None else recordings):
        rec = index["recordings"][i]
        if rec.get("site"):
            counts = mix.setdefault(rec["site"], dict.fromkeys(classes, 0))
            counts[classes[int(rec["label"])]] += 1
    return mix


def confound_warning(mix: dict[str, dict[str, int]]) -> str:
    """One line when the classes' shares differ strongly between sites (see the module docstring), else ''."""
    usable = {s: c for s, c in mix.items() if sum(c.values()) >= CONFOUND_MIN_RECORDINGS}
    if len(usable) < 2:
        return ""
    classes = list(next(iter(usable.values())))
    shares = {s: {k: n / sum(c.values()) for k, n in c.items()} for s, c in usable.items()}
    gaps = {k: max(sh[k] for sh in shares.values()) - min(sh[k] for sh in shares.values()) for k in classes}
    worst = max(reversed(classes), key=lambda k: round(gaps[k], 9))  # binary: equal gaps; name the positive class
    if gaps[worst] <= CONFOUND_GAP:
        return ""
    listed = ", ".join(f"{s} {100 * sh[worst]:.0f} %" for s, sh in sorted(shares.items()))
    return (f"warning: the share of '{worst}' differs strongly between sites ({listed} of recordings; rule: more than "
            f"{100 * CONFOUND_GAP:.0f} points apart): a model can learn the site instead of the class; trust the "
            "per-site and leave-one-site-out figures (vascdist cv --group-by site)")
