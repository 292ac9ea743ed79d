"""The encoder registry (docs/design.md §4): one entry per encoder; adding an encoder is one entry.

Each entry says how to build the network with timm (architecture and keyword arguments), how to
normalise its input, how its output becomes a token grid and a pooled embedding, and where its
gated weights live on the Hugging Face hub. ViTs are built at 224 px with
``dynamic_img_size=True`` and fed 448 px patches: position embeddings are interpolated and the
grid is 32 × 32, one token per 8 µm bin. Prefix (class and register) tokens are dropped using the
model's own ``num_prefix_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, PatchGeometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_PX = GEOMETRY.patch_px  # 448: a 32 × 32 token grid for patch-14 ViTs (and the default rendering)


def _swiglu_packed():
    from timm.layers import SwiGLUPacked

    return SwiGLUPacked


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    arch: str  # timm architecture name
    kind: str  # "vit" (token grid) or "cnn" (feature map)
    dim: int  # channels of a grid cell
    grid: int  # grid side at the encoder's input size (32 × px_per_bin px)
    pooled: str  # "cls", "cls+mean" or "mean"
    params: float  # parameters without a head (checked by a test)
    kwargs: dict = field(default_factory=dict)
    callable_kwargs: dict[str, Callable] = field(default_factory=dict)  # resolved at build time
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_repo: str | None = None
    test_only: bool = False
    note: str = ""
    # A CNN whose grid is taken before its final activation: the dotted name of the norm layer whose
    # ``act`` is dropped (DenseNet-121: torchvision's ``features``, the grid Img2ST-Net decodes).
    pre_activation: str | None = None
    # Pixels per 8 µm bin of the rendering the encoder reads: its patch size (ViTs) or stride (CNN grids),
    # so that one token is one bin (docs/design.md §2). 14 reads patches.zarr's ``image`` (448 px);
    # 16 reads ``image_16px`` (512 px, rendered by ``prepare --px-per-bin 14,16``).
    px_per_bin: int = GEOMETRY.px_per_bin

    @property
    def geometry(self) -> PatchGeometry:
        """The rendering the encoder reads: 32 × 32 bins at its px_per_bin (featcache/geometry.py)."""
        return PatchGeometry(px_per_bin=self.px_per_bin)

    @property
    def input_px(self) -> int:
        """Side of the encoder's input patch in pixels: 32 bins × px_per_bin."""
        return self.geometry.patch_px

    @property
    def pooled_dim(self) -> int:
        return 2 * self.dim if self.pooled == "cls+mean" else self.dim

    def timm_kwargs(self) -> dict:
        kw = {"num_classes": 0, **self.kwargs}
        kw.update({k: f() for k, f in self.callable_kwargs.items()})
        return kw

    def describe(self) -> dict:
        kw = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in self.kwargs.items()}
        kw.update({k: _qualname(f()) for k, f in self.callable_kwargs.items()})
        out = {
            "encoder": self.name,
            "arch": self.arch,
            "kind": self.kind,
            "timm_kwargs": kw,
            "dim": self.dim,
            "grid": [self.grid, self.grid],
            "pooled": self.pooled,
            "mean": list(self.mean),
            "std": list(self.std),
            "input_px": self.input_px,  # the pixels per bin are in the store identity's geometry
        }
        if self.pre_activation:
            out["grid_before_activation_of"] = self.pre_activation
        return out


def _qualname(obj) -> str:
    """Stable name of a layer class or a functools.partial of one (timm's SwiGLUPacked is a partial)."""
    base = getattr(obj, "func", obj)
    name = f"{base.__module__}.{base.__qualname__}"
    kws = getattr(obj, "keywords", None)
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(kws.items()))})" if kws else name


def _silu():
    return torch.nn.SiLU


REGISTRY: dict[str, EncoderSpec] = {}


def register(spec: EncoderSpec) -> EncoderSpec:
    REGISTRY[spec.name] = spec
    return spec


