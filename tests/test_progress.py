"""Progress and log output of the command line: plain counted lines off a terminal, a bar on one, and
the log at each verbosity (bim-export's own records from -v, the libraries' from -vv only)."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from bim_export.core.progress import SILENT, ConsoleProgress, console_logging


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_stages(progress) -> None:
    with progress.stage("candidates", 2, "jetson-orin-nano") as st:
        st.step("depth 3 fp32", "export")
        st.step("depth 3 fp16", "convert")
    with progress.stage("parity", 0, "jetson-orin-nano"):  # nothing to do: no line, no bar
        pass


def test_plain_lines_off_a_terminal_one_per_step_with_counts():
    out = io.StringIO()
    _run_stages(ConsoleProgress(out))
    assert out.getvalue().splitlines() == ["[1/2] export depth 3 fp32 (jetson-orin-nano)",
                                           "[2/2] convert depth 3 fp16 (jetson-orin-nano)"]


def test_a_bar_on_a_terminal_and_no_plain_lines():
    out = _Terminal()
    _run_stages(ConsoleProgress(out))
    text = out.getvalue()
    assert "jetson-orin-nano: candidates" in text and "\r" in text  # tqdm redraws in place
    assert "[1/2]" not in text


def test_the_default_reporter_is_silent(capsys):
    _run_stages(SILENT)
    assert capsys.readouterr() == ("", "")


def _emit_everything() -> None:
    logging.getLogger("bim_export.deploy.candidates").info("exporting exits [2, 4] in one graph")
    logging.getLogger("bim_export.deploy.candidates").warning("host: latency measured on a busy machine")
    logging.getLogger("onnx_ir.passes").debug("pass 3 of 41")
    logging.getLogger("onnxscript.rewriter").warning("an onnxscript warning about its internals")
    warnings.warn("a library's python warning", UserWarning, stacklevel=1)


@pytest.mark.parametrize("verbosity, shown, hidden", [
    (0, ["warning: host: latency measured on a busy machine"],
     ["exporting exits", "onnx_ir", "onnxscript", "python warning"]),
    (1, ["INFO bim_export.deploy.candidates: exporting exits [2, 4] in one graph",
         "WARNING bim_export.deploy.candidates: host: latency measured"],
     ["onnx_ir", "onnxscript", "python warning"]),
    (2, ["INFO bim_export.deploy.candidates: exporting exits", "DEBUG onnx_ir.passes: pass 3 of 41",
         "WARNING onnxscript.rewriter: an onnxscript warning", "a library's python warning"], []),
])
def test_log_at_each_verbosity(verbosity, shown, hidden):
    out = io.StringIO()
    root = logging.getLogger()
    before = (root.level, len(root.handlers), logging.getLogger("bim_export").level)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with console_logging(verbosity, ConsoleProgress(out)):
            _emit_everything()
    text = out.getvalue()
    for s in shown:
        assert s in text
    for s in hidden:
        assert s not in text
    assert (root.level, len(root.handlers), logging.getLogger("bim_export").level) == before  # restored


def test_log_records_go_through_the_bar_on_a_terminal():
    out = _Terminal()
    progress = ConsoleProgress(out)
    with console_logging(0, progress):
        with progress.stage("parity", 3, "host") as st:
            st.step("depth 3 fp32")
            logging.getLogger("bim_export.deploy.candidates").warning("busy machine")
    assert "warning: busy machine\n" in out.getvalue()
