"""The GPU suite's plan and budgeter (bench/gpu_suite.py, bench/suite_budget.py, bench/suite_targets.py):
the plan fits 480 s in order of value, a step past its time share is skipped and marked, and every
result is on disk as soon as its step ends, so a run killed mid-way keeps what it finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_suite  # noqa: E402
import latency_model  # noqa: E402
import train_memory  # noqa: E402
from suite_budget import Step, plan, run_steps  # noqa: E402
from suite_targets import TARGETS, judge  # noqa: E402


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_plan_fits_480_s_in_order_of_value():
    steps = gpu_suite.steps()
    planned, extras = plan(steps, gpu_suite.BUDGET_S)
    assert sum(s.est_s for s in planned) <= 480
    assert planned + extras == steps  # the order of value is kept, whatever fits
    # the headline target (ViT-L's peak against standard and checkpointed MAE) is measured first
    assert [s.name for s in steps[:3]] == ["vitl_mae_8x512", "vitl_mae_8x512_ckpt", "vitl_bim_stage_ckpt"]
    assert steps[-1].name == "quality_short"  # "if it fits"
    assert len({s.name for s in steps}) == len(steps) and all(s.est_s > 0 and s.source for s in steps)
    # a smaller budget moves the tail to the extras, never a step out of order
    planned, extras = plan(steps, 200)
    assert sum(s.est_s for s in planned) <= 200 and planned == steps[:len(planned)] and extras


def test_a_step_past_its_share_is_skipped_and_each_result_is_on_disk_before_the_next_step(tmp_path):
    seen_on_disk = {}

    def check_disk_then_fail(ctx):
        seen_on_disk["jsonl"] = _lines(tmp_path / "suite.jsonl")
        seen_on_disk["json"] = json.loads((tmp_path / "suite.json").read_text())
        latency_model.load_recorded(tmp_path / "no-such-record.json")  # a bench's real failure: SystemExit

    budget = 120.0
    steps = [
        Step("gemm", "fp32 GEMM rate", 1, "-", lambda ctx: train_memory.gemm_rate("cpu")),
        Step("check", "reads the results, then fails", 1, "-", check_disk_then_fail),
        Step("late", "starts after its latest start", budget, "-", lambda ctx: {"ran": True}),
        Step("missing", "needs a module that is not installed", 1, "-", lambda ctx: {"ran": True},
             needs=("no_such_module_here",)),
        Step("after", "a step that still fits", 1, "-", lambda ctx: {"deadline_s": ctx["deadline_s"]}),
    ]
    record = run_steps(steps, budget, tmp_path, "suite", {"dry": True},
                       report=lambda rec: {"targets": judge(rec)})

    # the finished step was on disk, in both files, before the next step started
    assert [e["name"] for e in seen_on_disk["jsonl"]] == ["gemm"]
    assert seen_on_disk["json"]["steps"]["gemm"]["status"] == "measured"
    assert seen_on_disk["json"]["steps"]["gemm"]["result"]["tflops"] > 0
    status = {n: s["status"] for n, s in record["steps"].items()}
    assert status == {"gemm": "measured", "check": "failed", "late": "skipped", "missing": "skipped",
                      "after": "measured"}
    assert "no-such-record.json" in record["steps"]["check"]["error"]
    assert "past its latest start 0 s" in record["steps"]["late"]["reason"]
    assert "no_such_module_here" in record["steps"]["missing"]["reason"]
    assert 0 < record["steps"]["after"]["result"]["deadline_s"] < budget
    on_disk = json.loads((tmp_path / "suite.json").read_text())
    assert [e["name"] for e in _lines(tmp_path / "suite.jsonl")] == [s.name for s in steps]
    assert {n: s["status"] for n, s in on_disk["steps"].items()} == status
    assert len(on_disk["targets"]) == len(TARGETS)
    assert all(t["verdict"] == "not measured" for t in on_disk["targets"])


def test_a_step_still_running_when_the_budget_ends_is_stopped_and_its_process_killed(tmp_path):
    pid_file = tmp_path / "pid"

    def outlives_the_budget(ctx):  # a bench's subprocess that would run for a minute
        subprocess.run([sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                        "time.sleep(60)"], check=True)

    steps = [Step("long", "runs past the budget", 1, "-", outlives_the_budget),
             Step("next", "would start after the budget", 1, "-", lambda ctx: {"ran": True})]
    record = run_steps(steps, 3.0, tmp_path, "suite", {})
    assert record["steps"]["long"]["status"] == "stopped"
    assert "budget ran out" in record["steps"]["long"]["reason"]
    assert record["steps"]["next"]["status"] == "skipped"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # subprocess.run killed and reaped its child on the way out
        os.kill(pid, 0)


_KILLED_RUN = """
import sys, torch, train_memory
from pathlib import Path
torch.set_num_threads(1)
from suite_budget import Step, run_steps
import gpu_suite
steps = [Step("gemm", "fp32 GEMM rate", 1, "-", lambda ctx: train_memory.gemm_rate("cpu")),
         Step("latency", "the dry run's latency step: long enough to be killed in", 60, "-", gpu_suite._latency)]
