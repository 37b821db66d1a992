"""BIM checkpoints: a directory that describes itself.

Layout (written atomically, see :mod:`bim_export.core.atomic`)::

    weights.safetensors   encoder, exit norms, decoders (fp32, or fp16 for a shipped copy)
    config.json           architecture (arch + model_args, exits, decoder...), mean/std, step, train settings
    metrics.json          {"step": s, "exits": {"3": {"recon_loss": ..., "knn_top1": ...}, ...}} (eval adds
                          eval_recon_loss: the loss on the images it scored)
    train_state.pt        optimizer state keyed by parameter name, step, RNG states (optional; loaded
                          with weights_only=True)
    log.jsonl             the training log up to ``step`` (optional)
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..core.atomic import OutputKind, atomic_dir, atomic_write_bytes
from ..core.errors import InputError

FORMAT_VERSION = 1
WEIGHTS, CONFIG, METRICS, TRAIN_STATE, LOG = (
    "weights.safetensors", "config.json", "metrics.json", "train_state.pt", "log.jsonl")
REQUIRED_CONFIG_KEYS = ("format_version", "arch", "model_args", "exits", "decoder", "mask_ratio", "mean", "std")
# What a later save, or a training run with the same --out, may replace.
CHECKPOINT = OutputKind("checkpoint", keys=("format_version", "bim_export_version", "exits"), marker=CONFIG,
                        names=frozenset({WEIGHTS, CONFIG, METRICS, TRAIN_STATE, LOG}))
# A metrics.json written outside its checkpoint (``bim-export eval --metrics-out``).
METRICS_FILE = OutputKind("metrics file", keys=("exits",))


@dataclass
class Checkpoint:
    """A loaded checkpoint directory.

    Attributes:
        path: the directory.
        config: config.json.
        metrics: metrics.json ({} when absent).
        state_dict: the model weights, float32.
    """

    path: Path
    config: dict
    metrics: dict = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def exits(self) -> list[int]:
        return list(self.config["exits"])

    @property
    def bim_config(self):
        """The model's :class:`~bim_export.model.architecture.BimConfig`, read from config.json.

        Raises:
            InputError: config.json's architecture fields are malformed (the message names the file).
        """
        from pydantic import ValidationError

        from .architecture import BimConfig

        try:
            return BimConfig.from_json(self.config)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "(architecture)"
            raise InputError(f"{self.path / CONFIG}: {field}: {err['msg']}") from None

    def load_weights(self) -> dict[str, torch.Tensor]:
        """The model weights, float32: read now from weights.safetensors if the checkpoint was loaded
        without them (a resumed run reads its config first, its weights once the model is built).

        Raises:
            InputError: weights.safetensors is missing, unreadable or corrupt.
        """
        if not self.state_dict:
            self.state_dict = _read_weights(self.path / WEIGHTS)
        return self.state_dict

    def load_train_state(self) -> dict[str, Any]:
        """train_state.pt (optimizer, step, RNG), loaded without unpickling code."""
        return _torch_load(self.path / TRAIN_STATE)


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                    metrics: dict | None = None, train_state: dict | None = None,
                    log_lines: list[str] | None = None, weights_dtype: str = "fp32") -> Path:
    """Writes a checkpoint directory atomically (replacing a previous checkpoint at ``path``).

    Args:
        state_dict: model weights (any float dtype; stored as ``weights_dtype``).
        config: config.json content; ``format_version`` and ``bim_export_version`` are added.
        metrics: metrics.json content (``{"step", "exits": {str(depth): {...}}}``).
        train_state: optimizer / step / RNG for resume (tensors and plain types only).
        log_lines: JSON lines of the training log.
        weights_dtype: ``fp32`` or ``fp16`` (half the size, cast back to fp32 on load).

    Raises:
        InputError: ``path`` holds something other than a checkpoint, or cannot be written
            (see :func:`bim_export.core.atomic.check_destination`); nothing is written.
    """
    from safetensors.torch import save_file

    if weights_dtype not in ("fp32", "fp16"):
        raise InputError(f"weights_dtype must be fp32 or fp16 (got '{weights_dtype}')")
    dtype = torch.float16 if weights_dtype == "fp16" else torch.float32
    weights = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in state_dict.items()}
    config = {"format_version": FORMAT_VERSION, **config, "weights_dtype": weights_dtype,
              "bim_export_version": __version__}
    path = Path(path)
    with atomic_dir(path, CHECKPOINT) as tmp:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / METRICS, metrics if metrics is not None else {"step": config.get("step", 0), "exits": {}})
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        if log_lines:
            (tmp / LOG).write_text("".join(line.rstrip("\n") + "\n" for line in log_lines))
    return path


def load_checkpoint(path: str | os.PathLike, weights: bool = True) -> Checkpoint:
    """Reads a checkpoint directory.

    Args:
        weights: also load weights.safetensors (as float32).

    Raises:
        InputError: the directory or a file is missing, unreadable or corrupt (the message names it).
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint directory does not exist" if not path.exists()
                         else f"{path}: a checkpoint is a directory, this is a file")
    config = _read_json(path / CONFIG)
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise InputError(f"{path / CONFIG}: missing keys {', '.join(missing)}")
    if config["format_version"] > FORMAT_VERSION:
        raise InputError(f"{path / CONFIG}: format_version {config['format_version']} is newer than this "
                         f"bim-export ({__version__}) reads ({FORMAT_VERSION}); upgrade bim-export")
    from .architecture import check_model_name

    try:
        check_model_name(config["arch"])
    except InputError as e:
        raise InputError(f"{path / CONFIG}: arch: {e}") from None
    metrics = _read_json(path / METRICS) if (path / METRICS).exists() else {}
    state = _read_weights(path / WEIGHTS) if weights else {}
    return Checkpoint(path, config, metrics, state)