register(
    EncoderSpec(
        name="densenet121",
        arch="densenet121",
        kind="cnn",
        dim=1024,
        grid=14,
        pooled="mean",
        params=6.95e6,
        hf_repo="timm/densenet121.tv_in1k",
        pre_activation="features.norm5",
        note="ImageNet CNN; 14×14 map at 448 px (stride 32), before the final ReLU (torchvision's features)",
    )
)
register(
    EncoderSpec(
        name="uni2h",
        arch="vit_giant_patch14_224",
        kind="vit",
        dim=1536,
        grid=32,
        pooled="cls",
        params=681.4e6,
        kwargs=dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        callable_kwargs={"mlp_layer": _swiglu_packed, "act_layer": _silu},
        hf_repo="MahmoodLab/UNI2-h",
        note="pathology ViT-g/14, 8 register tokens",
    )
)
register(
    EncoderSpec(
        name="virchow2",
        arch="vit_huge_patch14_224",
        kind="vit",
        dim=1280,
        grid=32,
        pooled="cls+mean",
        params=631.2e6,
        kwargs=dict(
            img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", reg_tokens=4, dynamic_img_size=True
        ),
        callable_kwargs={"mlp_layer": _swiglu_packed, "act_layer": _silu},
        hf_repo="paige-ai/Virchow2",
        note="pathology ViT-H/14, 4 register tokens; pooled = cls ⊕ mean (2560)",
    )
)
register(
    EncoderSpec(
        name="hoptimus0",
        arch="vit_giant_patch14_reg4_dinov2",
        kind="vit",
        dim=1536,
        grid=32,
        pooled="cls",
        params=1134.8e6,
        kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=True),
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        hf_repo="bioptimus/H-optimus-0",
        note="pathology ViT-g/14 (DINOv2), 4 register tokens",
    )
)
# Small random-weight stand-ins that run on a CPU in tests; never part of a comparison.
register(
    EncoderSpec(
        name="tiny-vit",
        arch="vit_tiny_patch16_224",
        kind="vit",
        dim=48,
        grid=32,
        pooled="cls",
        params=0.0975e6,
        kwargs=dict(
            img_size=224, patch_size=14, embed_dim=48, depth=2, num_heads=3, reg_tokens=2, dynamic_img_size=True
        ),
        test_only=True,
        note="test-only: 2-block ViT/14, 2 register tokens",
    )
)
register(
    EncoderSpec(
        name="tiny-vit16",
        arch="vit_tiny_patch16_224",
        kind="vit",
        dim=48,
        grid=32,
        pooled="cls",
        params=0.1031e6,
        kwargs=dict(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3, dynamic_img_size=True),
        test_only=True,
        px_per_bin=16,
        note="test-only: 2-block ViT/16 at 16 px per bin (512 px, patches.zarr's image_16px)",
    )
)
register(
    EncoderSpec(
        name="tiny-cnn",
        arch="test_resnet",
        kind="cnn",
        dim=96,
        grid=14,
        pooled="mean",
        params=0.3727e6,
        test_only=True,
        note="test-only: timm's test_resnet, 14×14 map at 448 px",
    )
)


def get_spec(name: str) -> EncoderSpec:
    if name not in REGISTRY:
        raise FeatcacheError(f"unknown encoder {name!r}; known: {', '.join(REGISTRY)} (see `featcache encoders`).")
    return REGISTRY[name]


def build_model(spec: EncoderSpec, device: str | torch.device = "cpu", **overrides) -> torch.nn.Module:
    """The bare network with random weights (weights are loaded separately), in eval mode."""
    import timm

    with torch.device(device):
        model = timm.create_model(spec.arch, pretrained=False, **{**spec.timm_kwargs(), **overrides})
    return model.eval()


class GridEncoder(torch.nn.Module):
    """Wraps a timm model: normalises uint8 NHWC input and returns (tokens, pooled).

    tokens: (batch, grid, grid, dim), row i / column j = bin (r0 + i, c0 + j) for a ViT/14;
    pooled: (batch, pooled_dim) as each model's authors define it.
    """

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)
        if spec.pre_activation:  # the grid before the final activation; pooled applies it (torchvision's forward)
            model.get_submodule(spec.pre_activation).act = torch.nn.Identity()

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    def forward(self, images_u8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images_u8_nhwc.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        out = self.model.forward_features(x)
        if self.spec.kind == "cnn":
            tokens = out.permute(0, 2, 3, 1)  # (B, H, W, C)
            pooled = (torch.relu(out) if self.spec.pre_activation else out).mean(dim=(2, 3))
        else:
            n_prefix = self.num_prefix_tokens
            patch = out[:, n_prefix:]
            side = int(round(patch.shape[1] ** 0.5))
            if side * side != patch.shape[1]:
                raise RuntimeError(f"{self.spec.name}: {patch.shape[1]} patch tokens do not form a square grid")
            tokens = patch.reshape(patch.shape[0], side, side, patch.shape[2])  # row-major, as patch_embed
            if self.spec.pooled == "cls":
                pooled = out[:, 0]
            elif self.spec.pooled == "cls+mean":
                pooled = torch.cat([out[:, 0], patch.mean(dim=1)], dim=1)
            else:
                pooled = patch.mean(dim=1)
        return tokens, pooled
