"""The shared decoder (docs/design.md §5): Img2ST-Net's MiniUNet, and a per-token linear baseline.

Both take a token grid (batch, channels, h, w) and return (batch, genes, 32, 32). Only the input
channel count depends on the encoder, so every encoder is judged with the same decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TARGET = 32


class ConvBlock(nn.Sequential):
    """Two × [3×3 conv (no bias), BatchNorm, ReLU], padding 1."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: int = TARGET) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class MiniUNet(nn.Module):
    """enc1 → maxpool → enc2 → bilinear ×2 → concat enc1 → dec → resize to 32 → 1×1 head."""

    def __init__(self, c_in: int, n_genes: int, width: int = 512):
        super().__init__()
        self.enc1 = ConvBlock(c_in, width)
        self.enc2 = ConvBlock(width, width)
        self.dec = ConvBlock(2 * width, width)
        self.head = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, n_genes, 1))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        up = F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d = self.dec(torch.cat([up, e1], dim=1))
        return self.head(_resize(d))


class LinearDecoder(nn.Module):
    """The cheapest baseline: one 1×1 conv from each token to the genes, resized to 32 × 32."""

    def __init__(self, c_in: int, n_genes: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, n_genes, 1)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.proj(x))


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


DECODERS = {"unet": MiniUNet, "linear": LinearDecoder}


def build_decoder(kind: str, c_in: int, n_genes: int) -> nn.Module:
    from featcache.errors import FeatcacheError

    if kind not in DECODERS:
        raise FeatcacheError(f"--decoder {kind!r}: use one of {', '.join(DECODERS)}.")
    return DECODERS[kind](c_in, n_genes)
