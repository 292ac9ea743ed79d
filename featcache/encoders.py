"""The encoder registry (docs/design.md §4): one entry per encoder; adding an encoder is one entry.

Each entry says how to build the network with timm (architecture and keyword arguments), how to
normalise its input, how its output becomes a token grid and a pooled embedding, and where its
gated weights live on the Hugging Face hub, under which licence, and how that checkpoint's keys map
onto timm's (``checkpoint_layout``). ViTs are built at their checkpoint's size (224 px for most) with
``dynamic_img_size=True`` and fed 32 bins × ``px_per_bin`` pixels, their patch size: 448 px for
patch-14 models, 512 px for patch-16 ones and the stride-16 ResNet-50. Position embeddings are
interpolated and the grid is 32 × 32, one token per 8 µm bin. Prefix (class and register) tokens are
dropped using the model's own ``num_prefix_tokens``.

Intermediate layers (``featcache extract --layers``) are numbered from 1, as timm's
``forward_intermediates`` lists them (its 0-based ``indices`` plus one): layer N of a ViT is the
output of its N-th block (``blocks[N-1]``, before the final norm; the last block is layer
``depth``, and ``tokens`` is that block's output after the final norm); layer N of a CNN is the
N-th entry of its ``feature_info`` (timm's stage outputs, the stem first). See
:func:`layer_levels`.

Encoders from other packages register through the entry-point group ``featcache.encoders``
(:data:`ENTRY_POINT_GROUP`): each entry point loads to an :class:`EncoderSpec`, or to a callable
returning one or a list of them. They are loaded once, the first time the registry is consulted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from featcache.errors import FeatcacheError
from featcache.geometry import GEOMETRY, PatchGeometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    # The model's licence as its hub page states it (SPDX id where there is one): `featcache encoders` shows it.
    licence: str = ""
    # The checkpoint file of ``hf_repo`` when it is not model.safetensors / pytorch_model.bin (CONCH v1.5's
    # pytorch_model_vision.bin).
    hf_filename: str | None = None
    # How the hub checkpoint's keys map onto the timm network: a name in featcache.weights.CHECKPOINT_LAYOUTS
    # ("timm": as they are; "transformers-dinov2": a transformers Dinov2Model; "conch-vision": CONCH v1.5's
    # vision tower). Conversion is a pure renaming (plus q, k, v packed into qkv); loading stays strict.
    checkpoint_layout: str = "timm"
    # Submodules of the timm network that the encoder does not use (ResNet-50's layer4: TRIDENT's truncation after
    # layer3). They are replaced by Identity when built, and their keys in a checkpoint are dropped like a head's.
    drop_modules: tuple[str, ...] = ()

    @property
    def patch_size(self) -> int | None:
        """A ViT's patch side in pixels (its kwargs, else its timm architecture name); None for a CNN."""
        if self.kind != "vit":
            return None
        if "patch_size" in self.kwargs:
            return int(self.kwargs["patch_size"])
        m = re.search(r"patch(\d+)", self.arch)
        return int(m[1]) if m else None

    @property
    def stride(self) -> int:
        """Input pixels per grid cell: the patch size of a ViT, the output stride of a CNN."""
        return self.input_px // self.grid

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
        if self.drop_modules:  # (only where set, so that the identities of existing stores are unchanged)
            out["dropped_modules"] = list(self.drop_modules)
        if self.checkpoint_layout != "timm":
            out["checkpoint_layout"] = self.checkpoint_layout
        return out


def _qualname(obj) -> str:
    """Stable name of a layer class or a functools.partial of one (timm's SwiGLUPacked is a partial)."""
    base = getattr(obj, "func", obj)
    name = f"{base.__module__}.{base.__qualname__}"
    kws = getattr(obj, "keywords", None)
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(kws.items()))})" if kws else name


def _silu():
    return torch.nn.SiLU


ENTRY_POINT_GROUP = "featcache.encoders"
BUILT_IN = "built-in"