out = Path(sys.argv[1])
run_steps(steps, 480, out, "gpu_suite", {"dry": True, "device": "cpu", "out": out, "tmp": out})
"""


def test_a_killed_run_keeps_the_steps_it_finished(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = tmp_path / "gpu_suite.jsonl"
    t0 = time.monotonic()
    try:
        while not (lines.is_file() and lines.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() - t0 < 90, "the first step did not finish"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    record = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(record["steps"]) == ["gemm"] and record["steps"]["gemm"]["status"] == "measured"
    assert [e["name"] for e in _lines(lines)] == ["gemm"]
    assert not list(tmp_path.glob("*.tmp"))  # the JSON is replaced whole, never half-written


def _variant(peak, ms, tflop=10.0, rate=800.0):
    return {"peak_gib": peak, "ms_per_step": ms, "tflop_per_step": tflop, "matmul_tflops": rate, "size": {}}


def test_targets_are_judged_on_what_was_measured():
    # the recorded H100 figures for ViT-L, with update: stage + checkpointing at its projection
    steps = {"vitl_mae_8x512": _variant(23.64, 143.6), "vitl_mae_8x512_ckpt": _variant(7.78, 178.9),
             "vitl_bim_stage_ckpt": _variant(5.06, 131.7, tflop=40.0),
             "cli_throughput": {"cli_share": {"cpu": 0.95, "gpu": 0.5}}}
    record = {"steps": {n: {"status": "measured", "result": r} for n, r in steps.items()}}
    record["steps"]["stage_times"] = {"status": "skipped"}
    got = {t["key"]: t for t in judge(record)}
    assert got["vitl_stage_ckpt_peak"]["figure"] == pytest.approx(5.06 / 23.64)
    assert got["vitl_stage_ckpt_peak"]["verdict"] == "met"
    assert got["vitl_stage_ckpt_time_vs_ckpt"]["figure"] == pytest.approx(131.7 / 178.9)
    assert got["vitl_mfu"]["figure"] == pytest.approx(40.0 / 0.1317 / 800)
    assert got["vitl_mfu"]["verdict"] == "met" and got["vitl_mfu"]["what"].endswith("bim_stage_ckpt")
    assert got["cli_cpu"]["verdict"] == "met"
    assert got["cli_gpu"]["verdict"] == "missed by 0.4"
    assert got["stage4_vitb"]["verdict"] == "not measured"  # skipped, not missed
    assert got["vitb_stage_peak"]["verdict"] == "not measured"


def test_jpegs_are_generated_where_the_wheels_photos_are_missing(tmp_path, monkeypatch):
    import train_throughput
    from PIL import Image

    monkeypatch.setitem(sys.modules, "skimage", None)  # a bare GPU image: no scikit-image
    photos, source = train_throughput.photos()
    assert source.startswith("generated") and len(photos) == 8
    folder = train_throughput.make_jpegs(tmp_path / "jpegs", 12)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 12 and len({f.parent for f in files}) == 10
    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.mode == "RGB"
