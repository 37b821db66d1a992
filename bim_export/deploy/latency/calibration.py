"""Calibration files: a device's own measurements, fitted once, used by every later prediction.

``bim-export calibrate --profile NAME``, run on the device itself, exports a few reference ViT graphs
(two widths, two depths), times them with ONNX Runtime and fits the cost model's efficiency factors
and overheads (:func:`bim_export.deploy.latency.roofline.fit_factors`) to them. The file goes to
``$BIM_EXPORT_CALIBRATION_DIR/<profile>.json`` (default ``~/.config/bim-export/calibration``); a
Jetson owner calibrates once, and exports made on a workstation predict from it.

Calibrating is refused on a machine that is not the profile's device (the rules:
:mod:`bim_export.machine`); ``--force`` calibrates anyway and the file says ``forced``, which every
prediction made from it repeats in its label and error basis.

A file is rejected (InputError naming file, field and value) when it is not JSON, lacks a field,
was made for another profile, or for another device model (the profile's hardware figures differ),
or on a machine that is not the profile's device without being forced.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ... import __version__
from ...core.atomic import OutputKind, atomic_write_bytes, check_destination
from ...core.errors import InputError
from ...runtime.machine import describe_device, describe_machine, device_mismatches, machine_description
from ..profiles import Profile, load_profile
from .costmodel import graph_cost
from .measure import available_providers, measure_many
from .roofline import (MAX_EFFICIENCY, CostFactors, Hardware, default_factors, fit_factors, node_times,
                       predict_seconds)

# What a calibration file records of the timing protocol (not one measurement's diagnostics).
PROTOCOL_SETTINGS = ("threads", "warmup", "repeats", "rounds", "max_rounds", "clock", "statistic")

FORMAT_VERSION = 1
KIND = "bim-export-calibration"
ENV_DIR = "BIM_EXPORT_CALIBRATION_DIR"
# What a later calibration may replace at its file's place.
CALIBRATION = OutputKind("calibration file", keys=("kind", "profile", "factors"))

# Reference graphs: ViT-Ti and ViT-S widths at two depths, patch 16, 224 px, random weights.
REFERENCE_MODELS = (
    {"embed_dim": 192, "num_heads": 3, "depth": 2, "img_size": 224, "patch_size": 16},
    {"embed_dim": 192, "num_heads": 3, "depth": 6, "img_size": 224, "patch_size": 16},
    {"embed_dim": 384, "num_heads": 6, "depth": 2, "img_size": 224, "patch_size": 16},
    {"embed_dim": 384, "num_heads": 6, "depth": 6, "img_size": 224, "patch_size": 16},
)


@dataclass
class Calibration:
    """A loaded calibration file."""

    path: Path
    profile: str
    factors: CostFactors
    machine: dict
    expected_error: float  # worst relative error of the fit on its own measurements (at least 10 %)
    fit_error: dict  # the file's fit_error: median and worst residual of the fit
    forced: bool = False  # made with --force on a machine that is not the profile's device
    mismatch: list[str] = field(default_factory=list)  # how that machine differs from the device
    created: str = ""

    @property
    def label(self) -> str:
        """The note of every prediction made from this file: where it was made, and forced or not."""
        on = f"on {self.machine.get('cpu', 'the device')}"
        return on + (", forced: not the profile's device" if self.forced else "")

    @property
    def error_basis(self) -> str:
        """Where a calibrated prediction's error comes from, in a line."""
        n = self.fit_error.get("n")
        on = f" on {n} measurements" if isinstance(n, int) else ""
        forced = f" (forced on a machine that is not the device: {'; '.join(self.mismatch)})" if self.forced else ""
        return (f"calibrated{forced}: worst residual of the fit{on} on {self.machine.get('cpu', 'the device')} "
                f"(at least 10 %; {self.path.name})")

    def to_dict(self) -> dict:
        """What a prediction records of the file it used (manifest, candidate table)."""
        return {"file": str(self.path), "created": self.created, "machine": describe_machine(self.machine),
                "forced": self.forced, "mismatch": list(self.mismatch)}