def write_metrics(path: str | os.PathLike, metrics: dict) -> None:
    """Replaces a checkpoint's metrics.json atomically."""
    atomic_write_bytes(Path(path) / METRICS, (json.dumps(metrics, indent=2) + "\n").encode())


def merge_exit_metrics(metrics: dict, per_exit: dict[int | str, dict]) -> dict:
    """``metrics`` (metrics.json content) with per-exit figures merged in; ``metrics`` is not changed."""
    merged = {**metrics, "exits": {d: dict(m) for d, m in metrics.get("exits", {}).items()}}
    for depth, figures in per_exit.items():
        merged["exits"].setdefault(str(depth), {}).update(figures)
    return merged


def update_exit_metrics(path: str | os.PathLike, per_exit: dict[int | str, dict]) -> dict:
    """Merges per-exit figures into a checkpoint's metrics.json (atomically) and returns the result."""
    path = Path(path)
    metrics = merge_exit_metrics(_read_json(path / METRICS) if (path / METRICS).exists() else {}, per_exit)
    write_metrics(path, metrics)
    return metrics


def quality_metric(metrics: dict) -> str | None:
    """What scores the exits' quality in metrics.json: ``task_top1`` (held-out accuracy of a
    fine-tuned checkpoint) when any exit has it, else ``knn_top1`` when any exit has that, else None.

    One metric for the whole checkpoint, so that two exits are never ranked on different measures.
    """
    exits = [e for e in metrics.get("exits", {}).values() if isinstance(e, dict)]
    for metric in ("task_top1", "knn_top1"):
        if any(e.get(metric) is not None for e in exits):
            return metric
    return None


def exit_quality(metrics: dict, depth: int) -> float | None:
    """The exit's quality from metrics.json: its held-out task top-1 when the checkpoint is
    fine-tuned (has task metrics), else its kNN top-1; None when the exit lacks that figure."""
    metric = quality_metric(metrics)
    q = metrics.get("exits", {}).get(str(depth), {}).get(metric) if metric else None
    return float(q) if q is not None else None


def quality_dataset(metrics: dict, depth: int) -> dict | None:
    """The set that scored the exit's quality (``task_dataset`` or ``knn_dataset``), or None."""
    metric = quality_metric(metrics)
    entry = metrics.get("exits", {}).get(str(depth), {})
    ds = entry.get("task_dataset" if metric == "task_top1" else "knn_dataset") if metric else None
    return ds if isinstance(ds, dict) else None


