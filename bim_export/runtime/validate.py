"""Re-validation of a finished bundle on any machine: files, parity against reference.npz, latency.

This file is also the bundle's standalone validator: a bundle ships it in its ``runtime/`` package, which
its ``validate.py`` runs on the device as ``python validate.py [BUNDLE_DIR]`` with only numpy and
onnxruntime installed. ``bim-export validate`` runs the same code and hands in its separate-process
latency timer (the measurement protocol of :mod:`bim_export.deploy.latency.measure`).

A latency measured here is the profile's only when this machine is the profile's device (the
manifest's ``device``, compared by :func:`machine.device_mismatches`; the ``host`` profile is every
machine). Elsewhere the figure is recorded and shown as another machine's, and ``--check-latency``
is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import early_exit
from .errors import BimExportError, InputError, ValidationError
from .machine import describe_device, describe_machine, device_mismatches, machine_description, sha256_file
from .parity import DEFAULT_TOLERANCES, OUTPUT_KEYS, compare_outputs, merge_results, session_emulation_note
from .session import fixed_batch, run_onnx, session

MANIFEST, REFERENCE, MODEL = "manifest.json", "reference.npz", "model.onnx"


# ------------------------------------------------------------------------------------- errors


def _error(kind: str, message: str) -> Exception:
    """A :class:`ValidationError` (``kind == "validation"``, exit 4) or an :class:`InputError` (exit 2)."""
    return (ValidationError if kind == "validation" else InputError)(message)


# ------------------------------------------------------------------------------------- latency


def time_in_process(model: Path, batch: int, providers, input_shape, warmup: int = 5, repeats: int = 20,
                    rounds: int = 5) -> dict:
    """Latency of ``model`` in this process, for a device without bim-export.

    Each statistic is the median across rounds of that round's value (so one slow spell moves
    neither p50 nor p90); the expected error is the spread of the round medians.
    """
    sess = session(model, providers)
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal((batch, *input_shape))
            .astype(np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    per_round = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000)
        per_round.append({"p50": float(np.median(times)), "p90": float(np.percentile(times, 90)),
                          "p99": float(np.percentile(times, 99)), "mean": float(np.mean(times))})
    out = {k: float(np.median([r[k] for r in per_round])) for k in ("p50", "p90", "p99", "mean")}
    medians = [r["p50"] for r in per_round]
    out.update(providers=sess.get_providers(), expected_error=(max(medians) - min(medians)) / min(medians),
               settings={"warmup": warmup, "repeats": repeats, "rounds": rounds, "in_process": True,
                         "statistic": "median across rounds of each round's value"})
    return out


# ------------------------------------------------------------------------------------- bundle


def _write_json_atomic(path: Path, data: dict) -> None:
    # Not tempfile.mkstemp: its 0600 would hide the manifest from the device's other users; mode 0o666
    # follows the umask. The ".<name>.tmp-" prefix is what bim_export.core.atomic counts as the bundle's own.
    tmp = str(path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _reference_outputs(ref: dict[str, np.ndarray], session_outputs: list[str], depth) -> dict[str, np.ndarray]:
    """reference.npz outputs keyed by the session's output names (``tokens`` of a multi-exit graph
    is its ``tokens_<depth>``)."""
    out = {}
    for key, arr in ref.items():
        if not key.startswith(OUTPUT_KEYS):
            continue
        name = key if key in session_outputs else f"{key}_{depth}"
        out[name] = arr
    return out


def machine_mismatches(manifest: dict, machine: dict) -> list[str]:
    """How ``machine`` differs from the bundle's device (empty: it is the device). A bundle of a
    measured profile (``host``) is for whatever machine runs it."""
    if manifest.get("measured", manifest.get("profile") == "host"):
        return []
    return device_mismatches(manifest.get("device"), machine)


def validate_bundle(bundle_dir, check_latency: bool | None = None, providers=None, timer=None,
                    force: bool = False) -> str:
    """Re-checks a bundle on this machine and records what it measured in its manifest.

    Checks every file's sha256 against the manifest, runs the model on reference.npz's inputs at
    batch 1 and batch n and compares with the stored PyTorch outputs under the manifest's
    tolerances, and measures latency at the profile's batch size. The figures are appended to
    ``device_validations`` in manifest.json (rewritten atomically) whether or not they pass.

    Args:
        bundle_dir: the bundle folder.
        check_latency: also fail when the measured latency misses the budget. Default: only for
            the ``host`` profile. Refused on a machine that is not the profile's device.
        providers: execution providers to try (default: the manifest's, those available here).
        timer: ``timer(model, batch, providers, input_shape) -> dict`` (p50, p90, p99, mean, providers,
            settings; optionally expected_error): how latency is measured. Default: in this process
            (:func:`time_in_process`); ``bim-export validate`` passes its separate-process timer.
        force: check latency although this machine is not the profile's device (recorded as forced).

    Returns:
        A short report.

    Raises:
        InputError: not a bundle (no manifest, model or reference), an unreadable one, or a latency
            check asked for on a machine that is not the profile's device (without ``force``).
        ValidationError: a file differs from its sha256, parity misses a tolerance, or (when
            checked) the latency misses the budget; every miss is listed.
    """
    root = Path(bundle_dir)
    man_path = root / MANIFEST
    if not man_path.is_file():
        raise _error("input", f"{root}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise _error("input", f"{man_path}: unreadable manifest ({e})") from e
    model, ref_path = root / manifest.get("model", MODEL), root / REFERENCE
    for p in (model, ref_path):
        if not p.is_file():
            raise _error("input", f"{root}: bundle lacks {p.name}")
    here = machine_description()
    mismatch = machine_mismatches(manifest, here)
    if check_latency and mismatch and not force:
        raise _error("input", f"{root}: --check-latency: this machine, {describe_machine(here)}, is not the device of "
                              f"profile '{manifest.get('profile', '?')}' ({describe_device(manifest.get('device'))}): "
                              f"{'; '.join(mismatch)}; check it on the device, or add --force")

    failures: list[str] = []
    for name, digest in sorted((manifest.get("files") or {}).items()):
        f = root / name
        if not f.is_file():
            failures.append(f"{name}: listed in the manifest but missing")
        elif sha256_file(f) != digest:
            failures.append(f"{name}: sha256 differs from the manifest (file changed since export)")

    with np.load(ref_path) as npz:
        ref = {k: npz[k] for k in npz.files}
    if "pixels" not in ref:
        raise _error("input", f"{ref_path}: no 'pixels' array")
    x = ref["pixels"].astype(np.float32)
    labels = ref.get("labels")
    if labels is not None and not (labels >= 0).all():
        labels = None
    tolerances = manifest.get("tolerances") or (manifest.get("parity") or {}).get("tolerances") or DEFAULT_TOLERANCES
    providers = providers or manifest.get("execution_providers") or ["CPUExecutionProvider"]
    options = manifest.get("provider_options") or {}
    # the app's file too where the bundle ships one (ORT Mobile profiles): latency is measured on it
    app_model = root / ((manifest.get("mobile") or {}).get("ort") or {}).get("model", "model.ort")
    runs = []
    for path in [model] + ([app_model] if app_model.is_file() and app_model != model else []):
        sess = session(path, providers, options)
        outputs = [o.name for o in sess.get_outputs()]
        expected = _reference_outputs(ref, outputs, manifest.get("depth"))
        note = session_emulation_note(sess, manifest.get("precision"))
        fixed = fixed_batch(sess)
        name = "" if path == model else f"{path.name} "
        runs += [compare_outputs(expected, run_onnx(sess, x, b), tolerances, labels,
                                 label=f"{name}batch {b}" + (" (fixed)" if fixed else ""), note=note)
                 for b in ([fixed] if fixed else sorted({1, len(x)}))]
    model = path
    parity = merge_results(runs, label=str(manifest.get("precision", "")))
    failures += parity.failures
    segments = None
    if isinstance(manifest.get(early_exit.SECTION), dict):  # --early-exit: each segment, chained, vs its reference
        segments = early_exit.check_bundle(root, manifest, providers, tolerances)
        failures += [f"early-exit segments: {f}" for f in segments.failures]

    budgets = manifest.get("budgets") or {}
    stat = budgets.get("latency_stat") or (manifest.get("latency") or {}).get("stat") or "p50"
    budget = budgets.get("latency_ms")
    batch = int(manifest.get("batch") or (manifest.get("latency") or {}).get("batch") or 1)
    latency = (timer or time_in_process)(model, batch, sess.get_providers(), x.shape[1:])
    latency.update(batch=batch, source="measured", model=model.name)
    latency["stat"], latency["budget_ms"] = stat, budget
    # A measurement that could not get a quiet machine is biased high: its budget check takes the low
    # end of its stated error, as the export's selection does.
    low = latency[stat] / (1 + latency.get("expected_error", 0.0)) if latency.get("disturbed") else latency[stat]
    latency["within_budget"] = None if budget is None else bool(low <= budget)
    if check_latency is None:
        check_latency = manifest.get("profile") == "host" and not mismatch
    forced = bool(check_latency and mismatch)
    if mismatch:
        latency["machine_mismatch"] = mismatch
        label = "measured on another machine, not the profile's device" + (" (check forced)" if forced else "")
        latency["note"] = ", ".join(filter(None, [latency.get("note"), label]))
    if check_latency and latency["within_budget"] is False:
        failures.append(f"latency {stat} {latency[stat]:.2f} ms > budget {budget} ms"
                        + (" (forced: this machine is not the profile's device)" if forced else ""))

    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": here, "on_profile_device": not mismatch, "forced": forced, "providers": sess.get_providers(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "parity": parity.to_dict(), "latency": latency, "latency_checked": bool(check_latency),
        **({"early_exit_parity": segments.to_dict()} if segments is not None else {}),
        "passed": not failures, "failures": failures,
    }
    manifest.setdefault("device_validations", []).append(record)
    _write_json_atomic(man_path, manifest)

    lines = [f"{root}: {manifest.get('profile', '?')} depth {manifest.get('depth', '?')} "
             f"{manifest.get('precision', '?')} on {record['machine'].get('cpu', '?')} ({', '.join(record['providers'])})",
             "  parity  " + parity.summary(),
             *([f"  early exit {len(manifest[early_exit.SECTION]['segments'])} segments: {segments.summary()}"]
               if segments is not None else []),
             f"  latency {stat} {latency[stat]:.2f} ms at batch {batch} (measured"
             + (f" on another machine, not the profile's device{', forced' if forced else ''}" if mismatch else "")
             + (f", budget {budget} ms{'' if check_latency else ', not checked here'}" if budget is not None else "")
             + ")",
             f"  recorded in {MANIFEST} (device_validations[{len(manifest['device_validations']) - 1}])"]
    if failures:
        raise _error("validation", f"{root}: validation failed ({len(failures)} problem{'s' if len(failures) != 1 else ''}, recorded in "
                                   f"{MANIFEST}): " + "; ".join(failures))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python validate.py [BUNDLE_DIR]``: the bundle's own validator (default: the bundle this
    file's ``runtime/`` folder sits in)."""
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="validate.py", description=main.__doc__)
    parser.add_argument("bundle", nargs="?", type=Path, default=here)
    parser.add_argument("--check-latency", action="store_true", help="fail when the latency misses the budget "
                                                                          "(refused on a machine that is not the device)")
    parser.add_argument("--force", action="store_true", help="check latency on a machine that is not the device")
    args = parser.parse_args(argv)
    try:
        print(validate_bundle(args.bundle, check_latency=True if args.check_latency else None, force=args.force))
    except BimExportError as e:  # anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