def calibration_dir() -> Path:
    """Where calibration files live: $BIM_EXPORT_CALIBRATION_DIR, else the user's config dir."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "bim-export" / "calibration"


def calibration_path(profile_name: str) -> Path:
    return calibration_dir() / f"{profile_name}.json"


def machine_mismatches(profile, machine: dict) -> list[str]:
    """How ``machine`` differs from the profile's device (empty: it is the device). A measured
    profile (``host``) is whatever machine runs the command, so every machine is it."""
    if profile.measured:
        return []
    return device_mismatches(profile.device.model_dump() if profile.device else None, machine)


def model_signature(spec: dict) -> str:
    return "vit-w{embed_dim}-h{num_heads}-d{depth}-p{patch_size}-{img_size}px".format(**spec)


def load_calibration(profile: Profile, path: str | os.PathLike | None = None) -> Calibration | None:
    """The profile's calibration, or None when it has none (an explicit ``path`` must exist).

    Raises:
        InputError: corrupt JSON, a missing or wrong field, a file for another profile or for
            another device model (hardware figures differ from the profile's).
    """
    explicit = path is not None
    path = Path(path) if explicit else calibration_path(profile.name)
    if not path.is_file():
        if explicit:
            raise InputError(f"{path}: calibration file not found")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: corrupt JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read calibration file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a calibration file must be a JSON object (got {type(data).__name__})")

    def need(key, kind):
        if key not in data:
            raise InputError(f"{path}: field '{key}' is missing")
        if not isinstance(data[key], kind):
            raise InputError(f"{path}: field '{key}' must be {kind.__name__} (got {data[key]!r:.60})")
        return data[key]

    if need("kind", str) != KIND:
        raise InputError(f"{path}: field 'kind' must be '{KIND}' (got '{data['kind']}')")
    if need("format_version", int) != FORMAT_VERSION:
        raise InputError(f"{path}: field 'format_version' must be {FORMAT_VERSION} (got {data['format_version']})")
    if need("profile", str) != profile.name:
        raise InputError(f"{path}: field 'profile' is '{data['profile']}', but this is for profile '{profile.name}'")
    recorded = need("hardware", dict)
    current = Hardware.from_profile(profile).signature() if profile.hardware is not None else None
    if current is not None:
        for key, value in _flat(current).items():
            got = _flat(recorded).get(key)
            if got is None or abs(float(got) - float(value)) > 1e-6 * max(1.0, abs(float(value))):
                raise InputError(f"{path}: field 'hardware.{key}' is {got}, but profile '{profile.name}' says {value}: "
                                 f"made for another device model; run `bim-export calibrate --profile {profile.name}` again")
    factors = need("factors", dict)
    try:
        fac = CostFactors.from_dict(factors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InputError(f"{path}: field 'factors' is malformed ({type(e).__name__}: {e})") from None
    except InputError as e:  # a value the factors reject (an unknown overlap)
        raise InputError(f"{path}: field {e}") from None
    for cls, eff in fac.efficiency.items():
        if not eff > 0:
            raise InputError(f"{path}: field 'factors.efficiency.{cls}' must be > 0 (got {eff})")
    for key in ("node_overhead_us", "fixed_overhead_us"):
        if getattr(fac, key) < 0:
            raise InputError(f"{path}: field 'factors.{key}' must be >= 0 (got {getattr(fac, key)})")
    fit = need("fit_error", dict)
    err = fit.get("max")
    if not isinstance(err, (int, float)) or err < 0:
        raise InputError(f"{path}: field 'fit_error.max' must be a number >= 0 (got {err!r})")
    machine, forced = need("machine", dict), data.get("forced", False)
    if not isinstance(forced, bool):
        raise InputError(f"{path}: field 'forced' must be true or false (got {forced!r:.60})")
    mismatch = machine_mismatches(profile, machine)
    if mismatch and not forced:
        raise InputError(f"{path}: made on {describe_machine(machine)}, which is not profile '{profile.name}''s device "
                         f"({describe_device(_device(profile))}): {'; '.join(mismatch)}; delete it and run "
                         f"`bim-export calibrate --profile {profile.name}` on the device")
    return Calibration(path=path, profile=profile.name, factors=fac, machine=machine,
                       expected_error=max(0.1, float(err)), fit_error=dict(fit), forced=bool(mismatch),
                       mismatch=mismatch, created=str(data.get("created", "")))


def _device(profile) -> dict | None:
    return profile.device.model_dump() if profile.device else None


def describe_calibration(profile) -> str:
    """The calibration in force for ``profile``, for ``bim-export profiles show``: its file (absolute),
    when and on what machine it was made, forced or not; or why there is none, or why it is unusable."""
    if profile.measured:
        return "calibration: none used (latency is measured on the machine running the command)"
    path = calibration_path(profile.name).absolute()
    try:
        cal = load_calibration(profile)
    except InputError as e:
        return f"calibration: {path}\n  unusable, every prediction for this profile fails until it is replaced: {e}"
    if cal is None:
        return f"calibration: none ({path} does not exist; predictions use the device class's default factors)"
    verdict = ("FORCED: not the profile's device (" + "; ".join(cal.mismatch) + ")" if cal.forced
               else "the profile's device")
    return (f"calibration: {path}\n  made {cal.created or 'at an unrecorded time'} on {describe_machine(cal.machine)}: "
            f"{verdict}; fit error {cal.expected_error:.0%}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def export_reference_vit(spec: dict, path: str | os.PathLike, opset: int = 17) -> Path:
    """Exports a random-weight timm ViT (no head) of ``spec`` to ONNX the way real exports are made."""
    import timm
    import torch

    from ..export import export_onnx  # torch and the exporter only when calibrating

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **spec).eval()
    return export_onnx(model, path, opset=opset, img_size=spec["img_size"],
                       metadata={"depth": spec["depth"], "precision": "fp32", "reference": model_signature(spec)})


def calibrate(profile: Profile | str, out: str | os.PathLike | None = None, *, force: bool = False, specs=None,
              batches=None, threads: int | None = None, warmup: int = 5, repeats: int = 20, rounds: int = 5) -> str:
    """Run on the real device: measures reference ViT graphs and writes the profile's calibration file.

    Args:
        profile: profile name, alias, YAML path or Profile.
        out: the calibration file (default: ``calibration_path(profile)``).
        force: calibrate on a machine that is not the profile's device; the file records it as
            ``forced`` and every prediction from it says so.
        specs: reference model specs (timm VisionTransformer kwargs; default REFERENCE_MODELS).
        batches: batch sizes to measure at (default: 1 and the profile's batch).

    Returns:
        A summary: each reference model's measured and fitted latency, and where the file went.

    Raises:
        InputError: a bad profile, a machine that is not the profile's device (without ``force``), no
            GPU provider here for a GPU profile, or an ``out`` that is not a calibration file or cannot
            be written (all checked before measuring).
    """
    profile = load_profile(profile)
    here = machine_description()
    mismatch = machine_mismatches(profile, here)
    if mismatch and not force:
        raise InputError(f"calibrate --profile {profile.name}: this machine, {describe_machine(here)}, is not the "
                         f"profile's device ({describe_device(_device(profile))}): {'; '.join(mismatch)}; run "
                         "calibrate on the device itself, or add --force to record it labelled as forced")
    specs = list(specs or REFERENCE_MODELS)
    batches = sorted(set(batches or [1, profile.batch]))
    gpu_eps = [e for e in profile.execution_providers if e != "CPUExecutionProvider"]
    hw = Hardware.from_profile(profile)
    dest = check_destination(Path(out) if out is not None else calibration_path(profile.name), CALIBRATION)
    available = available_providers()
    if profile.device_class == "gpu" and not set(gpu_eps) & set(available):
        raise InputError(f"profile '{profile.name}': none of execution_providers {gpu_eps} is available here "
                         f"({', '.join(available)}); run calibrate on the device itself")
    with tempfile.TemporaryDirectory(prefix="bim-calibrate-") as tmp:
        paths = [export_reference_vit(s, Path(tmp) / f"{model_signature(s)}.onnx", profile.opset) for s in specs]
        jobs = [(p, b) for p in paths for b in batches]
        results = measure_many(jobs, providers=list(profile.execution_providers), threads=threads or profile.threads,
                               warmup=warmup, repeats=repeats, rounds=rounds)
        used = sorted({p for r in results for p in r.providers})
        times = [node_times(graph_cost(p, b), hw) for p, b in jobs]  # fp32 graphs: no Q/DQ to fuse
    samples = [(t, r.p50 / 1e3) for t, r in zip(times, results)]
    factors = fit_factors(samples, default_factors(profile.device_class, hw), label=f"calibrate {profile.name}",
                          max_efficiency=MAX_EFFICIENCY.get(profile.device_class))
    preds = [predict_seconds(t, factors) * 1e3 for t in times]
    errors = [abs(p - r.p50) / r.p50 for p, r in zip(preds, results)]
    record = {
        "kind": KIND, "format_version": FORMAT_VERSION, "profile": profile.name, "bim_export_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": results[0].machine, "providers": used,
        "forced": bool(mismatch), "device": _device(profile), "mismatch": mismatch,
        "settings": {k: v for k, v in results[0].settings.items() if k in PROTOCOL_SETTINGS},
        "hardware": hw.signature(), "factors": factors.to_dict(),
        "fit_error": {"median": statistics.median(errors), "max": max(errors), "n": len(errors)},
        "measurements": [{"model": model_signature(specs[i // len(batches)]), "batch": b, "measured_ms": r.p50,
                          "fitted_ms": p} for i, ((_, b), r, p) in enumerate(zip(jobs, results, preds))],
    }
    atomic_write_bytes(dest, (json.dumps(record, indent=2) + "\n").encode(), CALIBRATION)
    lines = [f"calibrated {profile.name} on {describe_machine(record['machine'])} ({', '.join(used)})"
             + (f", FORCED: not the profile's device ({'; '.join(mismatch)})" if mismatch else ""),
             f"{'model':<32} {'batch':>5} {'measured ms':>12} {'fitted ms':>10}"]
    lines += [f"{m['model']:<32} {m['batch']:>5} {m['measured_ms']:>12.3f} {m['fitted_ms']:>10.3f}"
              for m in record["measurements"]]
    lines.append(f"fit error: median {record['fit_error']['median']:.1%}, worst {record['fit_error']['max']:.1%}")
    lines.append(f"wrote {dest}")
    return "\n".join(lines)
