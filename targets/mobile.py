"""Check a bim-export bundle for an Android phone: the app's model.ort, then a run on images.

Usage, from the bundle folder (on a workstation, or on the phone under Termux):

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5]

Runs the bundle's ``model.ort`` (ONNX Runtime's mobile format, which onnxruntime-android loads; made
from model.onnx here for bundles that have none), after checking that it computes what model.onnx
computes on the bundle's reference inputs. Execution providers: NNAPI, then XNNPACK, where this
onnxruntime build has them (Android builds), else the CPU provider.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import CPU, build_parser, choose_providers, load_manifest, phone_model, run_main

HERE = Path(__file__).resolve().parent
# NNAPI first: the first provider picks its nodes first, and XNNPACK would split NNAPI's partition.
PREFERRED = ["NnapiExecutionProvider", ("XnnpackExecutionProvider", {}), CPU]


def main(argv=None, available=None) -> int:
    args = build_parser(__doc__.splitlines()[0]).parse_args(argv)
    bundle = Path(args.bundle or HERE)
    model, check = phone_model(args, bundle, load_manifest(bundle))
    if check:
        print(check)
    args.model = model
    return run_main(args, choose_providers(PREFERRED, available), script_dir=HERE)


if __name__ == "__main__":
    sys.exit(main())
