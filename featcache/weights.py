"""Encoder weights (docs/design.md §4).

Four ways to supply pretrained weights, tried in this order:

1. ``--weights PATH``: a ``.safetensors``, ``.bin``, ``.pth`` or ``.pt`` file, or a directory
   holding one (``model.safetensors`` / ``pytorch_model.bin`` preferred);
2. ``$FEATCACHE_WEIGHTS/<encoder>/`` (a directory, as above);
3. an existing Hugging Face cache (``$HF_HOME`` / ``~/.cache/huggingface``) holding the model's
   hub repository, read offline;
4. on a machine that is online (``HF_HUB_OFFLINE`` unset), a download of the model's hub
   repository through ``huggingface_hub`` into that cache (``$HF_ENDPOINT`` is honoured). The
   models are gated: accept the licence on the model's page and log in (``hf auth login`` or
   ``$HF_TOKEN``) first.

``--weights random`` or ``random:SEED`` is an explicit mode (random initialisation with a fixed
seed); it is never a silent fallback. Checkpoints are untrusted input: safetensors, or
``torch.load(weights_only=True)``, which refuses pickles that would execute code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from featcache.encoders import REGISTRY, EncoderSpec, build_model
from featcache.errors import FeatcacheError

ENV_VAR = "FEATCACHE_WEIGHTS"
SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
PREFERRED = ("model.safetensors", "pytorch_model.bin")
STRIP_PREFIXES = ("module.", "model.", "encoder.", "backbone.", "trunk.")
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.")


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "file" or "random"
    path: Path | None = None
    seed: int | None = None
    found_via: str = ""

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def identity(self) -> str:
        return f"random:{self.seed}" if self.is_random else "sha256:" + self._digest

    @cached_property
    def _digest(self) -> str:
        """Hashed once per source: a foundation model's checkpoint is several GB, and loading, the store
        identity and the run record all name it."""
        return sha256_file(self.path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_random(value: str | None) -> int | None:
    """``random`` -> 0, ``random:SEED`` -> SEED, anything else (a path, even ``random.safetensors``) -> None."""
    if value is None or (value != "random" and not value.startswith("random:")):
        return None
    if value == "random":
        return 0
    seed = value.split(":", 1)[1]
    if not seed.isdigit():
        raise FeatcacheError(f"--weights {value!r}: write random or random:SEED with a non-negative integer seed.")
    return int(seed)


def _file_in_dir(folder: Path) -> Path | None:
    for name in PREFERRED:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if len(found) > 1:
        raise FeatcacheError(
            f"{folder} holds several checkpoints ({', '.join(p.name for p in found)}); pass one file with --weights."
        )
    return found[0] if found else None


def hub_filenames(spec: EncoderSpec) -> tuple[str, ...]:
    """The checkpoint file names tried in the encoder's hub repository: its own first (CONCH v1.5), then the usual."""
    return ((spec.hf_filename,) if spec.hf_filename else ()) + PREFERRED


