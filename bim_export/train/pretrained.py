"""Starting from pretrained weights (``--init SOURCE``): a timm ViT's weights into the BIM encoder.

Sources:

* a ``.safetensors`` file, or a torch file (``.pth``, ``.pt``, ``.bin``; read with
  ``weights_only=True``) holding a state dict, plain or under ``model`` / ``state_dict`` (MAE, DeiT
  and timm's train script save it so), keys optionally prefixed ``module.`` (DDP);
* a bim-export checkpoint or backbone folder;
* a timm model name with pretrained weights (``vit_base_patch16_224.mae``), from the local cache,
  else downloaded where the network allows.

Key names are timm's VisionTransformer's; MAE's encoder uses the same ones. MAE's decoder (``decoder_*``)
and ``mask_token``, a classifier head and ``fc_norm`` (a norm after pooling, which BIM's exits do not
have) are left out. The source's final ``norm`` initialises the LAST exit norm, so the last exit's
backbone starts as the source model itself; the other exit norms and every decoder start fresh. A
position embedding of another grid size is resampled (bicubic, timm's ``resample_abs_pos_embed``);
every other difference (depth, width, patch size, tokens) is refused before training, naming the key
and both shapes.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..core.errors import InputError, close_matches
from ..model.checkpoint import torch_load_safely
from .model import BimModel

FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
LEFT_OUT = ("decoder", "mask_token", "head.", "fc_norm.")  # MAE's decoder, classifier parts
NESTINGS = ("model", "state_dict", "module")  # where training scripts put the state dict
SAFE_ALTERNATIVES = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


@dataclass
class InitReport:
    """What ``--init`` loaded: the source, the number of encoder tensors, and notes (resampling, norms)."""

    source: str
    tensors: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.source} ({self.tensors} encoder tensors; {'; '.join(self.notes)})"


def init_encoder(model: BimModel, source: str, where: str = "init") -> InitReport:
    """Loads pretrained weights into ``model``'s encoder (and its last exit norm).

    Args:
        source: a weights file, a bim-export checkpoint or backbone folder, or a timm model name.
        where: the setting's name for error lines (``--init``, ``run.yaml: init``).

    Raises:
        InputError: the source is missing, unreadable or unsafe, holds no state dict, or does not
            fit the model (the message names the key and both shapes); nothing is changed then.
    """
    state, label = read_source(source, where)
    encoder, norm, notes = fit_to_encoder(state, model, f"{where}: {label}")
    model.encoder.load_state_dict(encoder, strict=True)
    if norm:
        model.exit_norms[-1].load_state_dict(norm)
    return InitReport(label, len(encoder), notes)


# ------------------------------------------------------------------------------ reading


def read_source(source: str, where: str) -> tuple[dict[str, torch.Tensor], str]:
    """The source's state dict with timm key names, and how to name the source in messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, where), str(path)
    if path.is_file():
        return _read_file(path, where), str(path)
    if not source.startswith("hf-hub:") and ("/" in source or os.sep in source or source.endswith(FILE_SUFFIXES)):
        raise InputError(f"{where}: {source}: no such file or folder")
    return _read_timm(source, where), f"timm {source}"