class Registry(dict):
    """name -> EncoderSpec: the built-in entries, and those of installed packages' ``featcache.encoders`` entry
    points, loaded once, the first time the registry is read (:meth:`load_plugins`). ``sources`` says where each
    entry came from: ``built-in`` or the distribution's name and version."""

    def __init__(self):
        super().__init__()
        self.sources: dict[str, str] = {}
        self._plugins_loaded = False

    def add(self, spec: EncoderSpec, source: str = BUILT_IN) -> EncoderSpec:
        dict.__setitem__(self, spec.name, spec)
        self.sources[spec.name] = source
        return spec

    def load_plugins(self) -> None:
        """Every ``featcache.encoders`` entry point, all or none: a broken plugin or a name clash is one
        FeatcacheError naming the package (and the registry is tried again the next time it is read)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # set first: a plugin that reads the registry while it loads sees the built-ins
        try:
            found = _plugin_specs(self)
        except BaseException:
            self._plugins_loaded = False
            raise
        for spec, source in found:
            self.add(spec, source)

    def source(self, name: str) -> str:
        self.load_plugins()
        return self.sources.get(name, BUILT_IN)

    # every read goes through the plugins first
    def __getitem__(self, key):
        self.load_plugins()
        return super().__getitem__(key)

    def __contains__(self, key):
        self.load_plugins()
        return super().__contains__(key)

    def __iter__(self):
        self.load_plugins()
        return super().__iter__()

    def __len__(self):
        self.load_plugins()
        return super().__len__()

    def get(self, key, default=None):
        self.load_plugins()
        return super().get(key, default)

    def keys(self):
        self.load_plugins()
        return super().keys()

    def values(self):
        self.load_plugins()
        return super().values()

    def items(self):
        self.load_plugins()
        return super().items()


def _distribution(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else f"the module {ep.value.split(':')[0]}"


def _plugin_specs(registry: Registry) -> list[tuple[EncoderSpec, str]]:
    """(spec, source) of every entry point of the group, checked: specs, valid names, no clash."""
    from importlib.metadata import entry_points

    from featcache.stores.workspace import check_name

    out: list[tuple[EncoderSpec, str]] = []
    seen: dict[str, str] = {}
    unique = {}  # a distribution found twice on sys.path (an install and a source folder) counts once
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        unique.setdefault((_distribution(ep).split(" ")[0], ep.name, ep.value), ep)
    for ep in sorted(unique.values(), key=lambda e: (e.name, e.value)):
        source = _distribution(ep)
        where = f"entry point {ep.name!r} ({ep.value}) of {source} in group {ENTRY_POINT_GROUP!r}"
        try:
            obj = ep.load()
            if not isinstance(obj, EncoderSpec) and callable(obj):
                obj = obj()
        except Exception as exc:  # noqa: BLE001 - a plugin fails in any way; we say which plugin
            raise FeatcacheError(
                f"encoder plugin {where} failed to load ({type(exc).__name__}: {exc}); fix or uninstall "
                f"{source.split(' ')[0]}."
            ) from exc
        specs = [obj] if isinstance(obj, EncoderSpec) else list(obj) if isinstance(obj, (list, tuple)) else None
        if specs is None or not specs or not all(isinstance(s, EncoderSpec) for s in specs):
            raise FeatcacheError(
                f"encoder plugin {where} gave {type(obj).__name__}, not an EncoderSpec, a list of them or a callable "
                f"returning one; fix or uninstall {source.split(' ')[0]}."
            )
        for spec in specs:
            try:
                check_name(spec.name, "encoder")
            except FeatcacheError as exc:
                raise FeatcacheError(f"encoder plugin {where}: {exc}") from None
            if spec.kind not in ("vit", "cnn"):
                raise FeatcacheError(
                    f"encoder plugin {where}: encoder {spec.name!r} has kind {spec.kind!r}, not 'vit' or 'cnn'."
                )
            if dict.__contains__(registry, spec.name):
                raise FeatcacheError(
                    f"encoder plugin {where} registers {spec.name!r}, a name featcache already has "
                    f"({registry.sources.get(spec.name, BUILT_IN)}); the plugin must use another name."
                )
            if spec.name in seen:
                raise FeatcacheError(
                    f"encoder {spec.name!r} is registered twice: by {seen[spec.name]} and by {where}; "
                    "uninstall one of them."
                )
            seen[spec.name] = where
            out.append((spec, source))
    return out


REGISTRY = Registry()


def register(spec: EncoderSpec) -> EncoderSpec:
    """A built-in entry (other packages use the ``featcache.encoders`` entry point instead)."""
    return REGISTRY.add(spec)


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
        licence="BSD-3-Clause",
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
        licence="CC-BY-NC-ND-4.0",
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
        licence="CC-BY-NC-ND-4.0",
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
        licence="Apache-2.0",
        note="pathology ViT-g/14 (DINOv2), 4 register tokens",
    )
)
# ---- Issue #20: the encoders HEST-Benchmark and TRIDENT compare in 2026 (docs/design.md §4 gives the sources). ----
# Patch-16 models (and the stride-16 CNN) read the 16 px-per-bin rendering (512 px); patch-14 models the 448 px one.
# Every one of them is built at its hub size with dynamic_img_size=True, so a checkpoint loads strictly and the
# position embeddings are interpolated by timm to the 32 × 32 grid.
register(
    EncoderSpec(
        name="resnet50",
        arch="resnet50",
        kind="cnn",
        dim=1024,
        grid=32,
        pooled="mean",
        params=8.543e6,
        hf_repo="timm/resnet50.tv_in1k",
        licence="BSD-3-Clause",
        drop_modules=("layer4",),
        px_per_bin=16,
        note="ImageNet ResNet-50 truncated after layer3 (TRIDENT/HEST's CNN baseline: features_only, out_indices=[3]);"
        " stride 16, so 32×32 at 512 px. Pooled = global mean of the layer3 map (TRIDENT's AdaptiveAvgPool2d); the"
        " checkpoint's layer4 and fc are dropped on load",
    )
)
register(
    EncoderSpec(
        name="uni",
        arch="vit_large_patch16_224",
        kind="vit",
        dim=1024,
        grid=32,
        pooled="cls",
        params=303.35e6,
        kwargs=dict(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
        hf_repo="MahmoodLab/UNI",
        licence="CC-BY-NC-ND-4.0",
        px_per_bin=16,
        note="UNI v1, ViT-L/16 (DINOv2-trained), 1 cls token; kwargs as the model card and TRIDENT's UNIInferenceEncoder;"
        " pooled = cls (the card's model(x))",
    )
)
register(
    EncoderSpec(
        name="conch15",
        arch="vit_large_patch16_224",
        kind="vit",
        dim=1024,
        grid=32,
        pooled="cls",
        params=303.95e6,
        kwargs=dict(img_size=448, patch_size=16, init_values=1.0, dynamic_img_size=True),
        hf_repo="MahmoodLab/conchv1_5",
        hf_filename="pytorch_model_vision.bin",
        checkpoint_layout="conch-vision",
        licence="CC-BY-NC-ND-4.0",
        px_per_bin=16,
        note="CONCH v1.5 vision tower: the trunk of TRIDENT's CONCHVisionTower (iBOT ViT-L/16, layer scale, qkv bias,"
        " LayerNorm eps 1e-6: timm's vit_large_patch16_224 key for key under trunk.), ImageNet mean/std as TRIDENT;"
        " built at 448 px, TRIDENT's default size for it (TRIDENT resamples the checkpoint's pos_embed onto a 224 px"
        " trunk at load; here a pos_embed of another length is refused with a shape message). Deviation: TRIDENT's embedding is the contrastive attentional"
        " pooler (attn_pool_contrast + ln_contrast, 768-d); it is not part of the token grid, so its keys are dropped"
        " on load (listed in the provenance) and pooled here is the trunk's cls token (1024)",
    )
)
register(
    EncoderSpec(
        name="gigapath",
        arch="vit_giant_patch14_dinov2",
        kind="vit",
        dim=1536,
        grid=32,
        pooled="cls",
        params=1135.0e6,
        kwargs=dict(
            img_size=224,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            dynamic_img_size=True,
        ),
        hf_repo="prov-gigapath/prov-gigapath",
        licence="Apache-2.0",
        px_per_bin=16,
        note="Prov-GigaPath tile encoder: timm vit_giant_patch14_dinov2 (SwiGLU, SiLU, layer scale) with patch_size 16,"
        " as its hub timm config and TRIDENT; 1 cls token; pooled = cls (the card's model(x)). TRIDENT pins timm"
        " 0.9.16; the layout is the same in timm 1.x",
    )
)
register(
    EncoderSpec(
        name="hoptimus1",
        arch="vit_giant_patch14_reg4_dinov2",
        kind="vit",
        dim=1536,
        grid=32,
        pooled="cls",
        params=1134.8e6,
        kwargs=dict(img_size=224, init_values=1e-5, dynamic_img_size=True),
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        hf_repo="bioptimus/H-optimus-1",
        licence="other (research only; see card)",
        note="H-optimus-1, ViT-g/14 (DINOv2), 4 register tokens; same architecture and mean/std as H-optimus-0 (model"
        " card, TRIDENT's HOptimus1InferenceEncoder); pooled = cls (global_pool='token')",
    )
)
register(
    EncoderSpec(
        name="h0mini",
        arch="vit_base_patch14_reg4_dinov2",
        kind="vit",
        dim=768,
        grid=32,
        pooled="cls+mean",
        params=71.57e6,
        kwargs=dict(img_size=224, dynamic_img_size=True),
        callable_kwargs={"mlp_layer": _swiglu_packed, "act_layer": _silu},
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        hf_repo="bioptimus/H0-mini",
        licence="CC-BY-NC-ND-4.0",
        note="H0-mini, ViT-B/14 distilled from H-optimus-0, 4 register tokens, SwiGLU + SiLU (the card passes"
        " mlp_layer=SwiGLUPacked, act_layer=SiLU) at timm's default MLP ratio 4 (the hub config.json could not be"
        " read here: another ratio is refused on load with a shape message); H-optimus mean/std. Pooled = cls ⊕"
        " patch mean (1536), as the model card's example; TRIDENT defaults to cls only (768), cls+mean optional",
    )
)
register(
    EncoderSpec(
        name="virchow",
        arch="vit_huge_patch14_224",
        kind="vit",
        dim=1280,
        grid=32,
        pooled="cls+mean",
        params=631.2e6,
        kwargs=dict(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True),
        callable_kwargs={"mlp_layer": _swiglu_packed, "act_layer": _silu},
        hf_repo="paige-ai/Virchow",
        licence="Apache-2.0",
        note="Virchow v1, ViT-H/14, SwiGLU + SiLU, 1 cls token and no register tokens (model card, TRIDENT);"
        " pooled = cls ⊕ patch mean (2560), as the card",
    )
)
register(
    EncoderSpec(
        name="midnight12k",
        arch="vit_giant_patch14_dinov2",
        kind="vit",
        dim=1536,
        grid=32,
        pooled="cls+mean",
        params=1134.8e6,
        kwargs=dict(img_size=224, dynamic_img_size=True),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        hf_repo="kaiko-ai/midnight",
        checkpoint_layout="transformers-dinov2",
        licence="MIT",
        note="kaiko Midnight-12k, ViT-g/14 (DINOv2 giant: SwiGLU, layer scale), 1 cls token, distributed as a"
        " transformers Dinov2Model whose keys are renamed to timm's on load (q, k, v packed into qkv); mean/std 0.5"
        " and pooled = cls ⊕ patch mean (3072) as kaiko's card (TRIDENT: cls by default, cls+mean as an option)."
        " Built at 224 px, the card's input size (the hub config's image_size was not readable here; another"
        " position-embedding length is refused with a shape message). Position embeddings are interpolated by timm,"
        " not by transformers' Dinov2 (a slightly different bicubic)",
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
        licence="n/a (random)",
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
        licence="n/a (random)",
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
        licence="ours (demo weights)",
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
        for name in spec.drop_modules:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, torch.nn.Identity())
    return model.eval()


def parse_layers(text: str | Iterable[int] | None) -> tuple[int, ...]:
    """``--layers 16,24`` -> (16, 24): distinct block numbers counted from 1, ascending; None or "" -> ()."""
    if text is None or text == "":
        return ()
    parts = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    if not parts and not isinstance(text, str):
        return ()
    try:
        layers = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise FeatcacheError(f"--layers {text!r}: write block numbers counted from 1, e.g. --layers 16,24.") from None
    if not layers or any(n < 1 for n in layers) or any(isinstance(p, (bool, float)) for p in parts):
        raise FeatcacheError(
            f"--layers {text!r}: block numbers are counted from 1 (the first block is 1), e.g. --layers 16,24."
        )
    return tuple(sorted(set(layers)))


def layer_name(layer: int | None) -> str:
    """The feature store's array of a layer: ``tokens`` (the final grid) or ``tokens_<N>``."""
    return "tokens" if layer is None else f"tokens_{layer}"


