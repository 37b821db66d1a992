"""The latency-model bench's report: the errors against their targets, the overlap check and the
table of every row, in Markdown."""

from __future__ import annotations

import json

from bim_export.runtime.machine import machine_description


def _fmt(s: dict) -> str:
    return f"median {s['median_error']:.1%}, worst {s['worst_error']:.1%} (n={s['n']})"


def markdown(res: dict) -> str:
    summary_ = res.get("leave_one_out") or res.get("held_out")
    load = res.get("load_average") or (res.get("recorded") or {}).get("load_average")
    lines = [f"# Latency model: {res['mode']}{' (quick)' if res['quick'] else ''}", "",
             f"Machine: {json.dumps(res['machine'])}"
             + (f"; load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after the run." if load else "."),
             ""]
    if res.get("recorded"):
        lines += [f"Timings from the recorded run `{res['recorded']['file']}`, analysed again here (graphs exported "
                  f"and costed on {json.dumps(machine_description())}).", ""]
    if res["mode"] == "host":
        hw = res["hardware_measured"]
        lines += [f"Measured: fp32 GEMM {hw['peak_gflops']['fp32']:.1f} GFLOP/s, int8 {hw['peak_gflops']['int8']:.1f} "
                  f"GOP/s, bandwidth {hw['mem_bandwidth_gbs']:.1f} GB/s. Leave-one-depth-out over {summary_['n']} "
                  f"predictions at {res['img_size']} px.", ""]
    else:
        lines += [f"Card: {res['card']}; timing: {res['timing']}; profile figures: {res['profile']}. "
                  f"Calibrated on ViT-S depths 3 and 12, batches {res['batches']}; every other row predicted.", ""]
    if res["mode"] == "torch-cpu":
        lines += ["Dry run: torch timings on this CPU against a GPU profile's figures. It exercises the GPU "
                  "code paths; its errors mean nothing.", ""]
    if res.get("clock") == "thread_cpu":
        lines += ["Clock: CPU time of the one timing thread (cross-check; not the wall-clock protocol).", ""]
    lines += ["Round spread: (slowest - fastest round median) / fastest; large values mean a busy machine.", "",
              f"**median error {summary_['median_error']:.1%}, worst {summary_['worst_error']:.1%}** "
              f"(targets: {', '.join(f'{k} <= {v:.0%}' for k, v in res['targets'].items())})", ""]
    if "leave_one_depth_out" in res:
        lines += [f"- leave one depth out: {_fmt(res['leave_one_depth_out'])}"]
    unc = res["uncalibrated"]
    lines += [f"- uncalibrated, each (width, batch) group predicted from factors fitted on the others: "
              f"{_fmt(unc['leave_one_width_batch_out'])}"]
    if "shipped_defaults" in unc:
        lines += [f"- the shipped defaults on these rows: {_fmt(unc['shipped_defaults'])}"]
    if "prior" in unc:
        lines += [f"- the factors fixed before any GPU run (prior), on these rows: {_fmt(unc['prior'])}"]
    if unc.get("h200_published"):
        h = unc["h200_published"]
        pairs = ", ".join(f"{k}: {h['measured_ms'][k]:.2f} ms measured, {h['predicted_ms'][k]:.2f} predicted"
                          for k in h["measured_ms"])
        lines += [f"- published H200 figures from the factors fitted on all rows here: {pairs}"]
    if "defaults_fit" in res:
        fit = res["defaults_fit"]
        lines += [f"- factors fitted on all rows (the gpu defaults): in-sample {_fmt(fit['in_sample'])}; per-node "
                  f"overhead {fit['factors']['node_overhead_us']:.2f} us = {fit['node_overhead_ratio'] or 0:.3f} x "
                  f"the profile's launch figure, fixed {fit['factors']['fixed_overhead_us']:.1f} us"]
    lines += ["", "Overlap check (how launches and device work add up):", "",
              "| overlap | " + " | ".join(next(iter(res["overlap_check"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(res["overlap_check"].values())))]
    for overlap, row in res["overlap_check"].items():
        lines.append(f"| {overlap} | " + " | ".join(f"{s['median_error']:.1%} / {s['worst_error']:.1%}"
                                                      for s in row.values()) + " |")
    lines += ["", "| width | depth | batch | measured ms | predicted ms | error | round spread | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        note = "calibration point" if r.get("calibration_point") else (
            f"roofline fraction {r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "")
        lines.append(f"| {r['width']} | {r['depth']} | {r['batch']} | {r['measured_ms']:.3f} | {r['predicted_ms']:.3f} "
                     f"| {r['error']:.1%} | {r['spread']:.0%} | {note} |")
    return "\n".join(lines) + "\n"
