"""The typed results (vascdist.eval.results, vascdist.cv.results): their JSON form reads back to the same result, the
typed reads, and the printed text, which is the text the string-keyed dicts printed before for the same figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vascdist.cv.results import CvResult, Pooled, Spread
from vascdist.eval.results import Estimate, Excluded, RunResult, SiteRow, SplitReport, estimates
from vascdist.eval.table import format_sites, split_summary
from vascdist.fileio import json_safe

NAMES = ["accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auroc", "auprc", "ece",
         "brier"]
EXCLUDED = Excluded(2, 1, {"normal": 1, "stenosis": 1}, [{"id": "r9", "label": "normal", "reason": "silent"},
                                                        {"id": "r10", "label": "stenosis", "reason": "aperiodic"}])
SITES = {"upper_arm": SiteRow({"recording/balanced_accuracy": Estimate(0.75, (0.5, 1.0)),
                               "recording/auroc": Estimate(0.8, (0.6, 1.0)), "recording/sensitivity": Estimate(1.0),
                               "recording/specificity": Estimate(0.5), "recording/n": Estimate(4)},
                              {"recording": [[1, 1], [0, 2]]}, {"normal": 2, "stenosis": 2})}

# What `vascdist train` printed for these figures before the results were typed (main at 45c6f4c: assess.split_summary
# and sites.format_sites of the flat dicts).
PRINTED = """test set (normal, stenosis), thresholds chosen on validation; best step 42
n = 5 patients (2 normal / 3 stenosis), 8 recordings (3 / 5), 120 cycles (50 / 70); excluded in preprocessing: 2 recordings, 1 patients
[90 % interval: bootstrap over patients]
                                  cycle           recording             patient
