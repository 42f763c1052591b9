"""What `vascdist predict` prints as text: the model's provenance once, a verdict (or NO VERDICT and its reasons)
per recording with its quality, a verdict per patient, and the decision rule. The results themselves are
inference.predict's; this module only words them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vascdist.data.provenance import Provenance


def prediction_lines(provenance: Provenance, results: list[dict], verdicts: list[dict]) -> list[str]:
    """predict's text output, line by line."""
    lines = [provenance.describe()]
    for r in results:
        lines += recording_lines(r) + quality_lines(r)
    lines += [patient_line(v) for v in verdicts]
    decided = [r for r in results if r["verdict"] is not None]
    if decided:
        lines.append(decision_rule(decided[0]))
    return lines


def recording_lines(r: dict) -> list[str]:
    """A recording's verdict with its probabilities (mean and per cycle), or NO VERDICT and a line per reason."""
    from vascdist.data.provenance import DEMONSTRATION_NOTE
    note = f"  [{DEMONSTRATION_NOTE}]" if r.get("demonstration_model") else ""
    if r["verdict"] is None:
        return [f"{r['file']}: NO VERDICT{note}"] + [f"  no verdict: {reason}" for reason in r["reasons"]]
    probs = "  ".join(f"P({k})={v:.3f}" for k, v in r["probabilities"].items())
    per_cycle = " ".join(f"{list(c['probabilities'].values())[-1]:.2f}" for c in r["cycles"])
    return [f"{r['file']}: {r['verdict'].upper()}  {probs}  ({len(r['cycles'])} cycles; "
            f"per-cycle P({list(r['probabilities'])[-1]}): {per_cycle}){note}"]


def quality_lines(r: dict) -> list[str]:
    """One quality line per recording; a warning line per reason to doubt it."""
    q = r.get("quality") or {}
    lines = []
    if q:
        hr = f"{q['heart_rate_bpm']:.0f} bpm" if q.get("heart_rate_bpm") else "no heart rate"
        lines.append(f"  quality: {hr}, periodicity {q.get('periodicity', float('nan')):.2f}, level "
                     f"{q.get('level_dbfs')} dBFS, SNR >= {q.get('snr_db')} dB, clipping {q.get('clipping_fraction')}, "
                     f"hum {q.get('hum_db')} dB")
    return lines + [f"  warning: {w}" for w in r.get("warnings", [])]


def patient_line(v: dict) -> str:
    """A patient's verdict (inference.patient_verdicts), with the recordings it left out."""
    if v["verdict"] is None:
        return f"patient {v['patient']}: NO VERDICT  (none of its {len(v['left_out'])} recordings got one)"
    left = f"; no verdict, left out: {', '.join(v['left_out'])}" if v["left_out"] else ""
    probs = "  ".join(f"P({k})={p:.3f}" for k, p in v["probabilities"].items())
    cut = "" if v["threshold"] is None else f", threshold {v['threshold']:.3f}"
    warn = f", {v['warnings']} quality warnings" if v["warnings"] else ""
    return (f"patient {v['patient']}: {v['verdict'].upper()}  {probs}  ({len(v['recordings'])} recordings{cut}"
            f"{warn}{left})")


def decision_rule(result: dict) -> str:
    """The line that says how predict turned probabilities into verdicts: the threshold, where it came from and
    by which rule (eval.threshold), and the temperature the probabilities were scaled by (eval.calibrate)."""
    classes = list(result["probabilities"])
    temperature = float(result.get("temperature", 1.0))
    scaled = f"; probabilities after temperature scaling, T = {temperature:.3f}" if temperature != 1.0 else ""
    if result["threshold"] is None:
        return f"verdict: the class of highest mean probability ({', '.join(classes)}){scaled}"
    where = "chosen on the validation set" if result.get("threshold_source") == "validation" else \
        "the default: this checkpoint holds no validation threshold"
    rule = f", rule {result['threshold_rule'].removesuffix(' on validation')}" if result.get("threshold_rule") else ""
    return (f"verdict: {classes[1]} when the mean P({classes[1]}) over cycles >= {result['threshold']:.3f} "
            f"(threshold {where}{rule}{scaled})")
