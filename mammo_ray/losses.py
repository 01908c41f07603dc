"""Losses for the binary cancer classifier, all on logits: BCE, focal, and learned loss attenuation.

Every loss is an ``nn.Module`` without I/O whose ``forward(output, target)`` takes the model's raw output, ``(B, 1)``
logits or ``(B, 2)`` ``[μ, log σ²]`` in attenuation mode, and float 0/1 targets of shape ``(B,)`` or ``(B, 1)``.
No loss applies a sigmoid first: the logit forms are numerically stable, and the reference script's sigmoid before
a loss that applies its own sigmoid trained on σ(σ(x)). Losses are computed in float32 even under autocast.

- **BCE** on logits, optionally with ``pos_weight``.
- **Focal loss**, Lin et al. 2017, "Focal Loss for Dense Object Detection" (ICCV), eq. 5.
- **Learned loss attenuation**, Kendall & Gal 2017, "What Uncertainties Do We Need in Bayesian Deep Learning for
  Computer Vision?" (NeurIPS), eq. 12: the head predicts a logit mean μ and a log-variance s = log σ², the loss
  averages the *likelihood* over T Gaussian samples of the logit, so that a large σ lowers the loss of samples the
  model cannot get right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSS_NAMES",
    "AttenuationLoss",
    "BCEWithLogits",
    "FocalLoss",
    "aleatoric_variance",
    "build_loss",
    "split_output",
]

# log σ² is clamped before exponentiating: σ = exp(20) ≈ 5e8 is far beyond any useful logit noise, and the clamp
# keeps exp() finite for an untrained head. The lower bound lets σ reach 2e-9, i.e. plain BCE.
LOG_VAR_MIN, LOG_VAR_MAX = -40.0, 40.0
REDUCTIONS = ("mean", "sum", "none")


def split_output(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a model output into the logit and, in attenuation mode, the log-variance.

    Args:
        output: ``(B,)`` or ``(B, 1)`` logits, or ``(B, 2)`` ``[μ, log σ²]``.

    Returns:
        ``(logit, log_var)``, each of shape ``(B,)``; ``log_var`` is None for a one-logit output.

    Raises:
        ValueError: For any other shape.
    """
    if output.ndim == 1:
        return output, None
    if output.ndim == 2 and output.shape[1] == 1:
        return output[:, 0], None
    if output.ndim == 2 and output.shape[1] == 2:
        return output[:, 0], output[:, 1]
    raise ValueError(f"expected model output of shape (B,), (B, 1) or (B, 2), got {tuple(output.shape)}")


def aleatoric_variance(output: torch.Tensor) -> torch.Tensor:
    """Aleatoric uncertainty σ² = exp(log σ²) of an attenuation-mode output, in logit space.

    This is the σ² of the very head column that :class:`AttenuationLoss` trains (with the same clamp), so the
    reported uncertainty is the noise scale the loss actually learned, not a separately fitted quantity.

    Args:
        output: ``(B, 2)`` ``[μ, log σ²]``.

    Returns:
        ``(B,)`` variances.

    Raises:
        ValueError: If the output has no log-variance column (the model was not built with ``attenuation=True``).
    """
    _, log_var = split_output(output)
    if log_var is None:
        raise ValueError("aleatoric variance needs a (B, 2) [mu, log_var] output; build the model with attenuation")
    return torch.exp(log_var.float().clamp(LOG_VAR_MIN, LOG_VAR_MAX))


def _as_target(target: torch.Tensor, batch: int) -> torch.Tensor:
    if target.numel() != batch or target.ndim > 2 or (target.ndim == 2 and target.shape[1] != 1):
        raise ValueError(f"expected targets of shape ({batch},) or ({batch}, 1), got {tuple(target.shape)}")
    return target.reshape(batch).float()


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    return reduction


