"""Fine-tune mode's augmentation (the encoder + decoder it trains is train/model.py's ``EncoderDecoder``).

Augmentation rotates and flips the image and the 32 × 32 target grid together: a patch is
32 × p px per side (p = the encoder's pixels per bin: 14, or 16 for a patch-16 encoder, which
fine-tunes on the dataset's ``image_16px``), so a 90° turn of the image is exactly a 90° turn of
its bin grid and token (i, j) still sits on bin (i, j). Colour jitter is light and seeded, so a
resumed run draws alike.
"""

from __future__ import annotations

import torch


def dihedral(images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, k: int, flip: bool):
    """Rotate by k × 90° (and mirror left-right) images (B,H,W,C), targets (B,G,R,C) and mask (B,R,C) alike."""
    if flip:
        images, targets, mask = images.flip(2), targets.flip(3), mask.flip(2)
    if k % 4:
        images = torch.rot90(images, k, dims=(1, 2))
        targets = torch.rot90(targets, k, dims=(2, 3))
        mask = torch.rot90(mask, k, dims=(1, 2))
    return images, targets, mask


def colour_jitter(images: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Light per-patch brightness and per-channel gain jitter on uint8 images (returns uint8)."""
    b = images.shape[0]
    gain = 1 + strength * (2 * torch.rand(b, 1, 1, 3, generator=generator) - 1)
    bright = strength * 255 * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    out = images.float() * gain.to(images.device) + bright.to(images.device)
    return out.clamp(0, 255).to(torch.uint8)