def _hf_cache_file(repo: str, names: tuple[str, ...] = PREFERRED) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in names:
        hit = try_to_load_from_cache(repo, name)
        if isinstance(hit, str) and Path(hit).is_file():
            _drop_if_not_checkpoint(
                Path(hit), f"the Hugging Face cache's {name} of {repo}", "Run the same command again"
            )
            return Path(hit)
    return None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def checkpoint_mismatch(path: Path) -> str | None:
    """Why ``path`` is not what its name says (a safetensors file, or a torch zip / pickle), or None when it is.

    Only the first bytes are read: enough to catch an HTML page or an error text saved under a checkpoint's name.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(64)
    if path.suffix == ".safetensors":
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        if len(head) > 8 and 0 < n <= size - 8 and head[8:9] == b"{":
            return None
        kind = "a safetensors file"
    else:
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            return None
        kind = "a PyTorch checkpoint"
    text = head.lstrip()
    what = "an HTML page" if text[:1] == b"<" else f"{size} bytes beginning {head[:24]!r}"
    return f"is not {kind} but {what}"


def _drop_if_not_checkpoint(path: Path, label: str, then: str) -> None:
    """A file in the Hugging Face cache that is not a checkpoint is removed (link and blob), with one message."""
    why = checkpoint_mismatch(path)
    if why is None:
        return
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)
    raise FeatcacheError(
        f"{label} {why} (a proxy or login page answered instead of the hub?); removed it from the cache "
        f"({path}). {then} once the hub serves the file, or supply the weights with --weights FILE."
    )


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a hub error (or its causes), if it got an answer at all."""
    seen = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def _root_cause(exc: BaseException) -> BaseException:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _download_failure(repo: str, name: str, page: str, host: str, exc: BaseException) -> str:
    """What happened to a download, in words: the hub's status, an unreachable host, a timeout, or the error."""
    offline = "supply the weights offline with --weights FILE or $FEATCACHE_WEIGHTS (HF_HUB_OFFLINE=1 never tries)"
    status = _http_status(exc)
    root = _root_cause(exc)
    if status in (401, 403):
        return (
            f"the hub at {host} refused access to {repo} (HTTP {status}): the model is gated or private. Accept "
            f"its licence on {page}, log in (`hf auth login`, or set HF_TOKEN) and run again."
        )
    if status == 404:
        return f"{repo}/{name} was not found on the hub at {host} (HTTP 404); check the model name, or {offline}."
    if status is not None and status >= 500:
        return (
            f"the hub at {host} answered HTTP {status} (a server error) to {repo}/{name}, also after retries: "
            f"the hub's side failed. Run again later, or {offline}."
        )
    if status is not None:
        return f"the hub at {host} answered HTTP {status} to {repo}/{name}; run again later, or {offline}."
    reason = str(root)[:120] or type(root).__name__
    if "Timeout" in type(root).__name__ or isinstance(root, TimeoutError):
        return f"the hub at {host} did not answer in time ({reason}); check the connection and run again, or {offline}."
    if "Connect" in type(root).__name__ or isinstance(root, (ConnectionError, OSError)):
        return (
            f"cannot reach the hub at {host} ({reason}): check the network, a proxy and HF_ENDPOINT, "
            f"and run again, or {offline}."
        )
    return f"could not download {repo} from {page} ({type(root).__name__}: {reason}); run again, or {offline}."


def _download(repo: str, names: tuple[str, ...] = PREFERRED) -> Path:
    """The model's checkpoint downloaded from the hub into the Hugging Face cache; one clear error otherwise."""
    from huggingface_hub import errors, hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    host = (endpoint or "https://huggingface.co").rstrip("/")
    page = f"{host}/{repo}"
    missing = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    for name in names:
        try:
            path = Path(hf_hub_download(repo, name, endpoint=endpoint))
        except errors.GatedRepoError:
            raise FeatcacheError(
                f"{repo} is a gated model and this account has no access: accept its licence on "
                f"{page}, then log in (`hf auth login`, or set HF_TOKEN) and run again."
            ) from None
        except errors.RepositoryNotFoundError:
            raise FeatcacheError(
                f"{repo} was not found on the hub at {page} (or it is private and you are not logged "
                "in: `hf auth login`, or set HF_TOKEN)."
            ) from None
        except errors.LocalEntryNotFoundError as exc:  # the hub could not be asked (it wraps why)
            raise FeatcacheError(_download_failure(repo, name, page, host, exc)) from None
        except missing:
            continue  # this file name is not in the repository: try the next one
        except Exception as exc:  # noqa: BLE001 - network failures take many forms; each is said in words
            raise FeatcacheError(_download_failure(repo, name, page, host, exc)) from None
        _drop_if_not_checkpoint(path, f"{name} downloaded from {page}", "Run the same command again")
        return path
    raise FeatcacheError(f"{repo} on the hub has none of {', '.join(names)}; pass the checkpoint with --weights FILE.")


