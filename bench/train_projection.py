"""Projected H100 figures for per-stage updates: figures measured before them, plus arithmetic.

THIS IS A PROJECTION, NOT A MEASUREMENT. The starting figures were measured on an NVIDIA H100 80GB
(torch 2.11, ``bench/train_memory.py --device cuda`` and ``BimModel.forward_backward`` for ViT-L;
ViT at 224 px, batch 256, bf16, one torch AdamW over the whole model, ``update: step``). What
``update: stage`` removes is pure arithmetic: a stage's gradients are freed once it is stepped, so
while stage k runs, the gradients of every other stage are gone. The largest saving at the peak is
the fp32 gradients of all stages but the largest one: ``4 bytes x (P - max_k P_k)``, with the
parameter counts ``P_k`` of each stage taken from the real model (built on the meta device).

Where a figure was not measured (ViT-B with activation checkpointing), it is estimated from ViT-L's
measured checkpointing figures, scaled: memory by one stage's activations (blocks per stage x width;
same tokens and batch), time by the forward FLOPs that are recomputed. Such rows say "estimate".

Not projected: fused AdamW (no multi-tensor temporaries, fewer kernels), ``compile`` and the new
stepper's effect on time; ``bench/gpu_train.py`` measures all of them.

Usage: ``python bench/train_projection.py`` writes bench/results/train_memory_projection_h100.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_memory import ARCHS, LIGHT, STANDARD, RESULTS, model_flops  # noqa: E402

H100_TFLOPS = 800.0  # the card's measured dense bf16 matmul rate, about 800 TFLOP/s
SOURCE = ("measured on an NVIDIA H100 80GB HBM3 (torch 2.11) before per-stage updates: ViT at 224 px, "
          "batch 256, bf16, one torch AdamW, update: step")
# (peak GiB, ms per step or None) as measured
MEASURED = {
    "vit_base_patch16_224": {"mae": (14.10, 90.4), "mae_ckpt": (4.39, 109.1), "bim": (3.75, 57.3)},
    "vit_large_patch16_224": {"mae": (23.64, 143.6), "mae_ckpt": (7.78, 178.9), "bim": (8.57, 111.9),
                              "bim_ckpt": (5.91, 131.7), "bim8": (7.34, None), "bim12": (6.95, None)},
}


def _spec(arch: str, mode: str, exits: list[int] | None, decoder) -> dict:
    return dict(arch=arch, model_args=ARCHS[arch][3], exits=exits, depth=None, mode=mode, decoder=decoder,
                batch=256)


def _stage_grad_saving_gib(arch: str, exits: list[int] | None) -> float:
    params = model_flops(_spec(arch, "bim", exits, LIGHT))["stage_params_m"]
    return 4 * (sum(params) - max(params)) * 1e6 / 2**30


def _fwd_tflop(arch: str) -> float:
    # a training step's FLOPs are forward + backward (about 2x forward): forward is a third
    return model_flops(_spec(arch, "bim", None, LIGHT))["tflop_per_step"] / 3


def project() -> dict:
    rows = []
    flops = {a: {m: model_flops(_spec(a, m, None, STANDARD if m == "e2e" else LIGHT))["tflop_per_step"]
                 for m in ("e2e", "bim")} for a in MEASURED}

    def row(arch, name, peak, ms, how, mode="bim"):
        mae_peak, mae_ms = MEASURED[arch]["mae"]
        ck_peak, ck_ms = MEASURED[arch]["mae_ckpt"]
        r = {"arch": arch, "variant": name, "peak_gib": peak, "ms": ms, "how": how,
             "peak_x": peak / mae_peak, "peak_x_ckpt": peak / ck_peak}
        if ms is not None:
            r.update(time_x=ms / mae_ms, time_x_ckpt=ms / ck_ms,
                     mfu=flops[arch][mode] / (ms / 1000) / H100_TFLOPS)
        rows.append(r)

    for arch, m in MEASURED.items():
        row(arch, "MAE, decoder 8x512 (standard)", *m["mae"], "measured", "e2e")
        row(arch, "MAE + activation checkpointing", *m["mae_ckpt"], "measured", "e2e")
        row(arch, "BIM 4 stages, 1x128, update: step", *m["bim"], "measured")
        save = _stage_grad_saving_gib(arch, None)
        row(arch, "BIM 4 stages, update: stage", m["bim"][0] - save, m["bim"][1],
            f"projected: measured update: step - {save:.2f} GiB of gradients")
        if "bim_ckpt" in m:
            row(arch, "BIM 4 stages + checkpointing, update: step", *m["bim_ckpt"], "measured")
            row(arch, "BIM 4 stages, update: stage + checkpointing", m["bim_ckpt"][0] - save, m["bim_ckpt"][1],
                f"projected: measured checkpointing - {save:.2f} GiB of gradients")
        if "bim8" in m:
            save8 = _stage_grad_saving_gib(arch, ARCHS[arch][2])
            row(arch, "BIM 8 stages, update: step", *m["bim8"], "measured")
            row(arch, "BIM 8 stages, update: stage", m["bim8"][0] - save8, None,
                f"projected: measured update: step - {save8:.2f} GiB of gradients")
    # ViT-B with checkpointing was not measured: scale ViT-L's
    b, lg = "vit_base_patch16_224", "vit_large_patch16_224"
    ck_saved = MEASURED[lg]["bim"][0] - MEASURED[lg]["bim_ckpt"][0]
    act = (3 * 768) / (6 * 1024)  # blocks per stage x width, ViT-B over ViT-L
    ms_per_fwd_tflop = (MEASURED[lg]["bim_ckpt"][1] - MEASURED[lg]["bim"][1]) / _fwd_tflop(lg)
    peak = MEASURED[b]["bim"][0] - _stage_grad_saving_gib(b, None) - act * ck_saved
    ms = MEASURED[b]["bim"][1] + ms_per_fwd_tflop * _fwd_tflop(b)
    row(b, "BIM 4 stages, update: stage + checkpointing", peak, ms,
        f"estimate: update: stage - {act:.3f} x ViT-L's checkpointing saving ({ck_saved:.2f} GiB); "
        f"+ recompute at ViT-L's {ms_per_fwd_tflop:.2f} ms per forward TFLOP")
    rows.sort(key=lambda r: list(MEASURED).index(r["arch"]))  # stable: each model's rows together
    return {"source": SOURCE, "matmul_tflops": H100_TFLOPS, "rows": rows}


def markdown(p: dict) -> str:
    lines = [f"**Projection, not a measurement.** Starting figures {p['source']}; the rest is arithmetic "
             f"(see bench/train_projection.py). MFU against {p['matmul_tflops']:.0f} TFLOP/s.", "",
             "| model | variant | peak GiB | x standard | x ckpt MAE | ms/step | x standard | x ckpt MAE | MFU | how |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    short = {"vit_base_patch16_224": "ViT-B/16", "vit_large_patch16_224": "ViT-L/16"}
    for r in p["rows"]:
        t = (f"{r['ms']:.1f} | {r['time_x']:.2f} | {r['time_x_ckpt']:.2f} | {100 * r['mfu']:.0f} %"
             if r["ms"] is not None else "- | - | - | -")
        lines.append(f"| {short[r['arch']]} | {r['variant']} | {r['peak_gib']:.2f} | {r['peak_x']:.3f} | "
                     f"{r['peak_x_ckpt']:.2f} | {t} | {r['how']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = project()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_memory_projection_h100.json").write_text(json.dumps(p, indent=2) + "\n")
    md = markdown(p)
    (RESULTS / "train_memory_projection_h100.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
