"""RunLogger: what it writes is read back with TensorBoard's own EventAccumulator and with json."""

import io
from contextlib import closing
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from vascdist.errors import VascdistError
from vascdist.train.runlog import RunLogger, flatten_hparams


def _read_events(tb_dir) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(tb_dir), size_guidance={kind: 0 for kind in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def _png(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


def test_scalars_and_jsonl(tmp_path):
    with closing(RunLogger(tmp_path, enabled=True)) as log:
        for step in (1, 2, 3):
            log.scalars(step, {"train/loss": 1.0 / step, "train/grad_norm": torch.tensor(2.0 * step),
                               "train/lr": np.float32(0.5)})
        log.scalars(4, {"train/loss": math.nan})
        log.jsonl({"step": 3, "split": "val", "acc": 0.75, "bad": math.nan, "inf": -math.inf,
                   "confusion": np.array([[3, 1], [0, 4]]), "n": np.int64(8), "t": torch.tensor(0.5)})
        log.scalars(5, {"test/auc": 0.9})
        log.jsonl({"step": 5, "split": "test", "auc": 0.9, "confusion": [[1, 0], [0, 1]]})
    acc = _read_events(tmp_path / "tb")
    assert {"train/loss", "train/grad_norm", "train/lr", "test/auc"} <= set(acc.Tags()["scalars"])
    assert "test/confusion" not in acc.Tags()["scalars"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss[:3]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert math.isnan(loss[3].value)
    assert [e.value for e in acc.Scalars("train/grad_norm")] == pytest.approx([2.0, 4.0, 6.0])

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict: NaN / Infinity would not be valid JSON here
    assert all("NaN" not in line and "Infinity" not in line for line in lines)
    val, test = records
    assert val["step"] == 3 and val["split"] == "val" and val["acc"] == 0.75
    assert val["bad"] is None and val["inf"] is None
    assert val["confusion"] == [[3, 1], [0, 4]] and val["n"] == 8 and val["t"] == 0.5
    assert isinstance(val["time"], float)
    assert test["step"] == 5 and test["split"] == "test" and test["confusion"] == [[1, 0], [0, 1]]


def test_jsonl_appends_across_loggers(tmp_path):
    # A resumed run opens a second logger on the same run directory.
    for step in (1, 2):
        with closing(RunLogger(tmp_path, enabled=True, purge_step=step)) as log:
            log.jsonl({"step": step, "kind": "train"})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_image_and_images_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
    batch = torch.stack([torch.arange(20.0).reshape(1, 4, 5),            # ramp 0..19
                         -3.0 * torch.arange(20.0).reshape(1, 4, 5),     # decreasing, negative
                         torch.full((1, 4, 5), 7.0)])                    # constant
    with closing(RunLogger(tmp_path, enabled=True)) as log:
        log.image("val/confusion", 3, rgb)
        log.images("val/spectrogram_examples", 0, batch)  # (N=3, C=1, F=4, T=5)
    acc = _read_events(tmp_path / "tb")
    assert set(acc.Tags()["images"]) == {"val/confusion", "val/spectrogram_examples"}
    (conf,) = acc.Images("val/confusion")
    assert conf.step == 3 and (conf.height, conf.width) == (6, 10)
    np.testing.assert_array_equal(_png(conf), rgb)  # PNG is lossless

    (grid_event,) = acc.Images("val/spectrogram_examples")
    grid = _png(grid_event)[:, :, 0].astype(int)  # grey drawn as equal RGB channels
    assert grid.shape == (4, 15)  # three 4 x 5 tiles in one row
    ramp = np.round(np.arange(20).reshape(4, 5) / 19 * 255)
    assert np.abs(grid[:, :5] - ramp).max() <= 1  # each tile spans the full range on its own
    assert np.abs(grid[:, 5:10] - (255 - ramp)).max() <= 1
    assert (grid[:, 10:] == 0).all()  # constant image: no division by zero


def test_images_with_two_channels_draws_each_channel(tmp_path):
    with closing(RunLogger(tmp_path, enabled=True)) as log:
        log.images("x", 0, np.random.default_rng(0).normal(size=(2, 2, 3, 4)).astype(np.float32))
    (event,) = _read_events(tmp_path / "tb").Images("x")
    assert (event.height, event.width) == (3, 16)


def test_pr_curve_counts(tmp_path):
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    scores = np.array([0.95, 0.75, 0.45, 0.65, 0.25, 0.05, 0.55, 0.99])  # off bucket edges
    with closing(RunLogger(tmp_path, enabled=True)) as log:
        log.pr_curve("val/pr_cycle", 7, labels, torch.tensor(scores), num_thresholds=11)
    acc = _read_events(tmp_path / "tb")
    assert "val/pr_cycle" in acc.Tags()["tensors"]
    (event,) = acc.Tensors("val/pr_cycle")
    assert event.step == 7
    tp, fp, tn, fn, precision, recall = tensor_util.make_ndarray(event.tensor_proto)
    buckets = np.floor(scores * 10)  # TensorBoard's bucketing for 11 thresholds
    for i in range(11):
        assert tp[i] == ((buckets >= i) & (labels == 1)).sum()
        assert fp[i] == ((buckets >= i) & (labels == 0)).sum()
        assert tn[i] == ((buckets < i) & (labels == 0)).sum()
        assert fn[i] == ((buckets < i) & (labels == 1)).sum()
    assert recall[0] == 1.0 and precision[0] == 0.5
    assert precision[7] == pytest.approx(1.0) and recall[7] == pytest.approx(0.75)  # scores >= 0.7


def test_pr_curve_rejects_logits_and_bad_labels(tmp_path):
    with closing(RunLogger(tmp_path, enabled=True)) as log:
        with pytest.raises(VascdistError, match="probabilities in"):
            log.pr_curve("x", 0, [0, 1], [-2.0, 3.0])
        with pytest.raises(VascdistError, match="labels must be 0/1"):
            log.pr_curve("x", 0, [0, 2], [0.1, 0.9])
        with pytest.raises(VascdistError, match="2 labels but 3 scores"):
            log.pr_curve("x", 0, [0, 1], [0.1, 0.9, 0.5])


def test_hparams_flattened_into_the_run(tmp_path):
    config = {"optim": {"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999], "nesterov": False},
              "model": {"name": "resnet18", "width": 0.25}, "loss": {"class_weights": []},
              "preprocess": {"classes": ["normal", "stenosis"], "split": {"seed": 3}}, "extra": None}
    with closing(RunLogger(tmp_path, enabled=True)) as log:
        log.hparams(config, {"final/recording/auc": 0.875}, step=12)
    acc = _read_events(tmp_path / "tb")  # the run's own directory, not a time-named sub-run
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optim.lr"].number_value == pytest.approx(0.05)
    assert hp["optim.name"].string_value == "sgd"
    assert hp["optim.nesterov"].bool_value is False
    assert json.loads(hp["optim.betas"].string_value) == [0.9, 0.999]
    assert json.loads(hp["preprocess.classes"].string_value) == ["normal", "stenosis"]
    assert hp["preprocess.split.seed"].number_value == 3
    assert hp["extra"].string_value == "None"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["final/recording/auc"]
    (metric,) = acc.Scalars("final/recording/auc")
    assert metric.step == 12 and metric.value == pytest.approx(0.875)


def test_flatten_hparams_of_the_real_config():
    from vascdist.config import Config, to_dict
    flat = flatten_hparams(to_dict(Config()))
    assert flat["optim.lr"] == Config().optim.lr
    assert flat["preprocess.audio.sample_rate"] == Config().preprocess.audio.sample_rate
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    log = RunLogger(run_dir, enabled=False)
    log.scalars(1, {"a": 1.0})
    log.jsonl({"step": 1})
    log.image("i", 1, np.zeros((2, 2, 3), np.uint8))
    log.images("s", 1, torch.zeros(1, 1, 2, 2))
    log.pr_curve("p", 1, [0, 1], [0.2, 0.8])
    log.hparams({"a": {"b": 1}}, {"m": 1.0})
    log.close()
    assert not run_dir.exists()
    assert not log.active


def test_closed_logger_ignores_late_calls(tmp_path):
    log = RunLogger(tmp_path, enabled=True)
    log.jsonl({"step": 1})
    log.close()
    log.close()
    log.jsonl({"step": 2})
    log.scalars(2, {"a": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(list((tmp_path / "tb").iterdir())) == 1  # no second event file was opened
