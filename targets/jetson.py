"""Embed images with a bim-export bundle on an NVIDIA Jetson: TensorRT, else CUDA, else CPU.

Usage, from the bundle folder on the device (onnxruntime-gpu for Jetson / JetPack):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5] [--no-fp16]
    python infer.py IMAGE_OR_FOLDER [...] --engine model.engine     # after: bash build_engine.sh

TensorRT builds an engine for the model on the first run (minutes on an Orin Nano) and caches it in
``trt_cache/`` next to the model, so later runs start in seconds. fp16 is enabled in TensorRT even
for an fp32 model (Jetson GPUs run fp16 at twice the fp32 rate); int8 bundles carry QDQ nodes,
which TensorRT runs as explicit int8. If the TensorRT or CUDA provider is missing from the
onnxruntime build, or onnxruntime cannot start it (it then drops it without a word), the script
falls back to the next one and says so on stderr.

With ``--engine``, a TensorRT engine built by the bundle's ``build_engine.sh`` (trtexec) runs instead
of model.onnx, through the ``tensorrt`` Python module (JetPack's python3-libnvinfer) and the CUDA
runtime library: no onnxruntime session, the same preprocessing, outputs and report.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from pathlib import Path

import numpy as np

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


class _Tensor:
    def __init__(self, name: str, shape: list):
        self.name, self.shape = name, shape


def _cudart():
    """The CUDA runtime library (cudaMalloc, cudaMemcpy, streams) through ctypes."""
    for name in (ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.12", "libcudart.so.11.0",
                 "/usr/local/cuda/lib64/libcudart.so"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise SystemExit("error: --engine needs the CUDA runtime library (libcudart.so), which was not found")


class EngineSession:
    """A TensorRT engine behind the calls infer.py makes of an onnxruntime session (get_inputs,
    get_outputs, get_providers, run); TensorRT's named-tensor API (8.5 and later)."""

    def __init__(self, path: Path):
        try:
            import tensorrt as trt
        except ImportError:
            raise SystemExit("error: --engine needs TensorRT's Python module `tensorrt` (JetPack: apt install "
                             "python3-libnvinfer); without --engine infer.py runs model.onnx on onnxruntime") from None
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such engine file (build it with: bash build_engine.sh)")
        self.trt, self.cuda = trt, _cudart()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise SystemExit(f"error: {path}: this TensorRT cannot load the engine (built by another TensorRT or "
                             "for another GPU?); rebuild it here with build_engine.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._inputs = [_Tensor(n, self._shape(n)) for n in inputs]
        self._outputs = [_Tensor(n, list(self.engine.get_tensor_shape(n))) for n in names if n not in inputs]

    def _shape(self, name: str) -> list:
        """An input's shape; a dynamic batch axis whose profile allows one size only is that size."""
        shape = list(self.engine.get_tensor_shape(name))
        if shape and shape[0] < 0:
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            shape[0] = int(low[0]) if low[0] == high[0] else "batch"
        return shape

    def get_inputs(self):
        return self._inputs

    def get_outputs(self):
        return self._outputs

    def get_providers(self):
        return ["TensorRT engine"]

    def run(self, output_names, feed: dict) -> list:
        cuda, trt, ctx = self.cuda, self.trt, self.context
        buffers, host = [], {}
        try:
            for t in self._inputs:
                x = np.ascontiguousarray(feed[t.name], dtype=trt.nptype(self.engine.get_tensor_dtype(t.name)))
                ctx.set_input_shape(t.name, x.shape)
                host[t.name] = x
            for t in self._outputs:
                host[t.name] = np.empty(tuple(ctx.get_tensor_shape(t.name)),
                                        dtype=trt.nptype(self.engine.get_tensor_dtype(t.name)))
            for name, array in host.items():
                ptr = ctypes.c_void_p()
                self._check(cuda.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(array.nbytes, 1))), "cudaMalloc")
                buffers.append(ptr)
                ctx.set_tensor_address(name, ptr.value)
                if name in feed:
                    self._copy(ptr, array, to_device=True)
            stream = ctypes.c_void_p()
            self._check(cuda.cudaStreamCreate(ctypes.byref(stream)), "cudaStreamCreate")
            ok = ctx.execute_async_v3(stream.value)
            self._check(cuda.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            cuda.cudaStreamDestroy(stream)
            if not ok:
                raise SystemExit("error: TensorRT failed to run the engine")
            for ptr, (name, array) in zip(buffers, host.items()):
                if name not in feed:
                    self._copy(ptr, array, to_device=False)
        finally:
            for ptr in buffers:
                cuda.cudaFree(ptr)
        return [host[n] for n in output_names]

    def _copy(self, ptr, array: np.ndarray, to_device: bool) -> None:
        host = ctypes.c_void_p(array.ctypes.data)
        args = (ptr, host, 1) if to_device else (host, ptr, 2)  # cudaMemcpyHostToDevice / DeviceToHost
        self._check(self.cuda.cudaMemcpy(args[0], args[1], ctypes.c_size_t(array.nbytes), args[2]), "cudaMemcpy")

    @staticmethod
    def _check(code: int, call: str) -> None:
        if code != 0:
            raise SystemExit(f"error: {call} failed with CUDA error {code}")


def main(argv=None, available=None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-fp16", dest="fp16", action="store_false", help="keep TensorRT in the model's precision")
    parser.add_argument("--engine", type=Path, default=None,
                        help="run this TensorRT engine (from build_engine.sh) instead of model.onnx on onnxruntime")
    args = parser.parse_args(argv)
    bundle = args.bundle or HERE
    if args.engine is not None:
        engine = EngineSession(args.engine)  # fails here, before any image is read, without TensorRT
        args.model = args.engine  # what the report names
        return run_main(args, [], script_dir=HERE, requested=[], session_factory=lambda *a: engine)
    precision = load_manifest(bundle).get("precision", "fp32")
    preferred = preferred_providers(Path(bundle), precision, args.fp16)
    providers = choose_providers(preferred, available)
    if provider_name(providers[0]) == "TensorrtExecutionProvider":
        (Path(bundle) / "trt_cache").mkdir(exist_ok=True)
    return run_main(args, providers, script_dir=HERE, requested=preferred)


if __name__ == "__main__":
    sys.exit(main())
