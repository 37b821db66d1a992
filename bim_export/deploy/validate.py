"""Parity of ONNX outputs with PyTorch, and re-validation of a finished bundle on any machine.

This file is also the bundle's standalone ``validate.py``: a copy of it runs on the device as
``python validate.py [BUNDLE_DIR]`` with only numpy and onnxruntime installed. So at import it needs
nothing but numpy, onnxruntime and the standard library; torch and the rest of bim_export are
imported inside the functions that use them, when they are there.

Parity figures (per output, then overall):
- max / mean absolute error;
- cosine similarity of the embeddings (per image; mean and min over the images);
- neighbour agreement: with labels, the fraction of images whose kNN top-1 prediction (cosine kNN,
  even-indexed images as the bank, odd ones as queries) is the same from the reference and from the
  tested features; without labels, the fraction whose nearest other image is the same.
- per output (tokens too): mean cosine and mean relative error ||test - ref|| / ||ref|| per image.
``passed`` holds when every output's mean cosine meets the cosine tolerance, its relative error stays
within the distance that tolerance allows (so a scaled output cannot pass on direction alone), the
embeddings' neighbour agreement meets its tolerance (and the max absolute error, if a tolerance for
it is given); every miss is listed in ``failures``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

DEFAULT_TOLERANCES = {"cosine": 0.995, "neighbour_agreement": 0.99}
MANIFEST, REFERENCE, MODEL = "manifest.json", "reference.npz", "model.onnx"
_OUTPUT_KEYS = ("tokens", "embedding")


# ------------------------------------------------------------------------------------- errors


def _error(kind: str, message: str) -> Exception:
    """bim_export's ValidationError / InputError when installed; a stand-in with the same exit code
    when this file runs on its own on a device."""
    try:
        from bim_export.errors import InputError, ValidationError
    except ImportError:
        InputError = type("InputError", (Exception,), {"exit_code": 2})  # noqa: N806
        ValidationError = type("ValidationError", (Exception,), {"exit_code": 4})  # noqa: N806
    return (ValidationError if kind == "validation" else InputError)(message)


# ------------------------------------------------------------------------------------- parity


@dataclass
class ParityResult:
    """How closely tested outputs match reference outputs, and whether that is close enough.

    Attributes:
        passed: every figure meets its tolerance and nothing is missing or non-finite.
        max_abs, mean_abs: absolute error over every output element.
        cosine: mean cosine similarity of the embeddings over the images.
        cosine_min: the worst image's cosine.
        neighbour_agreement: see the module docstring; None with fewer than 3 images.
        agreement_kind: ``knn_top1`` (labels given) or ``nearest_neighbour``.
        images: number of images compared.
        tolerances: the tolerances applied.
        failures: one line per miss, naming the output and the figure.
        per_output: max_abs / mean_abs (and cosine for embeddings) per output name.
        label: what was compared, e.g. ``int8 batch 1``.
        note: e.g. ``fp16 on CPUExecutionProvider: host-emulated``.
    """

    passed: bool
    max_abs: float
    mean_abs: float
    cosine: float
    cosine_min: float
    neighbour_agreement: float | None
    agreement_kind: str
    images: int
    tolerances: dict
    failures: list[str] = field(default_factory=list)
    per_output: dict = field(default_factory=dict)
    label: str = ""
    note: str = ""

    @property
    def cosine_mean(self) -> float:
        return self.cosine

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        agree = "n/a" if self.neighbour_agreement is None else f"{self.neighbour_agreement:.1%}"
        head = f"{self.label}: " if self.label else ""
        text = (f"{head}{'PASS' if self.passed else 'FAIL'} cosine {self.cosine:.5f} (min {self.cosine_min:.5f}), "
                f"neighbour agreement {agree}, max abs {self.max_abs:.3g}, mean abs {self.mean_abs:.3g}")
        return text + (f" [{self.note}]" if self.note else "")


def _tolerance(tolerances, key: str):
    if tolerances is None:
        return DEFAULT_TOLERANCES.get(key)
    if isinstance(tolerances, dict):
        return tolerances.get(key, DEFAULT_TOLERANCES.get(key))
    return getattr(tolerances, key, DEFAULT_TOLERANCES.get(key))


def _as_outputs(outputs) -> dict[str, np.ndarray]:
    if isinstance(outputs, dict):
        return {k: np.asarray(v) for k, v in outputs.items()}
    outputs = list(outputs)
    if len(outputs) != 2:
        raise ValueError("outputs given as a sequence must be (tokens, embedding)")
    return dict(zip(_OUTPUT_KEYS, (np.asarray(o) for o in outputs)))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest_other(feats: np.ndarray) -> np.ndarray:
    f = _normalize(feats)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def _knn_top1(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    try:  # the package's kNN when it is installed; the same rule, in numpy, on a device
        from bim_export.knn import knn_predict

        return np.asarray(knn_predict(bank, bank_labels, query, k=k))
    except ImportError:
        sim = _normalize(query) @ _normalize(bank).T  # [Q, B]
        top = np.argsort(-sim, axis=1)[:, :k]  # [Q, k]
        weight = np.exp((np.take_along_axis(sim, top, axis=1) - 1.0) / 0.07)  # DINO's weighted vote
        votes = np.zeros((len(query), int(bank_labels.max()) + 1))
        np.add.at(votes, (np.arange(len(query))[:, None], bank_labels[top]), weight)
        return votes.argmax(1)


def neighbour_agreement(ref: np.ndarray, test: np.ndarray, labels=None) -> tuple[float | None, str]:
    """Agreement of the neighbour structure of two feature sets [N, D] (see the module docstring)."""
    n = len(ref)
    if labels is not None:
        labels = np.asarray(labels)
        bank, query = np.arange(0, n, 2), np.arange(1, n, 2)
        if len(query) >= 1 and (labels >= 0).all() and len(np.unique(labels[bank])) >= 2:
            k = min(20, len(bank))
            a = _knn_top1(ref[bank], labels[bank], ref[query], k)
            b = _knn_top1(test[bank], labels[bank], test[query], k)
            return float(np.mean(a == b)), "knn_top1"
    if n < 3:
        return None, "nearest_neighbour"
    return float(np.mean(_nearest_other(ref) == _nearest_other(test))), "nearest_neighbour"


def compare_outputs(ref, test, tolerances=None, labels=None, label: str = "", note: str = "") -> ParityResult:
    """Compares tested outputs with reference outputs, collecting every miss.

    Args:
        ref, test: ``{output name: array}`` (or ``(tokens, embedding)``), the same images in the same
            order. Every reference output must be in ``test``. Embeddings are the outputs named
            ``embedding`` / ``embedding_<d>``; with none, the first output, flattened per image.
        tolerances: ``{"cosine", "neighbour_agreement", optional "max_abs"}`` or an object with
            those attributes (a profile's parity tolerance); default cosine 0.995, agreement 0.99.
        labels: class per image, for kNN top-1 agreement; else nearest-neighbour agreement.
        label, note: carried into the result (what was compared; e.g. host-emulated fp16).
    """
    ref, test = _as_outputs(ref), _as_outputs(test)
    tol = {k: _tolerance(tolerances, k) for k in ("cosine", "neighbour_agreement", "max_abs")}
    failures: list[str] = []
    per_output: dict[str, dict] = {}
    abs_max, abs_sum, count = 0.0, 0.0, 0
    for name, r in ref.items():
        if name == "labels" or name == "pixels":
            continue
        if name not in test:
            failures.append(f"{name}: missing from the tested outputs (got {', '.join(sorted(test)) or 'none'})")
            continue
        t = test[name]
        if t.shape != r.shape:
            failures.append(f"{name}: shape {list(t.shape)} differs from the reference {list(r.shape)}")
            continue
        if not np.isfinite(t).all():
            failures.append(f"{name}: {int((~np.isfinite(t)).sum())} non-finite values")
            continue
        err = np.abs(t.astype(np.float64) - r.astype(np.float64))
        per_output[name] = {"max_abs": float(err.max(initial=0.0)), "mean_abs": float(err.mean()) if err.size else 0.0}
        abs_max, abs_sum, count = max(abs_max, per_output[name]["max_abs"]), abs_sum + float(err.sum()), count + err.size
        if tol["max_abs"] is not None and per_output[name]["max_abs"] > tol["max_abs"]:
            failures.append(f"{name}: max abs error {per_output[name]['max_abs']:.3g} > {tol['max_abs']:.3g}")

    emb_names = [n for n in per_output if n == "embedding" or n.startswith("embedding_")] or list(per_output)[:1]
    # Every output: direction (cosine) and size (relative error). The relative error bound is the
    # distance of two unit vectors at the cosine tolerance, sqrt(2 (1 - cos)): what the cosine
    # tolerance allows in direction, allowed in length too, so a scaled output cannot pass.
    max_rel = float(np.sqrt(2 * (1 - tol["cosine"])))
    cos_all, agree_all, kind = [], [], "nearest_neighbour"
    for name in per_output:
        r, t = ref[name].reshape(len(ref[name]), -1), test[name].reshape(len(test[name]), -1)
        cos = np.sum(_normalize(r) * _normalize(t), axis=1)
        rel = np.linalg.norm(t - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)
        per_output[name].update(cosine=float(cos.mean()), cosine_min=float(cos.min()), rel_err=float(rel.mean()))
        if cos.mean() < tol["cosine"]:
            failures.append(f"{name}: cosine {cos.mean():.5f} < {tol['cosine']} (worst image {cos.min():.5f})")
        if rel.mean() > max_rel:
            failures.append(f"{name}: relative error {rel.mean():.3g} > {max_rel:.3g} (the cosine tolerance's)")
        if name not in emb_names:
            continue
        cos_all.append(cos)
        agree, kind = neighbour_agreement(r, t, labels)
        per_output[name]["neighbour_agreement"] = agree
        if agree is not None:
            agree_all.append(agree)
            if agree < tol["neighbour_agreement"]:
                failures.append(f"{name}: neighbour agreement ({kind}) {agree:.1%} < {tol['neighbour_agreement']:.1%}")
    cos = np.concatenate(cos_all) if cos_all else np.zeros(0)
    if not cos_all and not failures:
        failures.append("no output to compare")
    return ParityResult(
        passed=not failures, max_abs=abs_max, mean_abs=abs_sum / count if count else float("nan"),
        cosine=float(min(c.mean() for c in cos_all)) if cos_all else float("nan"),
        cosine_min=float(cos.min()) if cos.size else float("nan"),
        neighbour_agreement=min(agree_all) if agree_all else None, agreement_kind=kind,
        images=int(len(next(iter(ref.values())))), tolerances=tol, failures=failures,
        per_output=per_output, label=label, note=note,
    )


def merge_results(results: list[ParityResult], label: str = "") -> ParityResult:
    """One result from several (e.g. batch 1 and batch n): the worst figures, every failure."""
    agrees = [r.neighbour_agreement for r in results if r.neighbour_agreement is not None]
    return ParityResult(
        passed=all(r.passed for r in results), max_abs=max(r.max_abs for r in results),
        mean_abs=max(r.mean_abs for r in results), cosine=min(r.cosine for r in results),
        cosine_min=min(r.cosine_min for r in results), neighbour_agreement=min(agrees) if agrees else None,
        agreement_kind=results[0].agreement_kind, images=max(r.images for r in results),
        tolerances=results[0].tolerances,
        failures=[f"{r.label}: {f}" if r.label else f for r in results for f in r.failures],
        per_output={r.label or str(i): r.per_output for i, r in enumerate(results)},
        label=label, note="; ".join(sorted({r.note for r in results if r.note})),
    )


def _session(path, providers=None):
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in (providers or []) if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=chosen)


def run_onnx(session, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Runs ``x`` through a session ``batch`` images at a time; outputs concatenated per name."""
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    chunks = [session.run(names, {feed: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)})
              for i in range(0, len(x), batch)]
    return {n: np.concatenate([c[j] for c in chunks]) for j, n in enumerate(names)}


