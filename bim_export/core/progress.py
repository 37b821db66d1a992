"""Progress of a long job: stages, each with a count of its steps, told to whoever asked.

The library reports through the :class:`Progress` it is given and prints nothing; the default
drops every report. The command line gives a :class:`ConsoleProgress`: a tqdm bar per stage where
stderr is a terminal, else one plain line per step (CI logs and pipes read them as they come)::

    [3/12] export depth 6 fp32 (jetson-orin-nano)

Both write to stderr, so stdout holds only the result. :func:`console_logging` sets up the log
records to go the same way (through the bar, not across it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator, TextIO


class Progress:
    """Receives a job's progress. This base drops it: a library call with no reporter is silent."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int, scope: str = "") -> Iterator[Stage]:
        """A stage of ``total`` steps (``scope``: what it is for, e.g. a profile's name)."""
        st = Stage(self, name, total, scope)
        self.begin(st)
        try:
            yield st
        finally:
            self.end(st)

    def begin(self, stage: Stage) -> None:
        """A stage starts."""

    def step(self, stage: Stage, what: str, item: str) -> None:
        """Step ``stage.done`` of ``stage.total`` starts: ``what`` is done to ``item``."""

    def end(self, stage: Stage) -> None:
        """A stage is over (finished or left by an exception)."""


class Stage:
    """One counted stage; :meth:`step` announces its next step before the work of it starts."""

    def __init__(self, progress: Progress, name: str, total: int, scope: str):
        self.progress, self.name, self.total, self.scope = progress, name, total, scope
        self.done = 0  # steps started, the one under way included

    def step(self, item: str, what: str | None = None) -> None:
        """The next step starts; ``what`` names its work where it differs from the stage's name."""
        self.done += 1
        self.progress.step(self, what or self.name, item)


SILENT = Progress()


class ConsoleProgress(Progress):
    """Progress for a person: a tqdm bar per stage on a terminal, one plain line per step elsewhere.

    Args:
        stream: where it goes (the command line passes stderr).
        bar: draw bars; None: when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _is_terminal(self.stream) if bar is None else bar
        self._bars: dict[int, object] = {}

    def begin(self, stage: Stage) -> None:
        if not self.bar or not stage.total:  # a stage with nothing to do draws nothing
            return
        from tqdm import tqdm

        desc = f"{stage.scope}: {stage.name}" if stage.scope else stage.name
        self._bars[id(stage)] = tqdm(total=stage.total, desc=desc, file=self.stream, leave=False,
                                     dynamic_ncols=True, unit="step")

    def step(self, stage: Stage, what: str, item: str) -> None:
        bar = self._bars.get(id(stage))
        if bar is None:
            print(line(stage, what, item), file=self.stream, flush=True)
            return
        bar.n = stage.done - 1  # steps finished; the postfix names the one under way
        bar.set_postfix_str(f"{what} {item}" if what != stage.name else item, refresh=True)

    def end(self, stage: Stage) -> None:
        bar = self._bars.pop(id(stage), None)
        if bar is not None:
            bar.n = stage.done
            bar.close()

    def write(self, text: str) -> None:
        """A line that must not break a bar (log records go through here)."""
        if self._bars:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    """A terminal a bar can be drawn on (a pseudo-terminal of 0 columns, as some CI runners give, is not)."""
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):  # not backed by a file descriptor: take isatty's word
        return True


def line(stage: Stage, what: str, item: str) -> str:
    """A step as one plain line: ``[3/12] export depth 6 fp32 (jetson-orin-nano)``."""
    width = len(str(stage.total))
    scope = f" ({stage.scope})" if stage.scope else ""
    return f"[{stage.done:>{width}}/{stage.total}] {what} {item}{scope}"


class _ProgressHandler(logging.Handler):
    """Log records written through a :class:`ConsoleProgress`, so they land between its bars."""

    def __init__(self, progress: ConsoleProgress, named: bool):
        super().__init__()
        self.progress, self.named = progress, named

    def format(self, record: logging.LogRecord) -> str:
        # ``warning: ...`` as the command line's ``error: ...`` lines read; with -v, the logger's name
        head = f"{record.levelname} {record.name}" if self.named else record.levelname.lower()
        text = f"{head}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        return text

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging's contract: a failed record never ends the program
            self.handleError(record)


@contextlib.contextmanager
def console_logging(verbosity: int, progress: ConsoleProgress) -> Iterator[None]:
    """Log records to stderr, through ``progress``, at the command line's verbosity, while in the block
    (after it, logging is as it was: the command line can be called in-process, e.g. by tests).

    - 0: bim-export's warnings (``warning: ...``) and the libraries' errors;
    - 1 (``-v``): bim-export's own records from DEBUG up, with the logger's name; the libraries' errors;
    - 2 (``-vv``): every library's records from DEBUG up too (torch, onnx, onnx_ir, onnxscript,
      onnxruntime, ...).

    Python warnings go to the log (``py.warnings``), so a library's warning shows from ``-vv`` only:
    at the default level the user can do nothing about them and they would break the progress.
    """
    root, own, py = logging.getLogger(), logging.getLogger("bim_export"), logging.getLogger("py.warnings")
    saved = root.level, own.level, py.level
    handler = _ProgressHandler(progress, named=verbosity > 0)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    own.setLevel(logging.DEBUG if verbosity >= 1 else logging.WARNING)
    py.setLevel(logging.NOTSET if verbosity >= 2 else logging.CRITICAL)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for logger, level in zip((root, own, py), saved):
            logger.setLevel(level)
