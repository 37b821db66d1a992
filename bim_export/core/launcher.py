"""What a worker tells torchrun when it stops: torchrun's failure report shows each worker's error
file (``TORCHELASTIC_ERROR_FILE``), also where the workers' output goes to log files (``--redirects``,
``--log-dir``). Outside torchrun these do nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def tell_launcher(line: str) -> None:
    """Under torchrun, writes ``line`` to this worker's error file, in torch's format (``message`` and
    ``timestamp``), so the one-line cause reaches the user in torchrun's report."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass  # the line is on stderr already


def record_for_launcher(error: BaseException) -> None:
    """Under torchrun, records an unexpected exception with torch's own handler (its traceback then
    shows in torchrun's report)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(error)
