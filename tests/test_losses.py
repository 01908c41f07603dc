"""Tests for mammo_ray.losses: values against hand computation, stability, and the attenuation gradient property."""

from __future__ import annotations

import math

import pytest
import torch

from mammo_ray.losses import (
    AttenuationLoss,
    BCEWithLogits,
    FocalLoss,
    aleatoric_variance,
    build_loss,
    split_output,
)

# A small batch used throughout: logits x = (2, −1, 0.5), labels y = (1, 0, 0).
LOGITS = torch.tensor([[2.0], [-1.0], [0.5]])
TARGETS = torch.tensor([1.0, 0.0, 0.0])
# BCE terms: y=1 → softplus(−x), y=0 → softplus(x):
#   softplus(−2) = log(1 + e^−2) = 0.1269280110
#   softplus(−1) = log(1 + e^−1) = 0.3132616875
#   softplus(0.5) = log(1 + e^0.5) = 0.9740769842
BCE_TERMS = (0.1269280110429725, 0.31326168751822286, 0.9740769841801067)
BCE_MEAN = 0.47142222758043406  # (0.1269280110 + 0.3132616875 + 0.9740769842) / 3
BCE_POS_WEIGHT_3 = 0.5560409016090824  # (3 × 0.1269280110 + 0.3132616875 + 0.9740769842) / 3
# Focal, α = 0.25, γ = 2: p_t = σ(2) = 0.8807970780, 1 − σ(−1) = 0.7310585786, 1 − σ(0.5) = 0.3775406688
#   0.25 × (1 − 0.8807970780)² × 0.1269280110 = 0.0004508907
#   0.75 × (1 − 0.7310585786)² × 0.3132616875 = 0.0169935431
#   0.75 × (1 − 0.3775406688)² × 0.9740769842 = 0.2830587006
FOCAL_MEAN = 0.10016771149490598  # mean of the three


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def test_bce_matches_hand_computation() -> None:
    assert BCEWithLogits()(LOGITS, TARGETS).item() == pytest.approx(BCE_MEAN, rel=1e-6)
    terms = BCEWithLogits(reduction="none")(LOGITS, TARGETS)
    assert terms.tolist() == pytest.approx(BCE_TERMS, rel=1e-6)


def test_bce_pos_weight_matches_hand_computation() -> None:
    assert BCEWithLogits(pos_weight=3.0)(LOGITS, TARGETS).item() == pytest.approx(BCE_POS_WEIGHT_3, rel=1e-6)


def test_focal_matches_hand_computation() -> None:
    assert FocalLoss(alpha=0.25, gamma=2.0)(LOGITS, TARGETS).item() == pytest.approx(FOCAL_MEAN, rel=1e-6)


def test_focal_gamma0_alpha_half_is_half_bce() -> None:
    # With γ = 0 the factor (1 − p_t)^γ is 1, so FL = −α_t log p_t = α_t × BCE, and α = 0.5 makes α_t = 0.5 for both
    # classes: FL = 0.5 × BCE exactly, element by element.
    logits = torch.linspace(-8, 8, 17).unsqueeze(1)
    targets = (torch.arange(17) % 2).float()
    focal = FocalLoss(alpha=0.5, gamma=0.0)(logits, targets)
    assert torch.allclose(focal, 0.5 * BCEWithLogits()(logits, targets), rtol=1e-6, atol=0)
    assert torch.allclose(FocalLoss(alpha=None, gamma=0.0)(logits, targets), BCEWithLogits()(logits, targets))


def test_attenuation_matches_hand_computation() -> None:
    # The loss draws ε of shape (T, B) from its generator; redraw the same ε and evaluate eq. 12 with plain floats.
    mu, log_var, t_samples = [1.5, -0.5], [0.4, -1.0], 3
    loss = AttenuationLoss(t_samples, generator=torch.Generator().manual_seed(7))
    value = loss(torch.tensor([mu, log_var]).T, torch.tensor([[1.0], [0.0]])).item()

    eps = torch.randn((t_samples, 2), generator=torch.Generator().manual_seed(7)).tolist()
    per_sample = []
    for b, label in enumerate((1, 0)):
        sigma = math.exp(0.5 * log_var[b])
        probs = [_sigmoid(mu[b] + sigma * eps[t][b]) for t in range(t_samples)]
        likelihoods = [p if label == 1 else 1.0 - p for p in probs]
        per_sample.append(-math.log(sum(likelihoods) / t_samples))
    assert value == pytest.approx(sum(per_sample) / 2, rel=1e-5)