def _emulation_note(session, precision: str | None = None) -> str:
    """Names a run whose numerics are not the target's: fp16 on a CPU EP, or int8 made for
    another device's kernels (TensorRT, arm64) run on this machine's CPU EP."""
    meta = session.get_modelmeta().custom_metadata_map  # metadata_props, no onnx package needed
    precision = precision or meta.get("precision")
    preset = meta.get("quantization_preset")
    if session.get_providers()[0] != "CPUExecutionProvider":
        return ""
    if precision == "fp16":
        return "fp16 on CPUExecutionProvider: host-emulated"
    if precision == "int8" and preset in ("tensorrt", "arm64") and platform.machine().lower() not in ("aarch64", "arm64"):
        return f"int8 for {preset} on CPUExecutionProvider: host-emulated"
    return ""


def run_parity(onnx_path, backbone, x: np.ndarray, tolerances=None, labels=None, *, batches=(1, 8),
               providers=None, precision: str | None = None) -> ParityResult:
    """ONNX Runtime vs PyTorch on the same images, at each batch size in ``batches``.

    Args:
        onnx_path: the exported (possibly converted) model.
        backbone: the PyTorch backbone it came from, or ``{depth: backbone}`` for a multi-exit graph
            (reference outputs ``tokens_<d>``, ``embedding_<d>``).
        x: real images [N, 3, H, W] float32, preprocessed as the model expects.
        tolerances, labels: as :func:`compare_outputs`.
        batches: batch sizes ONNX Runtime runs at (each compared with the same reference).
        providers: execution providers in fallback order (default CPU).
        precision: fp32 / fp16 / int8 for the report; default: the model's metadata.

    Returns:
        The merged result (worst figures; failures prefixed by the batch size).
    """
    import torch

    with torch.inference_mode():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        ref: dict[str, np.ndarray] = {}
        for suffix, bb in ({"": backbone} if not isinstance(backbone, dict)
                           else {f"_{d}": b for d, b in sorted(backbone.items())}).items():
            tokens = bb.forward_features(xt)
            ref[f"tokens{suffix}"] = tokens.numpy()
            ref[f"embedding{suffix}"] = bb.forward_head(tokens, pre_logits=True).numpy()
    session = _session(onnx_path, providers)
    precision = precision or session.get_modelmeta().custom_metadata_map.get("precision")
    note = _emulation_note(session, precision)
    results = [compare_outputs(ref, run_onnx(session, x, b), tolerances, labels,
                               label=f"{precision or 'onnx'} batch {b}", note=note) for b in batches]
    return merge_results(results, label=precision or "")


