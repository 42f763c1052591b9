"""Evaluation without training: metrics at the cycle, recording and patient levels (metrics), patient bootstrap
intervals (bootstrap), calibration (calibration), the decision-threshold rule (thresholds), running a model over
a split (evaluate), the assessment of one split that the loop, `vascdist evaluate`, `cv` and `report` share
(assess), the typed results it makes (results) and their text (table), and the metrics per site (sites)."""
