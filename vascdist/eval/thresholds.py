"""The rule that picks the binary decision threshold on validation (eval.threshold), and its fallback.

    youden            maximise sensitivity + specificity - 1 (metrics.youden_threshold)
    sensitivity:0.90  the highest threshold whose sensitivity reaches 0.90 (screening: miss few stenoses)
    specificity:0.90  the lowest threshold whose specificity reaches 0.90
    fixed:0.5         that value, whatever validation says ('fixed' alone is 0.5)

A threshold chosen on a validation split with very few patients of a class is noise, so when validation has
fewer than eval.min_patients_per_class patients of some class the rule falls back to 0.5 with a warning.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from vascdist.errors import ConfigError

KINDS = ("youden", "sensitivity", "specificity", "fixed")


@dataclass(frozen=True)
class ThresholdRule:
    kind: str = "youden"
    target: float = 0.5

    @classmethod
    def parse(cls, text: str, key: str = "eval.threshold") -> ThresholdRule:
        kind, _, value = text.strip().partition(":")
        if kind not in KINDS:
            raise ConfigError(f"config key '{key}' must be youden, sensitivity:<0-1>, specificity:<0-1> or "
                              f"fixed[:<0-1>], got '{text}'")
        if kind == "youden":
            if value:
                raise ConfigError(f"config key '{key}': youden takes no value, got '{text}'")
            return cls("youden")
        if not value and kind == "fixed":
            return cls("fixed", 0.5)
        try:
            target = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}': '{value}' in '{text}' is not a number") from None
        if not 0 <= target <= 1:
            raise ConfigError(f"config key '{key}': {kind} target must be in [0, 1], got {target}")
        return cls(kind, target)

    def describe(self) -> str:
        return "youden" if self.kind == "youden" else f"{self.kind}:{self.target:g}"

    def choose(self, scores: np.ndarray, labels: np.ndarray) -> float:
        """The threshold on P(class 1) (predict positive iff score >= threshold); 0.5 with one class only."""
        if self.kind == "fixed":
            return self.target
        if self.kind == "youden":
            from vascdist.eval.metrics import youden_threshold  # here: the config check imports this module
            return youden_threshold(scores, labels)
        scores = np.asarray(scores, dtype=np.float64)
        is_pos = np.asarray(labels).astype(np.int64) == 1
        if is_pos.all() or not is_pos.any():
            return 0.5
        candidates = np.unique(scores)[::-1]  # descending; predicting positive from each one down
        tp = np.searchsorted(np.sort(scores[is_pos]), candidates, side="left")
        sensitivity = 1 - tp / is_pos.sum()  # positives with score >= candidate
        tn = np.searchsorted(np.sort(scores[~is_pos]), candidates, side="left")
        specificity = tn / (~is_pos).sum()  # negatives below the candidate
        if self.kind == "sensitivity":  # sensitivity grows as the threshold falls: the first that reaches it
            return float(candidates[int(np.argmax(sensitivity >= self.target))])
        ok = np.flatnonzero(specificity >= self.target)  # specificity falls with the threshold: the last that keeps it
        return float(candidates[ok[-1]]) if ok.size else float(candidates[0])


def fallback_reason(patients_per_class: dict[str, int], min_patients: int) -> str | None:
    """Why the rule may not be trusted on this validation split (None: it may)."""
    few = {c: n for c, n in patients_per_class.items() if n < min_patients}
    if not few:
        return None
    listed = ", ".join(f"{n} {c}" for c, n in few.items())
    return f"validation has {listed} patient(s), fewer than eval.min_patients_per_class={min_patients}"


_WARNED: set[str] = set()


def resolve(rule: ThresholdRule, patients_per_class: dict[str, int], min_patients: int) -> tuple[ThresholdRule, str]:
    """(the rule to apply, its description for the table); a fallback to fixed 0.5 is warned about."""
    reason = fallback_reason(patients_per_class, min_patients) if rule.kind != "fixed" else None
    if reason is None:
        return rule, f"{rule.describe()} on validation"
    warning = f"warning: threshold rule {rule.describe()} not applied: {reason}; using 0.5"
    if warning not in _WARNED:  # one line, once per process (it would repeat at every validation)
        _WARNED.add(warning)
        print(warning, file=sys.stderr, flush=True)
    return ThresholdRule("fixed", 0.5), f"fixed:0.5 (fallback from {rule.describe()}: {reason})"