def resolve_weights(spec: EncoderSpec, weights: str | None, download: bool = True) -> WeightsSource:
    """Where the weights come from (see the module docstring); ``download=False`` never reaches the network."""
    seed = parse_random(weights)
    if seed is not None:
        return WeightsSource("random", seed=seed, found_via="--weights")
    if weights:
        p = Path(weights).expanduser()
        if p.is_dir():
            f = _file_in_dir(p)
            if f is None:
                raise FeatcacheError(f"--weights {p}: no {', '.join(SUFFIXES)} file in this directory.")
            return WeightsSource("file", f, found_via="--weights")
        if p.is_file():
            if p.suffix not in SUFFIXES:
                raise FeatcacheError(
                    f"--weights {p}: unsupported file type {p.suffix!r}; use one of {', '.join(SUFFIXES)}."
                )
            return WeightsSource("file", p, found_via="--weights")
        raise FeatcacheError(f"--weights {p}: no such file or directory.")
    env = os.environ.get(ENV_VAR)
    if env and (Path(env) / spec.name).is_dir():
        f = _file_in_dir(Path(env) / spec.name)
        if f is not None:
            return WeightsSource("file", f, found_via=f"${ENV_VAR}")
    if spec.hf_repo:
        f = _hf_cache_file(spec.hf_repo, hub_filenames(spec))
        if f is not None:
            return WeightsSource("file", f, found_via="Hugging Face cache")
        if download and not _offline():
            path = _download(spec.hf_repo, hub_filenames(spec))
            return WeightsSource("file", path, found_via="downloaded from the Hugging Face hub")
    raise FeatcacheError(
        f"no weights found for encoder {spec.name!r}"
        + (" (HF_HUB_OFFLINE is set, so nothing is downloaded)" if spec.hf_repo and _offline() else "")
        + ". Supply them one of these ways: "
        f"(1) --weights PATH to a {'/'.join(SUFFIXES)} file or a folder holding one; "
        f"(2) put the file in ${ENV_VAR}/{spec.name}/; "
        f"(3) have {spec.hf_repo or 'the model'} in the Hugging Face cache (on a machine with access: `hf download "
        + (spec.hf_repo or "REPO")
        + "`, then copy ~/.cache/huggingface here); "
        "(4) on a machine that is online, leave HF_HUB_OFFLINE unset and featcache downloads it (gated models: "
        "accept the licence on the model page and log in first). "
        "Or pass --weights random[:SEED] for the random-init mode."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint without executing code from it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise FeatcacheError(f"cannot read {path} as safetensors ({exc}).") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FeatcacheError(
            f"refusing to load {path}: it is a pickle that needs code execution to load "
            "(only tensors and plain containers are accepted). Convert it to safetensors where you trust it."
        ) from exc
    except Exception as exc:
        raise FeatcacheError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}).") from exc
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FeatcacheError(f"{path} does not hold a state dict of tensors.")
    return obj


