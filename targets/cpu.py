"""Embed images with a bim-export bundle on a CPU (onnxruntime's CPU execution provider).

Usage, from the bundle folder:

    python infer.py IMAGE_OR_FOLDER [...] [--gallery FOLDER --top-k 5] [--threads N]

Needs only onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import sys

from common import CPU, script_main

PREFERRED = [CPU]


def main(argv=None) -> int:
    return script_main(__doc__.splitlines()[0], PREFERRED, argv, script_file=__file__)


if __name__ == "__main__":
    sys.exit(main())
