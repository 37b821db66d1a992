"""Embed images with a bim-export bundle on a server GPU: CUDA provider with IO binding.

Usage, from the bundle folder (onnxruntime-gpu installed):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5] [--device 0]
    python infer.py --serve [--host 127.0.0.1] [--port 8000]     # HTTP (pip install starlette uvicorn)

IO binding copies each batch to the GPU once and leaves outputs there until they are fetched, so the
timing is the model's, not onnxruntime's host<->device shuffling. Without a CUDA provider it runs
on the CPU and says so.

``--serve`` answers POST /v1/infer (one image per request: its embedding, or a classifier's top-k
labels), GET /health and GET /v1/model, batching concurrent requests up to the profile's batch;
the serving code is the bundle's ``runtime/serve.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import (CPU, Runner, build_parser, choose_providers, embedding_output, fallback_warning, fixed_batch,
                    has_output, load_manifest, make_session, run_main)

HERE = Path(__file__).resolve().parent


def preferred_providers(device_id: int = 0) -> list:
    return [("CUDAExecutionProvider", {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]


def bound_run(session, outputs: list[str], device_id: int = 0):
    """``run(x) -> [one array per output]`` binding input and outputs on the device of the session's
    first provider (the GPU under CUDA): each batch crosses to the device once."""
    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    import onnxruntime as ort

    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        binding = session.io_binding()
        binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, device, device_id))
        for name in outputs:
            binding.bind_output(name, device, device_id)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    return run


def io_binding_runner(device_id: int = 0):
    """A Runner factory whose run binds input and output on the session's first provider's device."""

    def factory(session, output: str) -> Runner:
        run = bound_run(session, [output], device_id)
        return Runner(session, output, lambda x: run(x)[0])

    return factory


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infer.py --serve", description=(
        "Serve the bundle over HTTP: POST /v1/infer (one image: its embedding, or a classifier's top-k labels), "
        "GET /health, GET /v1/model. Needs: pip install starlette uvicorn"))
    p.add_argument("--serve", action="store_true", required=True, help="serve over HTTP")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: this script's folder)")
    p.add_argument("--model", type=Path, default=None, help="model file (default: the bundle's model.onnx)")
    p.add_argument("--batch", type=int, default=None, help="largest batch formed (default: the profile's)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch's first request waits for others (default 5 ms)")
    p.add_argument("--queue", type=int, default=None, help="requests that may wait (default 4 x batch); more get 503")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, width x height (default 40 M)")
    p.add_argument("--exit", dest="exit_depth", type=int, default=None, help="exit depth of a multi-exit model")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--device", type=int, default=0, help="CUDA device id")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    return p


def serve_main(argv, available=None) -> int:
    """``infer.py --serve``: the bundle's model behind the runtime's HTTP endpoint."""
    from runtime.batcher import MicroBatcher
    from runtime.errors import InputError
    from runtime.serve import Limits, ServedModel, require_framework, serve

    args = serve_parser().parse_args(argv)
    for flag, value in (("--port", args.port), ("--batch", args.batch), ("--queue", args.queue),
                        ("--max-body-mb", args.max_body_mb), ("--max-pixels", args.max_pixels)):
        if value is not None and (value < 0 if flag == "--port" else value <= 0):
            raise SystemExit(f"error: {flag} must be {'>= 0' if flag == '--port' else '> 0'} (got {value})")
    try:
        require_framework()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    bundle = args.bundle or HERE
    manifest = load_manifest(bundle)
    preferred = preferred_providers(args.device)
    session = make_session(args.model or Path(bundle) / "model.onnx", choose_providers(preferred, available),
                           args.threads)
    used = session.get_providers()
    warning = fallback_warning(preferred, used)
    if warning:
        print(warning, file=sys.stderr)
    outputs = [embedding_output(session, args.exit_depth)]
    if manifest.get("labels") and has_output(session, "logits"):
        outputs.append(embedding_output(session, args.exit_depth, "logits"))
    fixed = fixed_batch(session)
    batch = fixed or args.batch or int(manifest.get("batch", 1))
    batcher = MicroBatcher(bound_run(session, outputs, args.device), batch, args.max_wait_ms, args.queue,
                           fixed_batch=fixed)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels)
    try:
        serve(ServedModel(manifest, outputs, batcher, limits, used), args.host, args.port, args.log_level)
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


def main(argv=None, available=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--serve" in argv:
        return serve_main(argv, available)
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0, help="CUDA device id")
    parser.add_argument("--serve", action="store_true",
                        help="serve over HTTP instead (see `infer.py --serve --help`; pip install starlette uvicorn)")
    args = parser.parse_args(argv)
    preferred = preferred_providers(args.device)
    providers = choose_providers(preferred, available)
    return run_main(args, providers, runner_factory=io_binding_runner(args.device), script_dir=HERE,
                    requested=preferred)


if __name__ == "__main__":
    sys.exit(main())
