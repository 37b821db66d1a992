"""Parity of ONNX outputs with PyTorch: the one comparison and the one result type.

Figures (per output, then overall):
- max / mean absolute error;
- cosine similarity of the embeddings (per image; mean and min over the images);
- neighbour agreement: with labels, the fraction of images whose kNN top-1 prediction (cosine kNN,
  even-indexed images as the bank, odd ones as queries) is the same from the reference and from the
  tested features; without labels, the fraction whose nearest other image is the same.
- per output (tokens too): mean cosine and mean relative error ||test - ref|| / ||ref|| per image.
- a classifier's ``logits`` / ``logits_<d>``: top-1 agreement, the fraction of images whose top class
  (argmax of the logits) is the same from the reference and from the tested outputs; the logits'
  cosine is their per-output cosine above.
``passed`` holds when every output's mean cosine meets the cosine tolerance, its relative error stays
within the distance that tolerance allows (so a scaled output cannot pass on direction alone), the
embeddings' neighbour agreement and the logits' top-1 agreement meet their tolerances (and the max
absolute error, if a tolerance for it is given); every miss is listed in ``failures``.

numpy (+ onnxruntime to run a session) only: this file ships in every bundle's ``runtime/`` folder,
so that the device re-checks parity with the same rule.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

import numpy as np

from .knn import knn_predict

DEFAULT_TOLERANCES = {"cosine": 0.995, "neighbour_agreement": 0.99}
CLASSIFIER_TOLERANCES = {"top1_agreement": 0.99}  # of a classifier's logits, beside the above
OUTPUT_KEYS = ("tokens", "embedding", "logits")  # reference outputs; logits only of a classifier


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
        top1_agreement: of a classifier, the worst logits output's top-1 agreement; None without logits.
        tolerances: the tolerances applied.
        failures: one line per miss, naming the output and the figure.
        per_output: max_abs / mean_abs (and cosine for embeddings) per output name.
        label: what was compared, e.g. ``int8 batch 1``.
        note: e.g. ``fp16 on CPUExecutionProvider: host-emulated``.
        runs: for a merged result, the results it merges by name (``batch1``, ``batchN``).
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
    runs: dict[str, ParityResult] = field(default_factory=dict)
    top1_agreement: float | None = None

    @property
    def cosine_mean(self) -> float:
        return self.cosine

    def to_dict(self) -> dict:
        """The figures, with each merged run under its name (``batch1``, ``batchN``, ...)."""
        d = {k: v for k, v in asdict(self).items() if k != "runs"}
        d.update({name: run.to_dict() for name, run in self.runs.items()})
        return d

    def brief(self) -> str:
        """One line for a candidate table: the misses if it failed, else cosine and agreement."""
        if not self.passed:
            return "; ".join(self.failures)
        agree = "" if self.neighbour_agreement is None else f", agreement {self.neighbour_agreement:.0%}"
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.0%}"
        return f"cosine {self.cosine:.5f}{agree}{top1}" + (f" ({self.note})" if self.note else "")

    def summary(self) -> str:
        agree = "n/a" if self.neighbour_agreement is None else f"{self.neighbour_agreement:.1%}"
        head = f"{self.label}: " if self.label else ""
        top1 = "" if self.top1_agreement is None else f", top-1 agreement {self.top1_agreement:.1%}"
        text = (f"{head}{'PASS' if self.passed else 'FAIL'} cosine {self.cosine:.5f} (min {self.cosine_min:.5f}), "
                f"neighbour agreement {agree}{top1}, max abs {self.max_abs:.3g}, mean abs {self.mean_abs:.3g}")
        return text + (f" [{self.note}]" if self.note else "")


def _tolerance(tolerances, key: str):
    default = {**DEFAULT_TOLERANCES, **CLASSIFIER_TOLERANCES}.get(key)
    if tolerances is None:
        return default
    if isinstance(tolerances, dict):
        return tolerances.get(key, default)
    return getattr(tolerances, key, default)


def _as_outputs(outputs) -> dict[str, np.ndarray]:
    if isinstance(outputs, dict):
        return {k: np.asarray(v) for k, v in outputs.items()}
    outputs = list(outputs)
    if len(outputs) not in (2, 3):
        raise ValueError("outputs given as a sequence must be (tokens, embedding) or (tokens, embedding, logits)")
    return dict(zip(OUTPUT_KEYS, (np.asarray(o) for o in outputs)))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _nearest_other(feats: np.ndarray) -> np.ndarray:
    f = _normalize(feats)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def neighbour_agreement(ref: np.ndarray, test: np.ndarray, labels=None) -> tuple[float | None, str]:
    """Agreement of the neighbour structure of two feature sets [N, D] (see the module docstring)."""
    n = len(ref)
    if labels is not None:
        labels = np.asarray(labels)
        bank, query = np.arange(0, n, 2), np.arange(1, n, 2)
        if len(query) >= 1 and (labels >= 0).all() and len(np.unique(labels[bank])) >= 2:
            k = min(20, len(bank))
            a = knn_predict(ref[bank], labels[bank], ref[query], k=k)
            b = knn_predict(test[bank], labels[bank], test[query], k=k)
            return float(np.mean(a == b)), "knn_top1"
    if n < 3:
        return None, "nearest_neighbour"
    return float(np.mean(_nearest_other(ref) == _nearest_other(test))), "nearest_neighbour"


def is_logits(name: str) -> bool:
    """Whether an output is a classifier's logits (``logits``, or ``logits_<d>`` of a multi-exit graph)."""
    return name == "logits" or name.startswith("logits_")


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float:
    """The fraction of images [N, classes] whose top class is the same in ``ref`` and ``test``."""
    return float(np.mean(np.argmax(ref.reshape(len(ref), -1), 1) == np.argmax(test.reshape(len(test), -1), 1)))