def quality_source(metrics: dict) -> str | None:
    """Which set scored the exits' quality in metrics.json, and how: ``heldout_images (90 images;
    leave-one-out kNN ...)`` (the ``task_dataset`` of a fine-tuned checkpoint, else the
    ``knn_dataset``); None when no exit names one."""
    key = "task_dataset" if quality_metric(metrics) == "task_top1" else "knn_dataset"
    sets = {json.dumps(e[key], sort_keys=True) for e in metrics.get("exits", {}).values()
            if isinstance(e, dict) and isinstance(e.get(key), dict)}
    if not sets:
        return None
    names = []
    for ds in map(json.loads, sorted(sets)):
        names.append(f"{ds.get('name', '?')} ({ds.get('size', '?')} images; {ds.get('protocol', 'protocol not given')})")
    return "; ".join(names)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: missing from the checkpoint")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e})") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise InputError(f"{path}: missing from the checkpoint")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: corrupt or unreadable safetensors file ({e})") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _torch_load(path: Path) -> dict:
    if not path.exists():
        raise InputError(f"{path}: missing from the checkpoint (it holds no training state to resume from)")
    return torch_load_safely(path, "training state",
                             "bim-export writes only tensors and plain values there")


def torch_load_safely(path: Path, what: str, remedy: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file.

    A refused file is told apart from a damaged one by reading its pickle without running it
    (:func:`code_globals`): one that names functions or classes torch's safe loader does not allow is
    "unsafe"; one that does not parse is "corrupt or unreadable". torch's warnings about the file
    (its pickle protocol, the weights_only default) are not shown: the error line says what matters.

    Args:
        what: what the file holds, for the message ("training state", "weights file").
        remedy: what to do about a file refused as unsafe.

    Raises:
        InputError: the file is refused (it would run code when loaded), corrupt or unreadable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError) as e:
        # torch's message for a refused file suggests weights_only=False, i.e. running the file's
        # code: not advice to pass on. Only the unpickler's own finding is kept.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = (found.group(1) if found else text).strip().splitlines()[0] if text.strip() else type(e).__name__
        detail = detail.split(". ")[0]  # the finding, not torch's advice after it
        named = re.search(r"GLOBAL ([\w.]+)", text)
        code = [named.group(1)] if named else code_globals(path)
        if code:
            raise InputError(f"{path}: unsafe {what}, refused: it holds objects that would run code when loaded "
                             f"({', '.join(code[:3])}{', ...' if len(code) > 3 else ''}); {remedy}") from None
        raise InputError(f"{path}: corrupt or unreadable {what} ({type(e).__name__}: {detail})") from None


_PICKLE_SCAN_BYTES = 64 << 20  # of a file that is not a zip, what is read for its pickles
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def code_globals(path: Path) -> list[str]:
    """The functions and classes a torch file's pickle would import that torch's safe loader does not
    allow (``posix.system``, ``builtins.eval``, ...), found by reading its opcodes without running
    them. Empty when it names none, or when the file is not a pickle at all.
    """
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: the object's pickle is <name>/data.pkl
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        else:  # the legacy format: a few pickles, then the tensors' bytes
            with open(path, "rb") as f:
                data = f.read(_PICKLE_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile):
        return []
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # another torch: only its tensor rebuilding is taken as safe
        allowed = set()
    found: list[str] = []
    for name in _pickle_globals(data):
        if name not in allowed and not name.startswith(("torch._utils._rebuild_", "torch._tensor._rebuild_")) \
                and name not in found:
            found.append(name)
    return found


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL, INST and STACK_GLOBAL in the pickles at the start of ``data``
    (the legacy torch format holds several in a row, then raw tensor bytes, where reading stops)."""
    names: list[str] = []
    pos = 0
    while pos < len(data):
        strings: list[str] = []  # recent string pushes: STACK_GLOBAL takes the last two
        memo: dict[int, Any] = {}
        try:
            for op, arg, at in pickletools.genops(data[pos:]):
                if op.name in ("GLOBAL", "INST"):
                    names.append(".".join(arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in _STRING_OPS:
                    strings.append(arg if isinstance(arg, str) else str(arg))
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(memo.get(int(arg)), str):
                    strings.append(memo[int(arg)])
                elif op.name == "STOP":
                    pos += at + 1
                    break
            else:
                break
        except (ValueError, pickle.UnpicklingError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            break
    return names