balanced_accuracy      0.89 [0.79-0.94]    0.79 [0.69-0.84]    0.69 [0.59-0.74]
sensitivity            0.88 [0.78-0.93]    0.78 [0.68-0.83]    0.68 [0.58-0.73]
specificity            0.87 [0.77-0.92]    0.77 [0.67-0.82]    0.67 [0.57-0.72]
ppv                    0.86 [0.76-0.91]    0.76 [0.66-0.81]    0.66 [0.56-0.71]
npv                    0.85 [0.75-0.90]    0.75 [0.65-0.80]    0.65 [0.55-0.70]
f1                     0.84 [0.74-0.89]    0.74 [0.64-0.79]    0.64 [0.54-0.69]
auroc                  0.83 [0.73-0.88]    0.73 [0.63-0.78]                 n/a
auprc                  0.82 [0.72-0.87]    0.72 [0.62-0.77]    0.62 [0.52-0.67]
ece                    0.81 [0.71-0.86]    0.71 [0.61-0.76]    0.61 [0.51-0.66]
brier                  0.80 [0.70-0.85]    0.70 [0.60-0.75]    0.60 [0.50-0.65]
n                                   120                   8                   5
threshold                          0.25                0.50                0.62
threshold rule: youden on validation
temperature scaling: T = 1.500 (fitted on validation)"""
PRINTED_SITES = """per site, recording level [90 % interval: bootstrap over the site's patients]:
site                 n (per class)   balanced_accuracy               auroc         sensitivity         specificity
upper_arm                    2 / 2    0.75 [0.50-1.00]    0.80 [0.60-1.00]                1.00                0.50"""


def a_report(nan: bool = True) -> SplitReport:
    values, intervals, confusion = {}, {}, {}
    for lv, base in (("cycle", 0.9), ("recording", 0.8), ("patient", 0.7)):
        for i, name in enumerate(NAMES):
            values[f"{lv}/{name}"] = round(base - 0.01 * i, 4)
            intervals[f"{lv}/{name}"] = (round(base - 0.01 * i - 0.1, 4), round(min(base - 0.01 * i + 0.05, 1.0), 4))
        values[f"{lv}/n"] = {"cycle": 120, "recording": 8, "patient": 5}[lv]
        values[f"{lv}/threshold"] = {"cycle": 0.25, "recording": 0.5, "patient": 0.625}[lv]
        confusion[lv] = [[3, 1], [0, 4]]
    if nan:  # an undefined metric (one class only among the patients) and its undefined interval
        values["patient/auroc"], intervals["patient/auroc"] = math.nan, (math.nan, math.nan)
    counts = {"patients": {"normal": 2, "stenosis": 3}, "recordings": {"normal": 3, "stenosis": 5},
              "cycles": {"normal": 50, "stenosis": 70}}
    calibration = {"patient/calibration_slope": Estimate(0.9, (0.7, 1.1)), "patient/calibration_intercept": Estimate(-0.1)}
    return SplitReport("test", ["normal", "stenosis"], estimates(values, intervals), confusion, counts, 0.9, step=42,
                       threshold_rule="youden on validation", temperature=1.5, calibration=calibration,
                       calibration_caveat="", excluded=EXCLUDED, sites=SITES)


def on_disk(record: dict) -> dict:
    """A record as written (fileio.atomic_write_json: NaN as null) and read back."""
    return json.loads(json.dumps(json_safe(record)))


def test_the_json_form_reads_back_to_the_same_report():
    report = a_report(nan=False)
    assert SplitReport.from_record(on_disk(report.to_record()), "test") == report
    record = report.to_record()
    assert record["recording/balanced_accuracy"] == {"value": 0.79, "lo": 0.69, "hi": 0.84}
    assert record["recording/n"] == 8 and record["recording/confusion"] == [[3, 1], [0, 4]]
    assert record["checkpoint_step"] == 42 and record["threshold_rule"] == "youden on validation"
    assert record["recording/excluded"] == 2 and record["excluded_recordings"][0]["reason"] == "silent"
    assert record["sites"]["upper_arm"]["intervals"]["recording/auroc"] == [0.6, 1.0]
    assert record["patient/calibration_intercept"] == -0.1 and record["calibration_caveat"] == ""
    undefined = SplitReport.from_record(on_disk(a_report().to_record()), "test").metrics["patient/auroc"]
    assert math.isnan(undefined.value) and all(math.isnan(b) for b in undefined.interval)  # null on disk


def test_typed_reads():
    report = a_report()
    assert report.value("recording/balanced_accuracy") == 0.79 and report.levels == ["cycle", "recording", "patient"]
    assert report.thresholds == {"cycle": 0.25, "recording": 0.5, "patient": 0.625}
    assert report.threshold_state() == {**report.thresholds, "rule": "youden on validation"}  # as a checkpoint keeps it
    values = report.selection_values()
    assert "recording/n" not in values and values["temperature"] == 1.5 and "loss" not in values
    scalars = report.scalars()
    assert scalars["recording/auroc/lo"] == 0.63 and scalars["patient/calibration_slope"] == 0.9
    assert "recording/threshold/lo" not in scalars
    result = RunResult(Path("run"), 90, finished="done", best_step=42, classes=report.classes,
                       reports={"test": report})
    assert result.test is report and not (result.stopped or result.complete)


def test_the_printed_summary_is_the_text_printed_before():
    report = a_report()
    assert split_summary(report, 42) == PRINTED
    assert format_sites(report.sites, report.confidence) == PRINTED_SITES
    read_back = SplitReport.from_record(on_disk(report.to_record()), "test")
    assert split_summary(read_back, 42) == PRINTED  # the file prints as the run did
    val = SplitReport("val", report.classes, report.metrics, counts=report.counts)
    assert split_summary(val, 7).splitlines()[0] == ("val set (normal, stenosis), thresholds chosen on this set; "
                                                     "best step 7")


def test_the_cv_aggregate_reads_back():
    pooled = Pooled(estimates({"recording/auroc": 0.8, "recording/n": 20}, {"recording/auroc": (0.7, 0.9)}),
                    {"recordings": {"normal": 10, "stenosis": 10}}, ["r0-f1", "r0-f2"], complete=True)
    site = Pooled(estimates({"recording/auroc": 0.7}, {}), {"recordings": {"normal": 4, "stenosis": 6}}, ["r0-f1"])
    result = CvResult("cv", "patient", 2, 1, 0, ["normal", "stenosis"], ["r0-f1", "r0-f2"], {},
                      {"r0-f1": {"recording/auroc": 0.75}, "r0-f2": {"recording/auroc": 0.85}},
                      {"recording/auroc": Spread(0.8, 0.07, 0.75, 0.85, 2)}, {"0": pooled}, {"upper_arm": site},
                      "", 0.95)
    data = on_disk(result.to_json())
    assert CvResult.from_json(data) == result and result.level == "recording"
    assert data["pooled"]["0"]["intervals"] == {"recording/auroc": [0.7, 0.9]} and data["pooled"]["0"]["complete"]
    assert "complete" not in data["sites"]["upper_arm"]
    single = CvResult.from_json(on_disk({**result.to_json(), "spread": {"recording/auroc": Spread(
        0.8, math.nan, 0.8, 0.8, 1).to_json()}}))
    assert math.isnan(single.spread["recording/auroc"].sd)
