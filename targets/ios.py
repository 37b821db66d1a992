"""Check a bim-export bundle for an iPhone: the app's model.ort, run through CoreML where it exists.

Usage, from the bundle folder (on a Mac, whose onnxruntime wheel has the CoreML execution provider,
or on any workstation, where it runs on the CPU provider):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5]

Runs the bundle's ``model.ort`` (what onnxruntime-objc loads in the app), after checking that it
computes what model.onnx computes on the bundle's reference inputs, with the CoreML provider options
of the bundle's profile (an MLProgram, as the app sets them), else the CPU provider. A Mac's Neural
Engine is not the iPhone's: `python validate.py` on a Mac checks parity through CoreML, and latency
comes from the app (Xcode Instruments) on the phone.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import CPU, build_parser, choose_providers, load_manifest, phone_model, run_main

HERE = Path(__file__).resolve().parent
COREML = "CoreMLExecutionProvider"


def preferred_providers(manifest: dict) -> list:
    """CoreML with the profile's provider options (ModelFormat MLProgram ...), then the CPU."""
    options = (manifest.get("provider_options") or {}).get(COREML) or {"ModelFormat": "MLProgram"}
    return [(COREML, dict(options)), CPU]


def main(argv=None, available=None) -> int:
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    bundle = Path(args.bundle or HERE)
    manifest = load_manifest(bundle)
    model, check = phone_model(args, bundle, manifest)
    if check:
        print(check)
    args.model = model
    return run_main(args, choose_providers(preferred_providers(manifest), available), script_dir=HERE)


if __name__ == "__main__":
    sys.exit(main())
