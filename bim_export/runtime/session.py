"""ONNX Runtime sessions: the execution providers this build has, best first, and batched runs.

A device script asks for its providers best first (TensorRT, then CUDA, ...); what this onnxruntime
build lacks is skipped and the CPU is always the last resort, so every script runs everywhere and
says which provider it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

CPU = "CPUExecutionProvider"


def provider_name(spec) -> str:
    return spec[0] if isinstance(spec, tuple) else spec


def choose_providers(preferred: Sequence, available: Sequence[str] | None = None) -> list:
    """The preferred execution providers this onnxruntime build has, in order, CPU always last.

    Args:
        preferred: provider names or (name, options) pairs, best first.
        available: what the runtime offers (default ``onnxruntime.get_available_providers()``);
            tests inject it to exercise the fallback without the hardware.
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    chosen = [p for p in preferred if provider_name(p) in available and provider_name(p) != CPU]
    return [*chosen, CPU]


def fallback_warning(requested: Sequence, used: Sequence[str]) -> str | None:
    """A warning line when the session runs without a provider that was asked for (missing from this
    onnxruntime build, or dropped by onnxruntime when it could not start, which it does silently),
    or None when it got every one."""
    missing = [provider_name(p) for p in requested if provider_name(p) not in used and provider_name(p) != CPU]
    if not missing:
        return None
    return (f"warning: {', '.join(missing)} not available here (onnxruntime "
            f"{'offers' if len(used) != 1 else 'offers only'} {', '.join(used)}); running on {used[0]}")


def make_session(model: str | Path, providers: Sequence, threads: int | None = None):
    """An InferenceSession with full graph optimization and, if given, a fixed intra-op thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), sess_options=opts, providers=list(providers))


def session(path, providers=None, provider_options=None):
    """An ONNX Runtime session on the first of ``providers`` available here (else the CPU), each
    with its ``provider_options`` (``{ep: {key: value}}``, e.g. CoreML's ModelFormat) if any."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    options = provider_options or {}
    chosen = [(p, dict(options[p])) if p in options else p for p in (providers or []) if p in available]
    return ort.InferenceSession(str(path), providers=chosen or ["CPUExecutionProvider"])


def fixed_batch(session) -> int | None:
    """The batch a session's model is fixed to (its input's first axis), or None when it is dynamic."""
    first = session.get_inputs()[0].shape[0]
    return first if isinstance(first, int) and first > 0 else None


def run_onnx(session, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Runs ``x`` through a session ``batch`` images at a time; outputs concatenated per name.

    A model with a fixed batch runs at that batch whatever ``batch`` says, its last chunk filled up
    with copies of the last image (their outputs dropped).
    """
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    batch = fixed_batch(session) or batch
    chunks = []
    for i in range(0, len(x), batch):
        part = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
        short = batch - len(part) if fixed_batch(session) else 0
        if short:
            part = np.concatenate([part, np.repeat(part[-1:], short, axis=0)])
        chunks.append([o[:len(o) - short] for o in session.run(names, {feed: part})])
    return {n: np.concatenate([c[j] for c in chunks]) for j, n in enumerate(names)}