def compare_outputs(ref, test, tolerances=None, labels=None, label: str = "", note: str = "") -> ParityResult:
    """Compares tested outputs with reference outputs, collecting every miss.

    Args:
        ref, test: ``{output name: array}`` (or ``(tokens, embedding)``), the same images in the same
            order. Every reference output must be in ``test``. Embeddings are the outputs named
            ``embedding`` / ``embedding_<d>``; with none, the first output, flattened per image.
        tolerances: ``{"cosine", "neighbour_agreement", "top1_agreement", optional "max_abs"}`` or an
            object with those attributes (a profile's parity tolerance); default cosine 0.995,
            neighbour agreement 0.99, top-1 agreement 0.99 (outputs named ``logits`` / ``logits_<d>``).
        labels: class per image, for kNN top-1 agreement; else nearest-neighbour agreement.
        label, note: carried into the result (what was compared; e.g. host-emulated fp16).
    """
    ref, test = _as_outputs(ref), _as_outputs(test)
    figures = ("cosine", "neighbour_agreement", "max_abs") + (("top1_agreement",) if any(map(is_logits, ref)) else ())
    tol = {k: _tolerance(tolerances, k) for k in figures}
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
    cos_all, agree_all, top1_all, kind = [], [], [], "nearest_neighbour"
    for name in per_output:
        r, t = ref[name].reshape(len(ref[name]), -1), test[name].reshape(len(test[name]), -1)
        cos = np.sum(_normalize(r) * _normalize(t), axis=1)
        rel = np.linalg.norm(t - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)
        per_output[name].update(cosine=float(cos.mean()), cosine_min=float(cos.min()), rel_err=float(rel.mean()))
        if cos.mean() < tol["cosine"]:
            failures.append(f"{name}: cosine {cos.mean():.5f} < {tol['cosine']} (worst image {cos.min():.5f})")
        if rel.mean() > max_rel:
            failures.append(f"{name}: relative error {rel.mean():.3g} > {max_rel:.3g} (the cosine tolerance's)")
        if is_logits(name):
            top1 = top1_agreement(r, t)
            per_output[name]["top1_agreement"] = top1
            top1_all.append(top1)
            if top1 < tol["top1_agreement"]:
                failures.append(f"{name}: top-1 agreement {top1:.1%} < {tol['top1_agreement']:.1%}")
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
        per_output=per_output, label=label, note=note, top1_agreement=min(top1_all) if top1_all else None,
    )


def merge_results(results: list[ParityResult] | dict[str, ParityResult], label: str = "") -> ParityResult:
    """One result from several (e.g. batch 1 and batch n): the worst figures, every failure.

    ``results`` given as a dict keeps each run under its name (:attr:`ParityResult.runs`).
    """
    runs = dict(results) if isinstance(results, dict) else {}
    results = list(results.values()) if isinstance(results, dict) else list(results)
    agrees = [r.neighbour_agreement for r in results if r.neighbour_agreement is not None]
    top1s = [r.top1_agreement for r in results if r.top1_agreement is not None]
    return ParityResult(
        passed=all(r.passed for r in results), max_abs=max(r.max_abs for r in results),
        mean_abs=max(r.mean_abs for r in results), cosine=min(r.cosine for r in results),
        cosine_min=min(r.cosine_min for r in results), neighbour_agreement=min(agrees) if agrees else None,
        agreement_kind=results[0].agreement_kind, images=max(r.images for r in results),
        tolerances=results[0].tolerances,
        failures=[f"{r.label}: {f}" if r.label else f for r in results for f in r.failures],
        per_output={r.label or str(i): r.per_output for i, r in enumerate(results)},
        label=label, note="; ".join(sorted({r.note for r in results if r.note})), runs=runs,
        top1_agreement=min(top1s) if top1s else None,
    )


def emulation_note(precision: str | None, preset: str | None, provider: str, machine: str | None = None,
                   native_cpus: tuple[str, ...] | None = None) -> str:
    """Names a run whose numerics are not the target's: fp16 on a CPU EP, or int8 made for another
    device's kernels (TensorRT, arm64, NNAPI) run on this machine's CPU EP; else ``""``.

    Args:
        native_cpus: the ``platform.machine()`` values whose CPU EP runs the preset's int8 as the
            device does (the preset's declaration; a model carries it in its metadata_props);
            None: any CPU.
    """
    if provider != "CPUExecutionProvider":
        return ""
    if precision == "fp16":
        return "fp16 on CPUExecutionProvider: host-emulated"
    machine = (machine or platform.machine()).lower()
    if precision == "int8" and native_cpus is not None and machine not in native_cpus:
        return f"int8 for {preset} on CPUExecutionProvider: host-emulated"
    return ""


def session_emulation_note(sess, precision: str | None = None) -> str:
    """:func:`emulation_note` of a session (precision, preset and the CPUs native to it from the
    model's metadata_props)."""
    meta = sess.get_modelmeta().custom_metadata_map  # metadata_props, no onnx package needed
    native = meta.get("quantization_native_cpus")
    return emulation_note(precision or meta.get("precision"), meta.get("quantization_preset"),
                          sess.get_providers()[0],
                          native_cpus=None if native is None else tuple(filter(None, native.split(","))))