def layer_levels(spec: EncoderSpec, model: torch.nn.Module | None = None) -> list[dict]:
    """What ``--layers`` can name, in order (layer N is entry N-1): timm's ``feature_info`` of the network
    (a ViT: one entry per block; a CNN: its stage outputs, the stem first), each with ``module``, ``num_chs``
    and ``reduction``. ``model=None`` builds the network on the meta device (no memory, no weights)."""
    model = model if model is not None else build_model(spec, "meta")
    if not callable(getattr(model, "forward_intermediates", None)):
        raise FeatcacheError(
            f"encoder {spec.name!r} ({spec.arch}) has no timm forward_intermediates, so featcache cannot take "
            "its intermediate layers; extract it without --layers."
        )
    info = getattr(model, "feature_info", None)
    levels = list(info) if isinstance(info, (list, tuple)) else None
    if not levels:
        if spec.kind == "vit" and hasattr(model, "blocks"):
            return [
                {"module": f"blocks.{i}", "num_chs": spec.dim, "reduction": spec.stride}
                for i in range(len(model.blocks))
            ]
        raise FeatcacheError(
            f"encoder {spec.name!r} ({spec.arch}) does not list its feature levels (timm feature_info); "
            "extract it without --layers."
        )
    return [dict(level) for level in levels]