def _read_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{where}: {path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    else:
        try:
            obj = torch_load_safely(path, "weights file", "keep only the weights: torch.save(ckpt['model'], "
                                    "'weights.pth') where the file is trusted, or save safetensors")
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    return _state_dict(obj, path, where)


def _read_folder(path: Path, where: str) -> dict[str, torch.Tensor]:
    from ..model.checkpoint import CONFIG, WEIGHTS, load_checkpoint

    if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
        try:
            return _from_bim(load_checkpoint(path).state_dict)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
    if (path / "model.safetensors").is_file():  # a bim-export backbone, or timm's local-dir layout
        return _read_file(path / "model.safetensors", where)
    raise InputError(f"{where}: {path}: a folder, but not a bim-export checkpoint ({WEIGHTS} + {CONFIG}) "
                     f"or backbone (model.safetensors)")


def _state_dict(obj, path: Path, where: str) -> dict[str, torch.Tensor]:
    """The tensors by name in a loaded file: the file itself or one of its ``NESTINGS``."""
    for _ in range(len(NESTINGS)):
        if _is_state_dict(obj) or not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in NESTINGS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        found = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{where}: {path}: no state dict in it (tensors by name, plain or under "
                         f"{' / '.join(NESTINGS)}); found: {found or 'nothing'}")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return _from_bim(obj) if any(k.startswith("exit_norms.") for k in obj) else dict(obj)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _from_bim(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bim-export model's weights as a timm ViT's: the encoder, the last exit's norm as ``norm``."""
    last = max(int(k.split(".")[1]) for k in state if k.startswith("exit_norms."))
    prefix = f"exit_norms.{last}."
    out = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    out.update({"norm." + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


# ------------------------------------------------------------------------------ timm names


def _read_timm(name: str, where: str) -> dict[str, torch.Tensor]:
    import timm

    if not name.startswith("hf-hub:"):
        if not timm.is_model(name):
            raise InputError(f"{where}: {name}: no such file or folder, and not a timm model name "
                             f"({close_matches(name, timm.list_pretrained(), n=3, what='pretrained timm models')})")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as e:  # an unknown tag
            tags = timm.list_pretrained(name.split(".")[0] + ".*")
            raise InputError(f"{where}: {name}: {e} ({close_matches(name, tags, n=3, what='weights')})") from None
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise InputError(f"{where}: {name}: timm has no pretrained weights for it")
        cached = _cached_file(cfg)
        if cached is not None:
            return _timm_state(name, where, file=cached)
        url = _hub_endpoint() if cfg.hf_hub_id else cfg.url
    else:
        url = _hub_endpoint()
    offline = _no_network(url)
    if offline:
        raise InputError(f"{where}: {name}: pretrained weights not in the local cache, and {offline}; fetch them "
                         f"where there is a network (timm.create_model('{name}', pretrained=True)) or pass a "
                         f"weights file")
    return _timm_state(name, where)


def _timm_state(name: str, where: str, file: str | None = None) -> dict[str, torch.Tensor]:
    import timm

    overlay = {"pretrained_cfg_overlay": {"file": file}} if file else {}
    try:
        with _quiet_hub():
            return timm.create_model(name, pretrained=True, num_classes=0, **overlay).state_dict()
    except (OSError, RuntimeError, ValueError) as e:  # hub, network and file errors vary by version
        text = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{where}: {name}: cannot load its pretrained weights ({type(e).__name__}: {text})") from None


def _cached_file(cfg) -> str | None:
    """The pretrained file of a timm config in the Hugging Face or torch hub cache, if there."""
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        for fn in (SAFE_ALTERNATIVES.get(filename), filename):
            found = fn and try_to_load_from_cache(repo, fn, cache_dir=constants.HF_HUB_CACHE,
                                                  revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _no_network(url: str) -> str | None:
    """Why ``url`` cannot be reached (offline mode, a host that does not resolve), else None.

    Checked before a download: huggingface_hub retries a failed request for most of a minute,
    with a warning each time.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy resolves the host
    host = urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e})"
    return None


@contextmanager
def _quiet_hub():
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)  # its retry warnings would bury the one error line
    try:
        yield
    finally:
        hub.setLevel(level)


# ------------------------------------------------------------------------------ fitting


def fit_to_encoder(state: dict[str, torch.Tensor], model: BimModel, label: str):
    """Checks a timm-named state dict against the encoder; returns (encoder state, last exit norm
    state, notes).

    Raises:
        InputError: another depth, a key on one side only, or a shape that differs (other than a
            position embedding's grid, which is resampled).
    """
    enc = model.encoder
    want = enc.state_dict()
    left_out = sorted({k.split(".")[0] for k in state if k.startswith(LEFT_OUT)})
    norm = {k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")}
    src = {k: v for k, v in state.items() if not k.startswith(LEFT_OUT) and not k.startswith("norm.")}
    blocks = {int(m.group(1)) for k in src if (m := re.match(r"blocks\.(\d+)\.", k))}
    if len(blocks) != len(enc.blocks):
        depth = f"the source has {len(blocks)} blocks, the model {len(enc.blocks)} (model_args.depth)"
        first = f"blocks.{min(len(blocks), len(enc.blocks))}."
        side = src if len(blocks) > len(enc.blocks) else want
        order = [k[len("blocks.0."):] for k in want if k.startswith("blocks.0.")]  # the model's key order
        k = next((first + o for o in order if first + o in side), None) or min(k for k in side if k.startswith(first))
        raise InputError(f"{label}: key {k}: {_shape(src.get(k))} in the source, {_shape(want.get(k))} in the "
                         f"model: {depth}")
    missing = [k for k in want if k not in src]
    if missing:
        raise InputError(f"{label}: key {missing[0]}: absent in the source, {_shape(want[missing[0]])} in the model"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in src if k not in want]
    if extra:
        raise InputError(f"{label}: key {extra[0]}: {_shape(src[extra[0]])} in the source, absent in the model"
                         + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "") + "; another architecture")
    notes = []
    out = {}
    for k, v in want.items():
        s = src[k]
        if k == "pos_embed" and s.shape != v.shape:
            s, note = _resample_pos_embed(s, enc, label)
            notes.append(note)
        if s.shape != v.shape:
            raise InputError(f"{label}: key {k}: {_shape(s)} in the source, {_shape(v)} in the model")
        out[k] = s
    exit_norm = model.exit_norms[-1].state_dict()
    if norm and (norm.keys() != exit_norm.keys() or any(norm[k].shape != exit_norm[k].shape for k in norm)):
        k = next(iter(norm.keys() ^ exit_norm.keys()), None) or next(k for k in norm if norm[k].shape != exit_norm[k].shape)
        raise InputError(f"{label}: key norm.{k}: {_shape(norm.get(k))} in the source, "
                         f"{_shape(exit_norm.get(k))} in the model's last exit norm")
    notes.append("last exit norm from its final norm" if norm else "no final norm: every exit norm starts fresh")
    if left_out:
        notes.append(f"left out: {', '.join(left_out[:4])}" + (" ..." if len(left_out) > 4 else ""))
    return out, norm, notes


def _resample_pos_embed(v: torch.Tensor, enc, label: str) -> tuple[torch.Tensor, str]:
    # v: [1, P' + h' * w', D], the model's: [1, P' + gh * gw, D]; P' prefix positions (the class
    # token's, unless timm's no_embed_class), then the grid row by row
    from timm.layers import resample_abs_pos_embed

    want = enc.pos_embed
    prefix = 0 if getattr(enc, "no_embed_class", False) else enc.num_prefix_tokens
    n = v.shape[1] - prefix if v.ndim == 3 else -1
    side = math.isqrt(max(n, 0))
    if v.ndim != 3 or v.shape[-1] != want.shape[-1] or n <= 0 or side * side != n:
        raise InputError(f"{label}: key pos_embed: {_shape(v)} in the source, {_shape(want)} in the model; cannot "
                         f"be resampled (not a square grid after {prefix} prefix position(s) of the same width)")
    grid = [int(g) for g in enc.patch_embed.grid_size]
    out = resample_abs_pos_embed(v.float(), new_size=grid, old_size=[side, side], num_prefix_tokens=prefix)
    return out, f"pos_embed resampled from a {side}x{side} to a {grid[0]}x{grid[1]} grid"


def _shape(t) -> str:
    return "absent" if t is None else str(list(t.shape))