def test_attenuation_symmetric_case_is_log2() -> None:
    # μ = 0: σ(σε) and σ(−σε) are equally likely, so the expected likelihood of y = 1 is 1/2 for every σ.
    output = torch.tensor([[0.0, 2.0]])
    loss = AttenuationLoss(20_000, generator=torch.Generator().manual_seed(0))(output, torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log(2), abs=0.01)


def test_attenuation_with_vanishing_sigma_equals_bce() -> None:
    log_var = torch.full((3, 1), -30.0)  # σ = e^−15 ≈ 3e-7
    output = torch.cat([LOGITS, log_var], dim=1)
    loss = AttenuationLoss(50, generator=torch.Generator().manual_seed(0))(output, TARGETS)
    assert loss.item() == pytest.approx(BCE_MEAN, abs=1e-5)


@pytest.mark.parametrize("logit", [100.0, -100.0])
@pytest.mark.parametrize("log_var", [-30.0, 0.0, 10.0, 200.0])
def test_losses_finite_for_extreme_logits(logit: float, log_var: float) -> None:
    targets = torch.tensor([0.0, 1.0])
    output = torch.tensor([[logit, log_var], [logit, log_var]], requires_grad=True)
    for loss_fn in (BCEWithLogits(), FocalLoss(), FocalLoss(gamma=0.5), AttenuationLoss(100)):
        output.grad = None
        loss = loss_fn(output, targets)
        loss.backward()
        assert torch.isfinite(loss), loss_fn
        assert torch.isfinite(output.grad).all(), loss_fn


def _grad_wrt_log_var(loss_fn, mu: float, label: float) -> float:
    output = torch.tensor([[mu, 0.0]], requires_grad=True)
    loss_fn(output, torch.tensor([label])).backward()
    return output.grad[0, 1].item()


