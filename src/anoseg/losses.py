"""AnoSeg's losses: the segmentation loss on the map, the masked reconstruction loss, the adversarial loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import Config
from .distributed import DistContext, all_reduce_sum

SEG_WEIGHT = 10.0  # weight of the segmentation loss; the other two weights are settings (lambda_rec, lambda_adv)
FOCAL_GAMMA = 2.0  # the focal loss weighs each pixel by (1 - p_t) ** FOCAL_GAMMA


def segmentation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, defect_weight: float = 1.0) -> torch.Tensor:
    """Pixel-wise loss between the predicted map and the reference mask (same shape, in [0, 1]).

    kind: bce, or focal (rare defect pixels are not drowned out by the many easy normal ones);
    defect_weight: how many times a defect pixel counts as much as a normal one.
    """
    weight = 1.0 + (defect_weight - 1.0) * target
    bce = F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    if kind == "bce":
        return (weight * bce).mean()
    p_t = pred * target + (1 - pred) * (1 - target)
    return (weight * (1 - p_t) ** FOCAL_GAMMA * bce).mean()


def masked_reconstruction_loss(recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor,
                               ctx: DistContext | None = None) -> torch.Tensor:
    """Mean L1 error over normal pixels only (mask 0), so the decoder never learns to draw defects.

    Under several processes the mean is over the normal pixels of the global batch (scaled so that the
    gradient average DistributedDataParallel takes gives the one-process gradient).
    """
    normal = 1.0 - mask
    count = (normal.sum() * image.shape[1]).detach()
    world = 1
    if ctx is not None and ctx.enabled:
        count, world = all_reduce_sum(count.clone(), ctx), ctx.world
    return ((recon - image).abs() * normal).sum() * world / count.clamp_min(1.0)


def real_fake_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on real and fake logits."""
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
        F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def fooled_loss(fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss: its fakes should be judged real."""
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


@dataclass(frozen=True)
class AnoSegLoss:
    """The generator's loss, built once from the settings: SEG_WEIGHT x segmentation + lambda_rec x masked
    reconstruction + lambda_adv x adversarial."""

    seg_loss: str = "bce"
    defect_weight: float = 1.0
    lambda_rec: float = 0.0
    lambda_adv: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> AnoSegLoss:
        return cls(cfg.seg_loss, cfg.seg_defect_weight, cfg.lambda_rec, cfg.lambda_adv)

    @property
    def adversarial(self) -> bool:
        return self.lambda_adv > 0

    @property
    def needs_reconstruction(self) -> bool:
        """Whether a term reads the reconstruction (without one the image decoder need not run)."""
        return self.lambda_rec > 0 or self.lambda_adv > 0

    def __call__(self, amap: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, recon: torch.Tensor | None,
                 adv: torch.Tensor, ctx: DistContext | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, {seg, rec, adv}) for maps and reconstructions of images x with reference masks."""
        seg = segmentation_loss(amap, mask, self.seg_loss, self.defect_weight)
        rec = torch.zeros((), device=x.device) if recon is None else masked_reconstruction_loss(recon, x, mask, ctx)
        total = SEG_WEIGHT * seg + self.lambda_rec * rec + self.lambda_adv * adv
        return total, {"seg": seg, "rec": rec, "adv": adv}
