"""Embed images with a bim-export bundle on a server GPU: CUDA provider with IO binding.

Usage, from the bundle folder (onnxruntime-gpu installed):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5] [--device 0]

IO binding copies each batch to the GPU once and leaves outputs there until they are fetched, so the
timing is the model's, not onnxruntime's host<->device shuffling. Without a CUDA provider it runs
on the CPU and says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from common import CPU, Runner, build_parser, choose_providers, run_main

HERE = Path(__file__).resolve().parent


def preferred_providers(device_id: int = 0) -> list:
    return [("CUDAExecutionProvider", {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}), CPU]


def io_binding_runner(device_id: int = 0):
    """A Runner factory whose run binds input and output on the session's first provider's device."""

    def factory(session, output: str) -> Runner:
        device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        import onnxruntime as ort

        input_name = session.get_inputs()[0].name

        def run(x: np.ndarray) -> np.ndarray:
            binding = session.io_binding()
            binding.bind_ortvalue_input(input_name, ort.OrtValue.ortvalue_from_numpy(x, device, device_id))
            binding.bind_output(output, device, device_id)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        return Runner(session, output, run)

    return factory


def main(argv=None, available=None) -> int:
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", type=int, default=0, help="CUDA device id")
    args = parser.parse_args(argv)
    preferred = preferred_providers(args.device)
    providers = choose_providers(preferred, available)
    return run_main(args, providers, runner_factory=io_binding_runner(args.device), script_dir=HERE,
                    requested=preferred)


if __name__ == "__main__":
    sys.exit(main())
