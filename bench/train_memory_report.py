"""The training-memory bench's report: ratios against standard and checkpointed MAE, MFU, the cost
of every exit in one run against separate runs, the targets, and the Markdown table."""

from __future__ import annotations


def summarize(results: dict[str, dict], device: str) -> dict:
    """Ratios against standard MAE (and checkpointed MAE), MFU, the cost of every exit in one run
    against separate runs, and the targets (they refer to a GPU at batch 256)."""
    key = "peak_gib" if device == "cuda" else "peak_above_base_mib"
    std, ck = results.get("mae_8x512", {}), results.get("mae_8x512_ckpt", {})
    ok = {n: r for n, r in results.items() if key in r}
    for r in ok.values():
        r["mfu"] = r["tflop_per_step"] / (r["ms_per_step"] / 1000) / r["matmul_tflops"]
        if key in std:
            r["peak_x"], r["time_x"] = r[key] / std[key], r["ms_per_step"] / std["ms_per_step"]
        if key in ck:
            r["peak_x_ckpt"], r["time_x_ckpt"] = r[key] / ck[key], r["ms_per_step"] / ck["ms_per_step"]
    rates = [r["matmul_tflops"] for r in ok.values()]
    out = {"peak_key": key, "matmul_tflops": [min(rates), max(rates)] if rates else None}
    bim = [n for n in ok if n.startswith("bim")]
    out["target_peak_022_time_070"] = [n for n in bim if ok[n].get("peak_x", 9) <= 0.22 and ok[n].get("time_x", 9) <= 0.70]
    out["target_peak_022_below_ckpt_time_080_ckpt"] = [
        n for n in bim if ok[n].get("peak_x", 9) <= 0.22 and ok[n].get("peak_x_ckpt", 9) < 1
        and ok[n].get("time_x_ckpt", 9) <= 0.80]
    out["target_mfu_035"] = [n for n in ok if ok[n]["mfu"] >= 0.35]
    seps = [n for n in results if n.startswith("sep_8x512_d")]
    if seps and all(n in ok for n in [*seps, *(s.replace("8x512", "1x128") for s in seps), "mae_1x128", "bim_1x128"]):
        sep_std = sum(ok[n]["ms_per_step"] for n in seps) + std["ms_per_step"]
        sep_light = sum(ok[n.replace("8x512", "1x128")]["ms_per_step"] for n in seps) + ok["mae_1x128"]["ms_per_step"]
        b = ok["bim_1x128"]["ms_per_step"]
        out.update(separate_standard_ms=sep_std, separate_light_ms=sep_light, bim_ms=b,
                   all_exits_vs_separate_standard=sep_std / b, all_exits_vs_separate_light=sep_light / b)
    return out


def markdown(report: dict) -> str:
    m, res, s, size_ = report["machine"], report["variants"], report["summary"], report["size"]
    cuda = report["device"] == "cuda"
    unit = "GiB" if cuda else "MiB above base"
    where = ((f"{m['gpu']}, " if cuda else "") + f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX2'}), "
             f"{m['cores']} cores ({m['threads']} threads), torch {m['torch']}")
    model = f"{size_['arch']} {size_['model_args'] or ''}".strip()
    div = size_.get("decoder_div", 1)
    rate = "bf16" if cuda else "fp32"
    lines = [f"Training memory, step time and MFU ({report['mode']}; {model}, batch {size_['batch']}, "
             f"{size_['amp'] or 'fp32'}, AdamW; {where}; {m['date']}). ms/step: "
             + ("median of the timed steps" if cuda else "lowest of the timed steps (shared host)")
             + f". MFU: model FLOPs per second over the {rate} matmul rate measured in the variant's process "
             f"right after its steps ({_rates(s)} TFLOP/s)."
             + (f" Decoder widths divided by {div} (quick check, not figures to quote)." if div > 1 else ""), "",
             f"| variant | update | peak {unit} | x standard | x ckpt MAE | ms/step | x standard | x ckpt MAE | "
             f"TFLOP/step | MFU ({rate}) |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = (lambda v: f"{v:.2f}") if cuda else (lambda v: f"{v:.0f}")
    x = lambda r, k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
    for name, label in report["labels"].items():
        r = res[name]
        if name.startswith("sep_"):
            continue
        if s["peak_key"] not in r:
            lines.append(f"| {label} | - | {r.get('error', 'failed')} | | | | | | | |")
            continue
        lines.append(f"| {label} | {r['update']} | {fmt(r[s['peak_key']])} | {x(r, 'peak_x')} | {x(r, 'peak_x_ckpt')} | "
                     f"{r['ms_per_step']:.1f} | {x(r, 'time_x')} | {x(r, 'time_x_ckpt')} | "
                     f"{r['tflop_per_step']:.3g} | {100 * r['mfu']:.1f} % |")
    if "separate_standard_ms" in s:
        std_ms = res["mae_8x512"]["ms_per_step"]
        for key, dec in (("separate_standard_ms", "8x512"), ("separate_light_ms", "1x128")):
            lines.append(f"| four separate MAE runs, one per exit depth, {dec} | | - | - | | {s[key]:.1f} (sum) | "
                         f"{s[key] / std_ms:.2f} | | | |")
        lines += ["", f"All four exits in one BIM run (1x128) cost {s['all_exits_vs_separate_standard']:.2f}x less "
                  f"time per step than four separate standard MAE runs, {s['all_exits_vs_separate_light']:.2f}x less "
                  f"than four separate runs with the same light decoder."]
    if not cuda and "mae_8x512" in res and "peak_rss_mib" in res["mae_8x512"]:
        lines.append(f"CPU peak = peak resident set (VmHWM) minus the process's footprint before the model was "
                     f"built (standard MAE: {res['mae_8x512']['peak_rss_mib']:.0f} MiB resident in all).")
    names = lambda key: "; ".join(report["labels"][n] for n in s[key]) or "none"  # noqa: E731
    if cuda:
        lines += ["", "Targets (GPU, batch 256):",
                  f"- peak <= 0.22x and step <= 0.70x standard MAE: {names('target_peak_022_time_070')}",
                  f"- peak <= 0.22x, below checkpointed MAE, step <= 0.80x checkpointed MAE: "
                  f"{names('target_peak_022_below_ckpt_time_080_ckpt')}",
                  f"- MFU >= 35 %: {names('target_mfu_035')}"]
    else:
        lines += ["", "The memory and MFU targets are set for a GPU at batch 256 and are not judged on these "
                  "figures: at a small batch, weights, gradients and AdamW state weigh far more than there."]
    r = report.get("real_images")
    if r:
        lines += ["", f"BIM on real images ({r['images']}, {r['steps']} steps): loss per stage, first -> last "
                  f"tenth of the steps: " + ", ".join(
            f"exit {d}: {r['first'][d]:.3f} -> {r['last'][d]:.3f}" for d in r["first"]) + "."]
    return "\n".join(lines) + "\n"


def _rates(s: dict) -> str:
    lo, hi = s["matmul_tflops"] or (float("nan"),) * 2
    return f"{lo:.3g}" if abs(hi - lo) < 0.005 * hi else f"{lo:.3g}-{hi:.3g}"