def _describe_levels(spec: EncoderSpec, levels: list[dict]) -> str:
    if spec.kind == "vit":
        return f"{len(levels)} blocks: --layers 1 to {len(levels)} ({len(levels)} is the last block, before the final norm)"
    names = ", ".join(
        f"{i} {lv['module']} (stride {lv['reduction']}, {lv['num_chs']} ch)" for i, lv in enumerate(levels, 1)
    )
    return f"{len(levels)} stage outputs: {names}"


def check_layers(spec: EncoderSpec, layers: Iterable[int], model: torch.nn.Module | None = None) -> dict[int, dict]:
    """Each asked layer's grid and width at the encoder's input size, after checking it against the network's
    depth: {layer: {"grid": [h, w], "dim": channels, "module": timm's name}}; one clear error otherwise."""
    layers = tuple(layers)
    if not layers:
        return {}
    levels = layer_levels(spec, model)
    bad = [n for n in layers if not 1 <= n <= len(levels)]
    if bad:
        raise FeatcacheError(
            f"--layers {','.join(map(str, layers))}: encoder {spec.name!r} has {_describe_levels(spec, levels)}; "
            f"{', '.join(map(str, bad))} is out of range (layers are counted from 1)."
        )
    unused = [i + 1 for i, lv in enumerate(levels) if _under(lv["module"], spec.drop_modules)]
    dropped = [n for n in layers if n in unused]
    if dropped:
        usable = [i for i in range(1, len(levels) + 1) if i not in unused]
        raise FeatcacheError(
            f"--layers {','.join(map(str, dropped))}: encoder {spec.name!r} does not use "
            f"{', '.join(levels[n - 1]['module'] for n in dropped)} (dropped from the network by its registry entry); "
            f"its layers are {usable[0]}–{usable[-1]}."
        )
    out = {}
    for n in layers:
        lv = levels[n - 1]
        side = [spec.grid, spec.grid] if spec.kind == "vit" else [-(-spec.input_px // int(lv["reduction"]))] * 2
        out[n] = {"grid": side, "dim": spec.dim if spec.kind == "vit" else int(lv["num_chs"]), "module": lv["module"]}
    return out


def _under(module: str, dropped: tuple[str, ...]) -> bool:
    """Whether a dotted module name is one of ``dropped`` or inside one."""
    return any(module == d or module.startswith(d + ".") for d in dropped)


class GridEncoder(torch.nn.Module):
    """Wraps a timm model: normalises uint8 NHWC input and returns (tokens, pooled).

    tokens: (batch, grid, grid, dim), row i / column j = bin (r0 + i, c0 + j) for a ViT/14;
    pooled: (batch, pooled_dim) as each model's authors define it. With ``layer`` (counted from 1, see the
    module docstring), ``tokens`` is that layer's grid instead (what a run trained on ``tokens_<layer>``
    reads), computed by a forward that stops after it; pooled is then None.
    :meth:`features` returns the final grid, pooled and any layers' grids of one forward pass.
    """

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, layer: int | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.layer = layer
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255, persistent=False)
        if spec.pre_activation:  # the grid before the final activation; pooled applies it (torchvision's forward)
            model.get_submodule(spec.pre_activation).act = torch.nn.Identity()
        if layer is not None:
            check_layers(spec, (layer,), model)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    def _normalise(self, images_u8_nhwc: torch.Tensor) -> torch.Tensor:
        x = images_u8_nhwc.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def forward(self, images_u8_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self._normalise(images_u8_nhwc)
        if self.layer is not None:
            (grid,) = self.model.forward_intermediates(
                x, indices=[self.layer - 1], norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
            )
            return grid.permute(0, 2, 3, 1), None
        return self._grid_and_pooled(self.model.forward_features(x))

    def features(
        self, images_u8_nhwc: torch.Tensor, layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(tokens, pooled, [grid of each layer, ascending]) of one forward pass; the grids (batch, h, w, c)
        are the blocks' (or stages') outputs, without the final norm, prefix tokens dropped by timm with the
        model's own ``num_prefix_tokens``. Without layers this is ``forward`` and an empty list."""
        x = self._normalise(images_u8_nhwc)
        if not layers:
            return (*self._grid_and_pooled(self.model.forward_features(x)), [])
        out, grids = self.model.forward_intermediates(
            x, indices=[n - 1 for n in sorted(layers)], norm=False, output_fmt="NCHW", intermediates_only=False
        )
        return (*self._grid_and_pooled(out), [g.permute(0, 2, 3, 1) for g in grids])

    def _grid_and_pooled(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class LayerRunner(torch.nn.Module):
    """``GridEncoder.features`` as a module's forward (what extraction compiles): (tokens, pooled, *grids)."""

    def __init__(self, encoder: GridEncoder, layers: tuple[int, ...]):
        super().__init__()
        self.encoder = encoder
        self.layers = tuple(layers)

    def forward(self, images_u8_nhwc: torch.Tensor):
        tokens, pooled, grids = self.encoder.features(images_u8_nhwc, self.layers)
        return (tokens, pooled, *grids)
