"""Losses: the recipe's worked example, agreement with naive / torch formulas, stability, config checks."""

import pytest
import torch
import torch.nn.functional as F

from vascdist.config import LossConfig
from vascdist.errors import ConfigError
from vascdist.train.losses import build_loss

RECIPE_LOGITS = torch.tensor([[2.0, 0.5], [0.1, 3.0], [1.5, 1.5]])
RECIPE_LABELS = torch.tensor([0, 1, 1])


def _naive_bce_onehot(logits, labels, weight=None):
    """The recipe written the obvious way: BCE(softmax(logits), one_hot), mean over C then (weighted) over N."""
    p = torch.softmax(logits, dim=-1)
    target = F.one_hot(labels, logits.shape[-1]).to(p.dtype)
    per_sample = F.binary_cross_entropy(p, target, reduction="none").mean(dim=-1)
    if weight is None:
        return per_sample.mean()
    w = weight[labels]
    return (w * per_sample).sum() / w.sum()


def test_bce_onehot_recipe_worked_example():
    loss = build_loss(LossConfig(name="bce_onehot"), num_classes=2)(RECIPE_LOGITS, RECIPE_LABELS)
    assert loss.shape == ()
    assert round(loss.item(), 3) == 0.316
    assert loss.item() == pytest.approx(_naive_bce_onehot(RECIPE_LOGITS, RECIPE_LABELS).item(), abs=1e-6)


@pytest.mark.parametrize("weights", [[], [1.0, 3.0, 0.5, 2.0]])
def test_bce_onehot_matches_naive_formula_on_moderate_logits(weights):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (64,), generator=gen)
    loss = build_loss(LossConfig(name="bce_onehot", class_weights=weights), num_classes=4)
    weight = torch.tensor(weights, dtype=torch.float64) if weights else None
    expected = _naive_bce_onehot(logits, labels, weight)
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_bce_onehot_is_finite_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0], [0.0, 1e4], [-1e4, 1e4]], requires_grad=True)
    labels = torch.tensor([1, 1, 0])  # all confidently wrong except the middle one
    loss = build_loss(LossConfig(name="bce_onehot"), num_classes=2)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Row 0: -log p_1 = 1e4 and -log(1 - p_0) = 1e4 -> 1e4; row 1: ~0; row 2: 2e4 each -> 2e4. Mean 1e4.
    assert loss.item() == pytest.approx(1e4, rel=1e-6)


@pytest.mark.parametrize("name", ["bce_onehot", "cross_entropy", "focal"])
def test_every_loss_is_finite_and_differentiable_for_extreme_logits(name):
    cfg = LossConfig(name=name, focal_gamma=0.5, class_weights=[1.0, 2.0])
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [3e4, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    loss = build_loss(cfg, num_classes=2)(logits, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_losses_accept_bf16_logits_and_compute_in_float32():
    logits = RECIPE_LOGITS.to(torch.bfloat16)
    loss = build_loss(LossConfig(name="bce_onehot"), num_classes=2)(logits, RECIPE_LABELS)
    assert loss.dtype == torch.float32
    assert round(loss.item(), 3) == 0.316  # these logits are exact in bf16


def test_cross_entropy_uses_weights_and_label_smoothing():
    cfg = LossConfig(name="cross_entropy", class_weights=[1.0, 4.0], label_smoothing=0.1)
    got = build_loss(cfg, num_classes=2)(RECIPE_LOGITS, RECIPE_LABELS)
    want = F.cross_entropy(RECIPE_LOGITS, RECIPE_LABELS, weight=torch.tensor([1.0, 4.0]), label_smoothing=0.1)
    assert got.item() == pytest.approx(want.item(), abs=1e-7)
    plain = build_loss(LossConfig(name="cross_entropy"), num_classes=2)(RECIPE_LOGITS, RECIPE_LABELS)
    assert plain.item() != pytest.approx(got.item(), abs=1e-3)  # the options really change the value


@pytest.mark.parametrize("weights", [[], [2.0, 0.5, 1.0]])
def test_focal_with_gamma_zero_and_no_alpha_equals_cross_entropy(weights):
    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(32, 3, generator=gen)
    labels = torch.randint(0, 3, (32,), generator=gen)
    focal = build_loss(LossConfig(name="focal", focal_gamma=0.0, class_weights=weights), num_classes=3)
    ce = build_loss(LossConfig(name="cross_entropy", class_weights=weights), num_classes=3)
    assert focal(logits, labels).item() == pytest.approx(ce(logits, labels).item(), rel=1e-6)


def test_focal_gamma_and_alpha_follow_the_formula():
    cfg = LossConfig(name="focal", focal_gamma=2.0, focal_alpha=[0.25, 0.75])
    got = build_loss(cfg, num_classes=2)(RECIPE_LOGITS, RECIPE_LABELS)
    p_true = torch.softmax(RECIPE_LOGITS, dim=-1)[torch.arange(3), RECIPE_LABELS]
    alpha = torch.tensor([0.25, 0.75])[RECIPE_LABELS]
    want = (-alpha * (1 - p_true) ** 2 * torch.log(p_true)).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # Focusing down-weights the easy samples, so the loss is below cross-entropy.
    assert got.item() < F.cross_entropy(RECIPE_LOGITS, RECIPE_LABELS).item()


@pytest.mark.parametrize("field,name", [("class_weights", "bce_onehot"), ("class_weights", "focal"),
                                        ("focal_alpha", "focal")])
def test_per_class_lists_must_have_one_entry_per_class(field, name):
    cfg = LossConfig(name=name, **{field: [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        build_loss(cfg, num_classes=2)


def test_negative_weights_and_misplaced_label_smoothing_are_config_errors():
    with pytest.raises(ConfigError, match="loss.class_weights"):
        build_loss(LossConfig(class_weights=[1.0, -1.0]), num_classes=2)
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        build_loss(LossConfig(name="focal", label_smoothing=0.1), num_classes=2)