def _reference_noisy_bce(output: torch.Tensor, target: torch.Tensor, t_samples: int, seed: int) -> torch.Tensor:
    """The reference's version: the mean of BCE over noisy logits, i.e. the loss averaged instead of the likelihood.

    ε comes in antithetic pairs (ε, −ε). Its gradient w.r.t. s = log σ² is (σ/2)·mean_t[(σ(x̂_t) − y)·ε_t], and each
    pair contributes (σ/2)·[σ(μ + σε) − σ(μ − σε)]·ε ≥ 0 because the sigmoid increases, so the sign below does not
    depend on Monte-Carlo luck (with independent ε, the tiny Jensen gap at μ = 6 would drown in sampling noise).
    """
    mu, log_var = output[:, 0], output[:, 1]
    half = torch.randn((t_samples // 2, mu.shape[0]), generator=torch.Generator().manual_seed(seed))
    eps = torch.cat([half, -half])
    noisy = mu + torch.exp(0.5 * log_var) * eps
    return torch.nn.functional.binary_cross_entropy_with_logits(noisy, target.expand_as(noisy))


def test_attenuation_gradient_lets_sigma_grow_on_confident_errors() -> None:
    t_samples = 10_000
    wrong = _grad_wrt_log_var(AttenuationLoss(t_samples, generator=torch.Generator().manual_seed(0)), 6.0, 0.0)
    right = _grad_wrt_log_var(AttenuationLoss(t_samples, generator=torch.Generator().manual_seed(0)), 6.0, 1.0)
    # μ = +6 but y = 0: widening σ puts some samples on the right side and raises the mean likelihood, so the loss
    # falls (analytically ∂L/∂s ≈ −1/2 here) and σ is learned where the model is wrong.
    assert wrong < -0.1
    assert right >= 0  # μ = +6 and y = 1: noise can only hurt

    # Contrast: averaging BCE over noisy logits is increased by noise (Jensen: BCE is convex in the logit), so its
    # gradient w.r.t. log σ² is positive even for the confidently wrong sample and σ can only shrink.
    reference = lambda output, target: _reference_noisy_bce(output, target, t_samples, seed=0)  # noqa: E731
    assert _grad_wrt_log_var(reference, 6.0, 0.0) > 0
    assert _grad_wrt_log_var(reference, 6.0, 1.0) > 0


def test_attenuation_uses_global_rng_without_generator() -> None:
    output = torch.tensor([[1.0, 1.0], [-2.0, 0.5]])
    targets = torch.tensor([0.0, 1.0])
    torch.manual_seed(3)
    first = AttenuationLoss(5)(output, targets)
    torch.manual_seed(3)
    assert AttenuationLoss(5)(output, targets).item() == first.item()


@pytest.mark.parametrize("loss_fn", [BCEWithLogits(), FocalLoss(), AttenuationLoss(4)])
def test_target_shapes_b_and_b1_agree(loss_fn) -> None:
    output = torch.tensor([[0.3, -1.0], [-0.7, 0.2]])
    if isinstance(loss_fn, AttenuationLoss):
        loss_fn.generator = torch.Generator().manual_seed(0)
        flat = loss_fn(output, torch.tensor([1.0, 0.0]))
        loss_fn.generator = torch.Generator().manual_seed(0)
    else:
        flat = loss_fn(output, torch.tensor([1.0, 0.0]))
    assert loss_fn(output, torch.tensor([[1.0], [0.0]])).item() == pytest.approx(flat.item())
    with pytest.raises(ValueError, match="targets"):
        loss_fn(output, torch.tensor([1.0, 0.0, 1.0]))


def test_attenuation_needs_log_var_column() -> None:
    with pytest.raises(ValueError, match="attenuation=True"):
        AttenuationLoss(4)(LOGITS, TARGETS)


@pytest.mark.parametrize(
    ("shape", "has_log_var"),
    [((4,), False), ((4, 1), False), ((4, 2), True)],
)
def test_split_output(shape: tuple[int, ...], has_log_var: bool) -> None:
    output = torch.arange(8.0)[: math.prod(shape)].reshape(shape)
    logit, log_var = split_output(output)
    assert logit.shape == (4,)
    assert (log_var is not None) == has_log_var
    if has_log_var:
        assert torch.equal(logit, output[:, 0]) and torch.equal(log_var, output[:, 1])


@pytest.mark.parametrize("shape", [(4, 3), (2, 1, 1), ()])
def test_split_output_rejects_other_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="model output"):
        split_output(torch.zeros(shape))


def test_aleatoric_variance_is_exp_of_the_trained_column() -> None:
    output = torch.tensor([[0.1, 0.0], [2.0, math.log(4.0)], [-1.0, -2.0]])
    assert aleatoric_variance(output).tolist() == pytest.approx([1.0, 4.0, math.exp(-2.0)])
    with pytest.raises(ValueError, match="attenuation"):
        aleatoric_variance(LOGITS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bce", BCEWithLogits),
        ("BCELoss", BCEWithLogits),
        ("bcelogitsloss", BCEWithLogits),
        ("BCELogitsLoss", BCEWithLogits),
        ("focal", FocalLoss),
        ("FocalLoss", FocalLoss),
        ("FOCALLOSS", FocalLoss),
    ],
)
def test_build_loss_names(name: str, expected: type) -> None:
    assert type(build_loss(name)) is expected


def test_build_loss_passes_options() -> None:
    focal = build_loss("focal", focal_alpha=0.4, focal_gamma=1.0)
    assert (focal.alpha, focal.gamma) == (0.4, 1.0)
    assert build_loss("BCELoss", pos_weight=3.0)(LOGITS, TARGETS).item() == pytest.approx(BCE_POS_WEIGHT_3, rel=1e-6)
    attenuation = build_loss("bce", attenuation=True, t_samples=7)
    assert isinstance(attenuation, AttenuationLoss) and attenuation.t_samples == 7


@pytest.mark.parametrize("name", ["mse", "", "bce_logits", "sigmoid"])
def test_build_loss_rejects_unknown_names(name: str) -> None:
    with pytest.raises(ValueError, match="valid names: bce, focal"):
        build_loss(name)


def test_build_loss_rejects_focal_with_attenuation() -> None:
    with pytest.raises(ValueError, match="attenuation"):
        build_loss("focal", attenuation=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FocalLoss(alpha=1.5),
        lambda: FocalLoss(gamma=-1.0),
        lambda: AttenuationLoss(0),
        lambda: AttenuationLoss(4, base="focal"),
        lambda: BCEWithLogits(reduction="max"),
    ],
)
def test_bad_loss_arguments(make) -> None:
    with pytest.raises(ValueError):
        make()
