"""Model registry and models: shapes, gradients, width/stem scaling, FLOP counting, clear config errors."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import vascdist.models.registry as models
from vascdist.cli import main
from vascdist.config import ModelConfig
from vascdist.errors import ConfigError
from vascdist.models import build_model, count_flops, create_model, list_models
from vascdist.models.crnn import AttentionPool

SPEC = (1, 40, 100)  # (C, F, T) log-mel cycle
BEAT = (1, 187)  # (C, L) MIT-BIH beat
ALL = ["cnn_small", "crnn", "mlp", "resnet18", "resnet34", "resnet50", "resnext1d", "resnext50_32x4d"]
CASES = [(n, s) for n in ALL for s in (SPEC, BEAT) if len(s) in models._MODELS[n].input_ranks]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model_and_filters_by_pattern():
    assert list_models() == ALL
    assert list_models("resnet*") == ["resnet18", "resnet34", "resnet50"]
    assert list_models("res*") == ["resnet18", "resnet34", "resnet50", "resnext1d", "resnext50_32x4d"]
    assert list_models("nothing*") == []


def test_cli_models_prints_matching_names(capsys):
    assert main(["models", "resnext*"]) == 0
    assert capsys.readouterr().out.split() == ["resnext1d", "resnext50_32x4d"]


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{len(s) - 1}d" for n, s in CASES])
def test_model_gives_logits_and_gradients(name, shape):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, input_shape=shape, width=0.125)
    x = torch.randn(2, *shape)
    logits = model(x)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # zero_init_residual zeroes the gradient inside each residual branch at first, but the first layer
    # (reached through the identity paths) and the classifier must learn.
    assert grads[0].abs().sum() > 0 and grads[-2].abs().sum() > 0


@pytest.mark.parametrize("name", [n for n, s in CASES if len(s) == 3])
def test_2d_models_run_channels_last_with_the_same_result(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, input_shape=SPEC, width=0.125).eval()
    x = torch.randn(2, *SPEC)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "resnext1d", "cnn_small"])
def test_width_multiplier_scales_parameters_about_quadratically(name):
    shape = BEAT if name == "resnext1d" else SPEC
    half, full = (_params(create_model(name, 2, shape, width=w)) for w in (0.5, 1.0))
    assert 3.3 < full / half < 4.3, (name, full / half)


def test_resnet18_width_sets_the_stage_planes():
    model = create_model("resnet18", 2, SPEC, width=0.25)
    planes = [getattr(model, f"layer{i}")[0].conv2.out_channels for i in range(1, 5)]
    assert planes == [16, 32, 64, 128]
    assert model.fc.in_features == 128


@pytest.mark.parametrize("width,groups", [(1.0, 32), (0.25, 8), (0.3, 10), (0.1, 3)])
def test_resnext_groups_follow_width_and_divide_the_inner_width(width, groups):
    model = create_model("resnext50_32x4d", 2, SPEC, width=width)
    for i in range(1, 5):
        conv = getattr(model, f"layer{i}")[0].conv2
        assert conv.groups == groups
        assert conv.out_channels == groups * 4 * 2 ** (i - 1)  # 4 channels per group, doubling per stage


def test_stem_choice_sets_the_feature_map_size():
    x = torch.randn(2, *SPEC)
    small = create_model("resnet18", 2, SPEC, width=0.25, stem="small")
    imagenet = create_model("resnet18", 2, SPEC, width=0.25, stem="imagenet")
    assert small.forward_stem(x).shape == (2, 16, 40, 100)  # 3x3/1, no pool: full resolution
    assert imagenet.forward_stem(x).shape == (2, 16, 10, 25)  # 7x7/2 conv then 3x3/2 max-pool
    assert isinstance(imagenet.maxpool, nn.MaxPool2d) and imagenet.conv1.kernel_size == (7, 7)
    # Every later layer works on 16x more positions with the small stem.
    ratio = count_flops(small, SPEC) / count_flops(imagenet, SPEC)
    assert 10 < ratio < 17


def test_zero_init_residual_is_on_by_default_and_optional():
    on = create_model("resnet18", 2, SPEC, width=0.125)
    off = create_model("resnet18", 2, SPEC, width=0.125, zero_init_residual=False)
    blocks = [b for i in range(1, 5) for b in getattr(on, f"layer{i}")]
    assert all(torch.all(b.bn2.weight == 0) for b in blocks)
    assert all(torch.all(b.bn2.weight == 1) for i in range(1, 5) for b in getattr(off, f"layer{i}"))
    bottleneck = create_model("resnet50", 2, SPEC, width=0.125)
    assert torch.all(bottleneck.layer1[0].bn3.weight == 0)


def test_resnext1d_on_mitbih_beats_with_the_raw_input_connection():
    torch.manual_seed(0)
    model = create_model("resnext1d", num_classes=5, input_shape=BEAT, width=0.25)
    seen = []
    for stage in model.stages:
        stage.blocks.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape, out.shape)))
    logits = model(torch.randn(4, *BEAT))
    assert logits.shape == (4, 5)
    # Each stage's blocks see its input concatenated along time with the projected raw beat (187 samples),
    # and the stride-2 stage brings the length back to 187.
    assert [s[0][-1] for s in seen] == [187 + 187] * 3
    assert [s[1][-1] for s in seen] == [187] * 3
    assert [s[1][1] for s in seen] == [32, 64, 128]  # 8 groups x 4/8/16 channels at width 0.25
    for length in (64, 300):  # adaptive pooling: any beat length works
        other = create_model("resnext1d", 5, (1, length), width=0.125)
        assert other(torch.randn(2, 1, length)).shape == (2, 5)


def test_attention_pool_weights_sum_to_one():
    pool = AttentionPool(dim=6, hidden=4)
    frame = torch.randn(3, 1, 6)
    # The same frame at every time step: any convex combination of them is that frame.
    assert torch.allclose(pool(frame.expand(3, 7, 6)), frame[:, 0], atol=1e-6)
    h = torch.randn(3, 7, 6)
    out = pool(h)
    assert torch.all(out <= h.max(dim=1).values + 1e-6) and torch.all(out >= h.min(dim=1).values - 1e-6)


def test_baselines_accept_small_and_odd_shapes():
    for shape in [(2, 8, 5), (1, 3), (3, 50)]:
        for name in ("cnn_small", "mlp"):
            assert create_model(name, 4, shape, width=0.25)(torch.randn(2, *shape)).shape == (2, 4)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        create_model("resnet9", 2, SPEC)
    msg = str(err.value)
    assert "model.name 'resnet9' is unknown; choose one of:" in msg
    assert all(name in msg for name in ALL)
    with pytest.raises(ConfigError, match="resnet9"):
        build_model(ModelConfig(name="resnet9"), 2, SPEC)


@pytest.mark.parametrize("name,shape", [("resnet18", BEAT), ("crnn", BEAT), ("resnext1d", SPEC)])
def test_model_on_data_of_the_wrong_rank_is_a_clear_config_error(name, shape):
    with pytest.raises(ConfigError) as err:
        create_model(name, 2, shape)
    msg = str(err.value)
    assert f"model.name '{name}'" in msg and str(shape) in msg
    fitting = msg.split("models for this data:")[1]
    assert ("resnext1d" in fitting) == (len(shape) == 2) and ("resnet18" in fitting) == (len(shape) == 3)


def test_bad_options_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match="model.stem"):
        create_model("resnet18", 2, SPEC, stem="tiny")
    with pytest.raises(ConfigError, match="model.width"):
        create_model("crnn", 2, SPEC, width=0)
    with pytest.raises(ConfigError, match="model.dropout"):
        create_model("mlp", 2, SPEC, dropout=1.0)
    with pytest.raises(ConfigError, match="does not take option.*stem.*it takes: width, dropout"):
        create_model("mlp", 2, SPEC, stem="small")


def test_build_model_uses_the_config_section():
    model = build_model(ModelConfig(name="resnet34", stem="imagenet", width=0.125, dropout=0.3), 2, SPEC)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.out_channels == 8
    assert model.drop.p == 0.3 and model.fc.out_features == 2
    # model.stem only reaches models that have a stem.
    beat_model = build_model(ModelConfig(name="resnext1d", stem="imagenet", width=0.125, dropout=0.1), 5, BEAT)
    assert beat_model.drop.p == 0.1 and beat_model.fc.out_features == 5


def test_count_flops_is_exact_on_a_linear_layer_and_restores_training_mode():
    layer = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_flops(layer, (3, 4)) == 2 * 12 * 5  # one multiply and one add per weight, per sample
    assert layer.training


def test_count_flops_scales_about_fourfold_from_half_to_full_width():
    half, full = (count_flops(create_model("resnet18", 2, SPEC, width=w, stem="imagenet"), SPEC)
                  for w in (0.5, 1.0))
    assert half > 0
    assert 3.5 < full / half < 4.2, full / half


def test_models_know_nothing_of_torch_distributed():
    uses = re.compile(r"import torch\.distributed|from torch\.distributed|from torch import distributed|\bdist\.")
    for path in Path(models.__file__).parent.glob("*.py"):
        assert not uses.search(path.read_text()), path.name