# ------------------------------------------------------------------------------ bundle check


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the bundle's manifest and its check use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def machine_description() -> dict:
    """What this machine is, for the record next to every measurement (stdlib only: runs on devices)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith(("model name", "Model"))]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def _time_session(session, x: np.ndarray, warmup: int = 5, repeats: int = 20, rounds: int = 3) -> dict:
    """In-process timing for a device without bim_export: lowest of ``rounds`` medians as p50."""
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times, medians = [], []
    for _ in range(rounds):
        rnd = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            session.run(None, feed)
            rnd.append((time.perf_counter() - t0) * 1000)
        medians.append(float(np.median(rnd)))
        times += rnd
    t = np.asarray(times)
    return {"p50": min(medians), "p90": float(np.percentile(t, 90)), "p99": float(np.percentile(t, 99)),
            "mean": float(t.mean()), "settings": {"warmup": warmup, "repeats": repeats, "rounds": rounds,
                                                   "in_process": True}}


def measure_latency(model: Path, batch: int, providers, img_shape) -> dict:
    """Latency of the bundle's model here: bim_export's subprocess timing when installed, else in-process."""
    try:
        from bim_export.deploy.latency.predict import measure_onnx
    except ImportError:
        session = _session(model, providers)
        x = np.random.default_rng(0).standard_normal((batch, *img_shape)).astype(np.float32)
        out = _time_session(session, x)
        out["providers"] = session.get_providers()
    else:
        result = measure_onnx(model, batch=batch, providers=list(providers or []) or None)
        out = {k: getattr(result, k) for k in ("p50", "p90", "p99", "mean")}
        out.update(providers=list(result.providers), settings=dict(result.settings),
                   peak_memory_mb=result.peak_memory_mb)
    out.update(batch=batch, source="measured")
    return out


def _write_json_atomic(path: Path, data: dict) -> None:
    # Not tempfile.mkstemp: its 0600 would hide the manifest from the device's other users; mode 0o666
    # follows the umask. The ".<name>.tmp-" prefix is what bim_export.atomic counts as the bundle's own.
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
        if not key.startswith(_OUTPUT_KEYS):
            continue
        name = key if key in session_outputs else f"{key}_{depth}"
        out[name] = arr
    return out


def validate_bundle(bundle_dir, check_latency: bool | None = None, providers=None) -> str:
    """Re-checks a bundle on this machine and records what it measured in its manifest.

    Checks every file's sha256 against the manifest, runs the model on reference.npz's inputs at
    batch 1 and batch n and compares with the stored PyTorch outputs under the manifest's
    tolerances, and measures latency at the profile's batch size. The figures are appended to
    ``device_validations`` in manifest.json (rewritten atomically) whether or not they pass.

    Args:
        bundle_dir: the bundle folder.
        check_latency: also fail when the measured latency misses the budget. Default: only for
            the ``host`` profile (elsewhere this machine may not be the profile's device).
        providers: execution providers to try (default: the manifest's, those available here).

    Returns:
        A short report.

    Raises:
        InputError: not a bundle (no manifest, model or reference), or an unreadable one.
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
    session = _session(model, providers)
    outputs = [o.name for o in session.get_outputs()]
    expected = _reference_outputs(ref, outputs, manifest.get("depth"))
    note = _emulation_note(session, manifest.get("precision"))
    parity = merge_results([compare_outputs(expected, run_onnx(session, x, b), tolerances, labels,
                                            label=f"batch {b}", note=note)
                            for b in sorted({1, len(x)})], label=str(manifest.get("precision", "")))
    failures += parity.failures

    budgets = manifest.get("budgets") or {}
    stat = budgets.get("latency_stat") or (manifest.get("latency") or {}).get("stat") or "p50"
    budget = budgets.get("latency_ms")
    batch = int(manifest.get("batch") or (manifest.get("latency") or {}).get("batch") or 1)
    latency = measure_latency(model, batch, session.get_providers(), x.shape[1:])
    latency["stat"], latency["budget_ms"] = stat, budget
    latency["within_budget"] = None if budget is None else bool(latency[stat] <= budget)
    if check_latency is None:
        check_latency = manifest.get("profile") == "host"
    if check_latency and latency["within_budget"] is False:
        failures.append(f"latency {stat} {latency[stat]:.2f} ms > budget {budget} ms")

    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(), "providers": session.get_providers(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "parity": parity.to_dict(), "latency": latency, "latency_checked": bool(check_latency),
        "passed": not failures, "failures": failures,
    }
    manifest.setdefault("device_validations", []).append(record)
    _write_json_atomic(man_path, manifest)

    lines = [f"{root}: {manifest.get('profile', '?')} depth {manifest.get('depth', '?')} "
             f"{manifest.get('precision', '?')} on {record['machine'].get('cpu', '?')} ({', '.join(record['providers'])})",
             "  parity  " + parity.summary(),
             f"  latency {stat} {latency[stat]:.2f} ms at batch {batch} (measured"
             + (f", budget {budget} ms{'' if check_latency else ', not checked here'}" if budget is not None else "")
             + ")",
             f"  recorded in {MANIFEST} (device_validations[{len(manifest['device_validations']) - 1}])"]
    if failures:
        raise _error("validation", f"{root}: validation failed ({len(failures)} problems, recorded in "
                                   f"{MANIFEST}): " + "; ".join(failures))
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python validate.py [BUNDLE_DIR]``: the bundle's own validator (default: this file's folder)."""
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(prog="validate.py", description=main.__doc__)
    parser.add_argument("bundle", nargs="?", type=Path, default=here)
    parser.add_argument("--check-latency", action="store_true", help="fail when the latency misses the budget")
    args = parser.parse_args(argv)
    try:
        print(validate_bundle(args.bundle, check_latency=True if args.check_latency else None))
    except Exception as e:  # the stand-in error classes carry exit_code; anything else is a bug
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
