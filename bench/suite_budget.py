"""A time-budgeted sequence of benchmark steps: run in order of value, each result written as soon as
it is measured, and whatever would start past its time share skipped and marked.

A step's share is its estimated seconds: it may start only while ``elapsed + estimate <= budget``
(its latest start is ``budget - estimate``), and one still running when the budget ends is stopped.
A step that ran over its estimate thus takes time from the steps after it, which are worth less; a
skipped step leaves its time to the next ones. The plan is the steps that fit the budget one after
the other, in order of value; steps past it are kept as extras, run only where the planned ones
left them the time.

Results: ``STEM.jsonl`` gets one line per step as it ends (measured, failed, stopped or skipped), and
``STEM.json`` is rewritten (atomically) after every step with everything so far, so a run killed
mid-way keeps every step it finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Step:
    """One measurement of the suite."""

    name: str
    what: str  # one line: what it measures
    est_s: float  # estimated seconds on the target machine
    source: str  # where the estimate comes from
    run: Callable[[dict], dict] = field(repr=False)  # context -> figures
    needs: tuple[str, ...] = ()  # modules it imports beyond torch: a step whose modules are missing is skipped


def plan(steps: list[Step], budget_s: float) -> tuple[list[Step], list[Step]]:
    """(planned, extras): the steps, in the given order of value, whose estimates fit the budget one
    after the other; the others, run only if the planned ones leave them the time."""
    planned, extras, total = [], [], 0.0
    for s in steps:
        if not extras and total + s.est_s <= budget_s:
            planned.append(s)
            total += s.est_s
        else:
            extras.append(s)
    return planned, extras


def plan_table(planned: list[Step], extras: list[Step], budget_s: float) -> str:
    rows = ["| # | step | estimated s | latest start s | measures | estimate from |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(planned + extras, 1):
        tag = "" if s in planned else " (extra: if time is left)"
        rows.append(f"| {i} | {s.name}{tag} | {s.est_s:.0f} | {budget_s - s.est_s:.0f} | {s.what} | {s.source} |")
    total = sum(s.est_s for s in planned)
    rows += ["", f"Planned: {total:.0f} s of {budget_s:.0f} s"
             + (f"; extras: {sum(s.est_s for s in extras):.0f} s more." if extras else ".")]
    return "\n".join(rows) + "\n"


class OutOfTime(Exception):
    """The budget ran out while a step was running."""


@contextlib.contextmanager
def _stop_at(seconds: float):
    """Raises :class:`OutOfTime` in the running step after ``seconds`` (SIGALRM, main thread, POSIX),
    so that the suite ends within its budget: a step's subprocess (``subprocess.run``) is killed on
    the way out. Python code is interrupted between bytecodes, so a long native call ends first."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise OutOfTime()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _missing(modules: tuple[str, ...]) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _report(report: Callable[[dict], dict] | None, record: dict) -> dict:
    if report is None:
        return {}
    try:
        return report(record)
    except Exception as e:  # the measurements must reach the disk even if judging them fails
        return {"report_error": f"{type(e).__name__}: {e}"}


def run_steps(steps: list[Step], budget_s: float, out: Path, stem: str, ctx: dict,
              report: Callable[[dict], dict] | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Runs ``steps`` in order under ``budget_s`` and returns the record of every step.

    ``budget_s`` is in the seconds of the steps' estimates: a dry run on another machine, whose
    seconds are not those, passes a larger one.

    ``ctx`` goes to each step, with ``deadline_s`` (seconds left in the budget when it starts) added;
    a step still running when the budget ends is stopped and marked.
    After each step, ``STEM.jsonl`` gets its line and ``STEM.json`` the whole record, with
    ``report(record)`` merged in (the targets judged on what is measured so far). A step's failure
    (an exception, or a bench's SystemExit) is recorded and the run goes on; an interrupt (Ctrl-C,
    a kill) ends it, and the files keep the steps finished before it.
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = out / f"{stem}.jsonl"
    lines.write_text("")
    planned, extras = plan(steps, budget_s)
    record = {"budget_s": budget_s, "plan": [{"name": s.name, "est_s": s.est_s, "planned": s in planned,
                                              "latest_start_s": budget_s - s.est_s} for s in steps],
              "steps": {}}
    t0 = clock()
    for s in steps:
        start = clock() - t0
        entry = {"name": s.name, "est_s": s.est_s, "start_s": round(start, 1)}
        missing = _missing(s.needs)
        if start + s.est_s > budget_s:
            entry.update(status="skipped", reason=f"would start at {start:.0f} s, past its latest start "
                                                  f"{budget_s - s.est_s:.0f} s (budget {budget_s:.0f} s)")
        elif missing:
            entry.update(status="skipped", reason=f"needs {', '.join(missing)}, not installed here")
        else:
            print(f"== {s.name} (estimated {s.est_s:.0f} s, {start:.0f} s elapsed): {s.what}", flush=True)
            try:
                with _stop_at(budget_s - start):
                    entry.update(status="measured", result=s.run({**ctx, "deadline_s": budget_s - start}))
            except OutOfTime:
                entry.update(status="stopped", reason=f"the budget ran out after {clock() - t0 - start:.0f} s of "
                                                      f"the step (estimated {s.est_s:.0f} s)")
            except (Exception, SystemExit) as e:  # one step's failure must not lose the others
                msg = str(e).strip().splitlines()
                entry.update(status="failed", error=f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300],
                             traceback=traceback.format_exc()[-3000:])
        entry["wall_s"] = round(clock() - t0 - start, 1)
        if entry["status"] != "measured":
            print(f"== {s.name}: {entry['status']}: {entry.get('reason') or entry.get('error')}", flush=True)
        record["steps"][s.name] = entry
        record["elapsed_s"] = round(clock() - t0, 1)
        with open(lines, "a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        _write_json(out / f"{stem}.json", {**record, **_report(report, record)})
    return record