class BCEWithLogits(nn.Module):
    """Binary cross-entropy on logits.

    ``ℓ(x, y) = −[w₊·y·log σ(x) + (1 − y)·log(1 − σ(x))]``, averaged over the batch, with ``w₊ = pos_weight``
    (1 by default). Computed as ``softplus`` terms by ``F.binary_cross_entropy_with_logits``, so that it stays
    finite for any logit. On a ``(B, 2)`` output it scores μ and ignores log σ².

    Args:
        pos_weight: Weight of the positive term, e.g. negatives/positives to balance classes.
        reduction: ``mean``, ``sum`` or ``none``.
    """

    def __init__(self, pos_weight: float | torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        # A buffer so that it follows the module to the GPU; not persistent, it is configuration, not state.
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32), False
        )

    def elementwise(self, logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element loss for logits and targets of broadcastable shapes (``−log p(y | x)`` when unweighted)."""
        target = torch.broadcast_to(target, logit.shape)
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logit.dtype)
        return F.binary_cross_entropy_with_logits(logit, target, pos_weight=pos_weight, reduction="none")

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of a ``(B, 1)``/``(B, 2)`` output against ``(B,)``/``(B, 1)`` 0/1 targets."""
        logit, _ = split_output(output)
        return _reduce(self.elementwise(logit.float(), _as_target(target, logit.shape[0])), self.reduction)


class FocalLoss(nn.Module):
    """Focal loss on logits (Lin et al. 2017, eq. 5).

    ``FL(x, y) = −α_t·(1 − p_t)^γ·log p_t`` with ``p_t = σ(x)`` and ``α_t = α`` for positives, ``p_t = 1 − σ(x)`` and
    ``α_t = 1 − α`` for negatives, averaged over the batch. ``log p_t = −BCE(x, y)`` comes from the stable
    logits BCE, and ``1 − p_t = −expm1(log p_t)``, so no probability is formed by a sigmoid and then logged.

    With γ = 0 the modulating factor is 1 and ``FL = α·BCE`` on positives, ``(1 − α)·BCE`` on negatives; with
    α = 0.5 that is exactly ``0.5·BCE``. ``alpha=None`` drops the α_t weight.

    Args:
        alpha: Weight of positives (negatives get 1 − α); None for no class weight.
        gamma: Focusing parameter γ ≥ 0.
        reduction: ``mean``, ``sum`` or ``none``.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal alpha must be in [0, 1] or None, got {alpha}")
        if gamma < 0:
            raise ValueError(f"focal gamma must be ≥ 0, got {gamma}")
        self.alpha, self.gamma, self.reduction = alpha, gamma, _check_reduction(reduction)

    def elementwise(self, logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element focal loss for logits and targets of broadcastable shapes."""
        target = torch.broadcast_to(target, logit.shape)
        log_pt = -F.binary_cross_entropy_with_logits(logit, target, reduction="none")
        loss = -log_pt
        if self.gamma != 0:
            # The clamp keeps (1 − p_t)^γ differentiable where p_t rounds to 1 and γ < 1 (x^γ' is infinite at 0).
            one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
            loss = one_minus_pt.pow(self.gamma) * loss
        if self.alpha is not None:
            loss = (self.alpha * target + (1.0 - self.alpha) * (1.0 - target)) * loss
        return loss

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of a ``(B, 1)``/``(B, 2)`` output against ``(B,)``/``(B, 1)`` 0/1 targets."""
        logit, _ = split_output(output)
        return _reduce(self.elementwise(logit.float(), _as_target(target, logit.shape[0])), self.reduction)


class AttenuationLoss(nn.Module):
    """Learned loss attenuation for classification (Kendall & Gal 2017, eq. 12).

    The head gives a logit mean μ and s = log σ². With T samples ``x̂_t = μ + σ·ε_t``, ``ε_t ~ N(0, 1)``
    (reparameterised, so the gradient reaches σ), the per-sample loss is the negative log of the Monte-Carlo
    likelihood::

        L = −log( (1/T) Σ_t p(y | x̂_t) ) = −( logsumexp_t log p(y | x̂_t) − log T ),
        log p(y | x) = −BCEWithLogits(x, y),

    averaged over the batch. Averaging probabilities (not losses) is what lets σ attenuate: for a confidently
    wrong sample a wider σ puts some samples on the right side and raises the mean likelihood, so ∂L/∂s < 0;
    for a confidently right one noise only hurts, so ∂L/∂s ≥ 0. Averaging the BCE of noisy logits instead (the
    reference's version) is, by Jensen's inequality on the convex BCE, always increased by noise, so it only ever
    pushes σ to 0. With ``pos_weight`` the positive log-likelihood is weighted as in :class:`BCEWithLogits`.

    The noise ε has shape ``(T, B)`` and is drawn from ``generator`` when one is given (on the generator's device,
    then moved), else from the global RNG.

    Args:
        t_samples: Number T of Monte-Carlo samples of the logit.
        base: The likelihood; only ``bce`` (a focal "likelihood" is not a probability, so eq. 12 does not apply).
        pos_weight: Weight of the positive log-likelihood, as in :class:`BCEWithLogits`.
        generator: Source of ε, for reproducible losses.
    """

    def __init__(
        self,
        t_samples: int = 20,
        base: str = "bce",
        *,
        pos_weight: float | torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if t_samples < 1:
            raise ValueError(f"t_samples must be at least 1, got {t_samples}")
        if base != "bce":
            raise ValueError(f"attenuation supports base='bce' only, got {base!r}")
        self.t_samples, self.base = t_samples, base
        self.likelihood = BCEWithLogits(pos_weight, reduction="none")
        self.generator = generator

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of a ``(B, 2)`` ``[μ, log σ²]`` output against ``(B,)``/``(B, 1)`` 0/1 targets."""
        mu, log_var = split_output(output)
        if log_var is None:
            raise ValueError(
                f"attenuation loss needs a (B, 2) [mu, log_var] output, got {tuple(output.shape)}; "
                "build the model with attenuation=True"
            )
        mu = mu.float()
        sigma = torch.exp(0.5 * log_var.float().clamp(LOG_VAR_MIN, LOG_VAR_MAX))
        target = _as_target(target, mu.shape[0])
        shape = (self.t_samples, mu.shape[0])
        if self.generator is not None:
            noise = torch.randn(shape, generator=self.generator, device=self.generator.device).to(mu.device)
        else:
            noise = torch.randn(shape, device=mu.device)
        noisy_logits = mu + sigma * noise  # (T, B)
        log_likelihood = -self.likelihood.elementwise(noisy_logits, target)
        per_sample = -(torch.logsumexp(log_likelihood, dim=0) - math.log(self.t_samples))
        return per_sample.mean()


LOSS_NAMES = ("bce", "focal")
# The reference's --loss_function spellings, matched case-insensitively. "BCELoss" was sigmoid + BCELoss there; it
# maps to the logits form, which is the same loss of the same logit, computed stably and with a single sigmoid.
_ALIASES = {"bce": "bce", "bceloss": "bce", "bcelogitsloss": "bce", "focal": "focal", "focalloss": "focal"}


def build_loss(
    name: str,
    *,
    attenuation: bool = False,
    t_samples: int = 20,
    pos_weight: float | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build a loss by name.

    Names are ``bce`` and ``focal``; the reference's ``BCELoss``, ``BCELogitsLoss`` and ``FocalLoss`` are accepted
    case-insensitively. ``BCELoss`` gives :class:`BCEWithLogits`, not a sigmoid followed by ``nn.BCELoss``: the
    model outputs logits, and the logits form is the same loss without its numerical problems.

    Args:
        name: Loss name.
        attenuation: Return :class:`AttenuationLoss` (learned loss attenuation; needs a BCE base).
        t_samples: Monte-Carlo samples T for attenuation.
        pos_weight: Positive-class weight for BCE (and the attenuation likelihood).
        focal_alpha: α of the focal loss.
        focal_gamma: γ of the focal loss.
        generator: Noise source for attenuation.

    Returns:
        The loss module.

    Raises:
        ValueError: On an unknown name, or focal loss with attenuation.
    """
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise ValueError(
            f"Unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)} "
            "(or the reference's BCELoss, BCELogitsLoss, FocalLoss, any case)"
        )
    if attenuation:
        if canonical != "bce":
            raise ValueError("learned loss attenuation uses the BCE likelihood; use loss 'bce' with attenuation")
        return AttenuationLoss(t_samples, "bce", pos_weight=pos_weight, generator=generator)
    if canonical == "focal":
        return FocalLoss(alpha=focal_alpha, gamma=focal_gamma)
    return BCEWithLogits(pos_weight=pos_weight)
