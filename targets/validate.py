"""Re-check this bundle on the device: every file's sha256, parity against reference.npz, latency.

Usage, from the bundle folder:

    python validate.py [BUNDLE_DIR] [--check-latency]

Needs only onnxruntime and numpy. The checks are the bundle's ``runtime/`` package, the same code
as ``bim-export validate``; the figures are appended to manifest.json's ``device_validations``.
"""

from __future__ import annotations

import sys

from runtime.validate import main

if __name__ == "__main__":
    sys.exit(main())