_HF_DINOV2_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",  # a plain MLP
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # SwiGLU: transformers' weights_in is timm's packed fc1 (gate half first)
    "mlp.weights_out": "mlp.fc2",
}
_HF_DINOV2_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _from_transformers_dinov2(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A transformers ``Dinov2Model`` state dict in timm's ViT names. Query, key and value are packed into ``qkv``
    (timm's order); ``embeddings.mask_token`` (masked-image training only) is dropped. A key no rule names is kept
    as it is, so that strict matching reports it."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    dropped = []
    for key, value in state.items():
        key = key.removeprefix("dinov2.")  # a Dinov2 task model's backbone
        if key == "embeddings.mask_token":
            dropped.append(key)
            continue
        if key in _HF_DINOV2_TOP:
            out[_HF_DINOV2_TOP[key]] = value
            continue
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "encoder" and parts[1] == "layer" and parts[2].isdigit():
            block, rest = f"blocks.{parts[2]}", ".".join(parts[3:])
            stem, _, leaf = rest.rpartition(".")
            if stem in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
                qkv.setdefault((block, leaf), {})[stem.rsplit(".", 1)[1]] = value
                continue
            for hf, timm_name in _HF_DINOV2_BLOCK.items():
                if rest == hf or rest.startswith(hf + "."):
                    out[f"{block}.{timm_name}{rest[len(hf) :]}"] = value
                    break
            else:
                out[key] = value
            continue
        out[key] = value
    for (block, leaf), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"{block}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        else:  # an incomplete triple stays visible under its own names (strict matching refuses it)
            out.update({f"{block}.attention.attention.{n}.{leaf}": v for n, v in parts.items()})
    return out, dropped


def _from_conch_vision(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """CONCH v1.5's ``pytorch_model_vision.bin`` (TRIDENT's CONCHVisionTower): ``trunk.*`` is timm's ViT-L/16 key for
    key; the contrastive pooler (``attn_pool_contrast.*``, ``ln_contrast.*``) is not part of the token grid and is
    dropped."""
    head = ("attn_pool_contrast.", "ln_contrast.")
    dropped = [k for k in state if k.startswith(head)]
    return {k.removeprefix("trunk."): v for k, v in state.items() if not k.startswith(head)}, dropped


# How a hub checkpoint's keys become the timm network's (EncoderSpec.checkpoint_layout); each returns
# (renamed state, keys dropped on purpose). Renaming only: strict matching follows.
CHECKPOINT_LAYOUTS = {
    "timm": lambda state: (state, []),
    "transformers-dinov2": _from_transformers_dinov2,
    "conch-vision": _from_conch_vision,
}


def convert_checkpoint(spec: EncoderSpec, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    if spec.checkpoint_layout not in CHECKPOINT_LAYOUTS:
        raise FeatcacheError(f"encoder {spec.name!r}: unknown checkpoint layout {spec.checkpoint_layout!r}.")
    return CHECKPOINT_LAYOUTS[spec.checkpoint_layout](state)


def _match_keys(
    state: dict[str, torch.Tensor], expected: set[str], unused: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip a common wrapper prefix when that makes keys match, and drop classifier heads and the keys of the
    submodules the encoder does not use (``unused``: EncoderSpec.drop_modules)."""
    for prefix in ("",) + STRIP_PREFIXES:
        if prefix and not all(k.startswith(prefix) for k in state):
            continue
        renamed = {k[len(prefix) :]: v for k, v in state.items()}
        if len(expected & renamed.keys()) >= len(expected & state.keys()):
            state = renamed
    drop = HEAD_PREFIXES + tuple(f"{m}." for m in unused)
    dropped = [k for k in state if k not in expected and k.startswith(drop)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def load_encoder(spec: EncoderSpec, source: WeightsSource, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Build the network and load its weights strictly. Returns (model, provenance)."""
    if source.is_random:
        torch.manual_seed(source.seed)
        model = build_model(spec, "cpu")
        return model.to(device), {"weights": source.identity(), "found_via": source.found_via}
    model = build_model(spec, "cpu")
    state, converted_away = convert_checkpoint(spec, read_state_dict(source.path))
    expected = set(model.state_dict().keys())
    state, dropped = _match_keys(state, expected, spec.drop_modules)
    dropped = converted_away + dropped
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise FeatcacheError(
            f"{source.path} does not fit encoder {spec.name!r} ({spec.arch}): keys {'; '.join(parts)}. "
            "Is it the checkpoint of this model?"
        )
    shapes = [k for k, v in model.state_dict().items() if tuple(v.shape) != tuple(state[k].shape)]
    if shapes:
        k = shapes[0]
        raise FeatcacheError(
            f"{source.path}: tensor {k} has shape {tuple(state[k].shape)}, model expects "
            f"{tuple(model.state_dict()[k].shape)} ({len(shapes)} mismatches). Is it the checkpoint of {spec.name}?"
        )
    model.load_state_dict(state, strict=True)
    prov = {"weights": source.identity(), "weights_file": str(source.path), "found_via": source.found_via}
    if dropped:
        prov["dropped_head_keys"] = dropped
    return model.to(device), prov


def encoder_overview() -> list[dict]:
    """Every registered encoder as ``featcache encoders`` lists it (docs/design.md §4): patch size (a CNN: its
    stride), pixels per bin, grid, token and pooled widths, parameters, licence, hub repository, whether its weights
    are found on this machine now (never downloading: a gated model's weights count as missing until they are
    here) and where the entry came from (``built-in``, or the plugin's distribution and version)."""
    rows = []
    for spec in REGISTRY.values():
        try:
            found = resolve_weights(spec, None, download=False).found_via
        except FeatcacheError:
            found = None
        weights = f"yes ({found})" if found else "random only" if spec.test_only else "no"
        rows.append(
            {
                "encoder": spec.name,
                "arch": spec.arch,
                "kind": spec.kind,
                "patch_size": spec.patch_size,
                "stride": spec.stride,
                "px_per_bin": spec.px_per_bin,
                "input_px": spec.input_px,
                "params_m": round(spec.params / 1e6, 2),
                "grid": f"{spec.grid}×{spec.grid}",
                "dim": spec.dim,
                "pooled": spec.pooled,
                "pooled_dim": spec.pooled_dim,
                "licence": spec.licence,
                "hf_repo": spec.hf_repo,
                "test_only": spec.test_only,
                "weights": weights,
                "weights_local": found is not None,
                "source": REGISTRY.source(spec.name),
                "note": spec.note,
            }
        )
    return rows
