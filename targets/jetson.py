"""Embed images with a bim-export bundle on an NVIDIA Jetson: TensorRT, else CUDA, else CPU.

Usage, from the bundle folder on the device (onnxruntime-gpu for Jetson / JetPack):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5] [--no-fp16]

TensorRT builds an engine for the model on the first run (minutes on an Orin Nano) and caches it in
``trt_cache/`` next to the model, so later runs start in seconds. fp16 is enabled in TensorRT even
for an fp32 model (Jetson GPUs run fp16 at twice the fp32 rate); int8 bundles carry QDQ nodes,
which TensorRT runs as explicit int8. If the TensorRT or CUDA provider is missing from the
onnxruntime build, or onnxruntime cannot start it (it then drops it without a word), the script
falls back to the next one and says so on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import CPU, build_parser, choose_providers, load_manifest, provider_name, run_main

HERE = Path(__file__).resolve().parent


def preferred_providers(bundle: Path, precision: str, fp16: bool = True) -> list:
    """TensorRT (fp16, int8 for QDQ models, engine cache in the bundle), then CUDA, then CPU."""
    cache = bundle / "trt_cache"
    trt = {
        "trt_fp16_enable": fp16,
        "trt_int8_enable": precision == "int8",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": 0}), CPU]


def main(argv=None, available=None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="keep TensorRT in the model's precision")
    args = parser.parse_args(argv)
    bundle = args.bundle or HERE
    precision = load_manifest(bundle).get("precision", "fp32")
    preferred = preferred_providers(Path(bundle), precision, args.fp16)
    providers = choose_providers(preferred, available)
    if provider_name(providers[0]) == "TensorrtExecutionProvider":
        (Path(bundle) / "trt_cache").mkdir(exist_ok=True)
    return run_main(args, providers, script_dir=HERE, requested=preferred)


if __name__ == "__main__":
    sys.exit(main())
