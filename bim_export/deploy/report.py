"""What a person reads in a bundle: report.md, the choice and why (pareto.png: :mod:`~bim_export.deploy.pareto`)."""

from __future__ import annotations

from typing import Any

from .device_scripts import script_for_file

# ---------------------------------------------------------------------------------------- report


def render_report(manifest: dict[str, Any], table: str, why: str) -> str:
    """report.md: choice and why (``why``), the candidate table (``table``), parity, latency with its
    source, how to run it; everything else from the bundle's manifest."""
    m = manifest
    lat, par = m.get("latency", {}), m.get("parity", {})
    stat, device = lat.get("stat", "p50"), script_for_file(m.get("infer_script", ""))
    budget = (m.get("budgets") or {}).get("latency_ms")
    lines = [
        f"# bim-export bundle: {m.get('profile')}",
        "",
        f"**Chosen:** depth {m.get('depth')} ({m.get('precision')}), opset {m.get('opset')}, "
        f"{lat.get('ms', float('nan')):.2f} ms {stat} at batch {m.get('batch')} ({lat.get('source', '?')}).",
        "",
        why,
        "",
        "## Candidates",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        "![latency vs quality](pareto.png)",
        "",
        "## Parity (ONNX Runtime vs PyTorch on real images)",
        "",
    ]
    labels = m.get("labels") or []
    runs = [("batch 1", par.get("batch1")), (f"batch {par.get('batch_n', 'n')}", par.get("batchN"))]
    runs += [(f"exit {d} (multi-exit graph)", r.get("batchN")) for d, r in (par.get("exits") or {}).items()]
    top1 = any(isinstance(r, dict) and r.get("top1_agreement") is not None for _, r in runs)
    lines += ["| run | images | cosine mean / min | neighbour agreement | " + ("top-1 agreement | " if top1 else "")
              + "max abs | mean abs | passed |", "|---|---|---|---|---|---|---|" + ("---|" if top1 else "")]
    lines += [_parity_row(name, r, top1) for name, r in runs if isinstance(r, dict)]
    tol = par.get("tolerances") or m.get("tolerances") or {}
    lines += ["", f"Tolerances ({m.get('precision')}): cosine >= {tol.get('cosine')}, neighbour agreement >= "
              f"{tol.get('neighbour_agreement')}"
              + (f", top-1 agreement of the logits >= {tol.get('top1_agreement', 0.99)}" if labels else "")
              + f". Run with ONNX Runtime's {par.get('provider', 'CPU')} here."]
    data = m.get("data")
    if isinstance(data, dict):
        lines.append(f"Images: {data.get('parity_images')} for parity, {data.get('calibration_images')} for "
                     f"calibration, drawn from {data.get('images')} in "
                     + (f"`{data['folder']}` (--data)." if data.get("folder") else "the built-in sample set."))
    if par.get("note"):
        lines.append(f"Note: {par['note']}.")
    if labels:
        shown = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
        lines += ["", f"Classifier: `logits` over {len(labels)} labels ({shown}; all of them in manifest.json "
                  "`labels`, in logit order); their cosine and top-1 agreement with PyTorch are checked beside "
                  "the embedding's."]
    lines += [
        "",
        "## Latency",
        "",
        f"- {lat.get('ms', float('nan')):.2f} ms ({stat}) at batch {m.get('batch')}, "
        f"source: **{lat.get('source', '?')}**"
        + (f", expected error ±{lat['expected_error'] * 100:.0f} %" if lat.get("expected_error") is not None else "")
        + (f" ({lat['error_basis']})" if lat.get("error_basis") else "")
        + (f", machine: {lat['machine']}" if lat.get("machine") else ""),
        f"- budget: {budget:g} ms ({stat})" if budget is not None else "- budget: none",
    ]
    if lat.get("note"):
        lines.append(f"- note: {lat['note']}")
    lines += [
        "",
        "Predicted figures come from the graph's cost model and the profile's hardware figures; run",
        "`python validate.py .` on the device to measure them there (recorded in manifest.json).",
        "",
        *mobile_lines(m),
        *early_exit_lines(m),
        *server_lines(m),
        "## Run it on the device",
        "",
        "```sh",
        f"pip install {device.runtime if device else 'onnxruntime'} numpy pillow"
        + (f"   # {device.install_note}" if device and device.install_note else ""),
        ("python infer.py path/to/images/            # top-5 labels with probabilities, with timing" if labels
         else "python infer.py path/to/images/            # embeddings, with timing"),
        "python infer.py query.jpg --gallery gallery/ --top-k 5",
        "python validate.py .                        # parity vs reference.npz + latency, on this machine",
        "```",
        "",
        device.note if device else "",
        "",
        f"Preprocessing (done by infer.py): shorter side to {m.get('preprocessing', {}).get('img_size')} px bicubic, "
        f"centre crop, normalize with mean {m.get('preprocessing', {}).get('mean')} and std {m.get('preprocessing', {}).get('std')}.",
        "",
        f"Made by bim-export {m.get('bim_export_version')} (torch {m['versions'].get('torch')}, "
        f"onnx {m['versions'].get('onnx')}, onnxruntime {m['versions'].get('onnxruntime')}); exporter: {m.get('exporter')}.",
        "",
    ]
    return "\n".join(lines)


def server_lines(m: dict[str, Any]) -> list[str]:
    """report.md's Triton and TensorRT section: how to serve the bundle's model repository and build
    its engine (GPU bundles; none otherwise)."""
    tri, trt = m.get("triton"), m.get("tensorrt")
    lines = []
    if isinstance(tri, dict):
        lines += ["## Serve it with Triton", "",
                  f"`{tri.get('repository')}/` is a Triton model repository (`{tri.get('config')}`: the graph's inputs "
                  f"and outputs, max_batch_size {tri.get('max_batch_size')}, ONNX Runtime's TensorRT accelerator at "
                  f"{m.get('precision')}):", "", "```sh",
                  f"tritonserver --model-repository=$PWD/{tri.get('repository')}",
                  f"perf_analyzer -m {tri.get('model_name')} -b {m.get('batch')} -i grpc -u localhost:8001", "```", ""]
    if isinstance(trt, dict):
        need = trt.get("needs") or {}
        lines += ["## A TensorRT engine", "",
                  f"`{trt.get('script')}` builds `{trt.get('engine')}` with trtexec on the device (TensorRT "
                  f">= {need.get('tensorrt', '?')}; `{trt.get('notes')}` says why):", "", "```sh",
                  f"bash {trt.get('script')}",
                  f"python infer.py path/to/images/ --engine {trt.get('engine')}", "```", ""]
    return lines


def early_exit_lines(m: dict[str, Any]) -> list[str]:
    """report.md's early-exit section: held-out accuracy against mean host latency, the cascade beside
    every fixed depth, the thresholds and where each was fitted."""
    ee = m.get("early_exit")
    if not isinstance(ee, dict):
        return []
    exits, lat, acc = ee.get("exits") or [], ee.get("latency") or {}, ee.get("accuracy") or {}
    held, share = (ee.get("fit") or {}).get("held_out") or {}, ee.get("exit_distribution") or {}
    cascade, fixed = lat.get("cascade") or {}, lat.get("fixed") or []
    thresholds = " / ".join("never" if t is None else f"{t:.3f}" for t in (ee.get("thresholds") or [])[:-1])
    lines = ["## Early exit", "",
             f"{len(exits)} segment graphs in `early_exit/` ({ee.get('precision')}), exits at blocks "
             f"{', '.join(map(str, exits))}: an image leaves at the first exit whose {ee.get('confidence')} reaches "
             f"its threshold ({thresholds}; the last exit takes the rest). Thresholds fitted on "
             f"{held.get('name')} ({held.get('size')} images, {held.get('protocol')}) for at most "
             f"{(ee.get('fit') or {}).get('accuracy_loss_points')} point of accuracy below the deepest exit, "
             "at the least measured compute.", "",
             f"| model | held-out top-1 | mean latency (host, batch {lat.get('batch')}) | images leaving at each exit |",
             "|---|---|---|---|",
             f"| early exit | {acc.get('cascade', float('nan')):.1%} | {cascade.get('mean_ms', float('nan')):.2f} ms | "
             + ", ".join(f"{d}: {share.get(str(d), 0):.0%}" for d in exits) + " |"]
    lines += [f"| depth {d} | {(acc.get('fixed') or {}).get(str(d), float('nan')):.1%} | {f.get('mean_ms', float('nan')):.2f} ms"
              " | |" for d, f in zip(exits, fixed)]
    machine = lat.get("machine") or {}
    lines += ["", f"Latency measured here ({machine.get('cpu', '?')}, {machine.get('logical_cores', '?')} logical cores, "
              f"CPU flags {' '.join(machine.get('cpu_flags') or []) or 'none listed'}): every segment and every fixed-depth "
              "graph timed together, interleaved; the cascade's mean is each held-out image's segments summed, "
              "averaged." + (" Some timings were disturbed by other processes." if lat.get("disturbed") else ""),
              "Run it: `python infer.py images/ --early-exit` (the exit taken and the label per image).", ""]
    return lines


def _parity_row(name: str, r: dict, top1: bool = False) -> str:
    """One markdown table row of a ParityResult dict (with ``top1``, its logits' top-1 agreement)."""
    agree = r.get("neighbour_agreement")
    agree_text = "n/a" if agree is None else f"{agree:.1%} ({r.get('agreement_kind', '?')})"
    if top1:
        agree_text += " | " + ("n/a" if r.get("top1_agreement") is None else f"{r['top1_agreement']:.1%}")
    nan = float("nan")
    return (f"| {name} | {r.get('images', '?')} | {r.get('cosine', nan):.6f} / {r.get('cosine_min', nan):.6f} | "
            f"{agree_text} | {r.get('max_abs', nan):.3g} | {r.get('mean_abs', nan):.3g} | "
            f"{'yes' if r.get('passed') else 'NO'} |")


# ------------------------------------------------------------------------------- ORT Mobile


def mobile_lines(m: dict[str, Any]) -> list[str]:
    """report.md's sections for an ORT Mobile bundle: the graph form, ORT's usability check per EP,
    the .ort round trip, what is verified here and what needs the phone, and how an app loads it."""
    mob = m.get("mobile")
    if not isinstance(mob, dict):
        return []
    form, ort = mob.get("graph_form") or {}, mob.get("ort") or {}
    lines = ["## On the phone (ONNX Runtime Mobile)", "",
             f"Graph: {form.get('description', 'as exported')}. The parity above is this graph's.", ""]
    usability = mob.get("usability") or {}
    if usability:
        lines += ["ONNX Runtime's usability checker (the logic of `python -m onnxruntime.tools."
                  "check_onnx_model_mobile_usability`) on model.onnx:", "",
                  "| EP | ORT's list | nodes taken | partitions | unsupported ops | dynamic-shape nodes | "
                  "should perform well as is |", "|---|---|---|---|---|---|---|"]
        for ep, c in usability.items():
            ops = ", ".join(op.split(":")[-1] for op in c.get("unsupported_ops", [])) or "none"
            lines.append(f"| {ep} | {c.get('checker')} | {c.get('supported')} / {c.get('nodes')} "
                         f"({c.get('coverage', 0):.1%}) | {c.get('partitions')} | {ops} | "
                         f"{c.get('dynamic_shape_nodes')} | {c.get('verdict')} |")
        caveats = sorted({cv for c in usability.values() for cv in c.get("caveats", [])})
        if caveats:
            lines += ["", "Caveats ORT's checker lists but does not verify (the device run does): "
                      + "; ".join(f"`{cv}`" for cv in caveats) + "."]
        lines.append("")
    runs = mob.get("runs_on")
    if runs:
        lines += [f"Latency predicted on: {runs} ({(m.get('latency') or {}).get('note') or 'its figures'}).", ""]
    cands = mob.get("candidates") or {}
    if cands:
        lines += ["Every candidate (ORT's checker; where it is predicted):", ""]
        lines += [f"- {label}: " + "; ".join(v for k, v in row.items() if k != "runs_on")
                  + f" -> {row.get('runs_on')}" for label, row in cands.items()]
        lines.append("")
    if ort:
        par = ort.get("parity") or {}
        lines += [f"`{ort.get('model')}` (ONNX Runtime {ort.get('onnxruntime')} or newer, optimization style "
                  f"{ort.get('optimization_style')}) was made at export and checked on reference.npz: largest "
                  f"difference from model.onnx {ort.get('max_abs_vs_onnx', float('nan')):.3g}"
                  + (" (ORT runs the Q/DQ pairs of one file as int8 kernels and not the other's, so the two are held "
                     "to the parity tolerances, not to float noise)" if m.get("precision") != "fp32" else "")
                  + ", against PyTorch "
                  f"cosine {par.get('cosine', float('nan')):.6f} "
                  f"(worst image {par.get('cosine_min', float('nan')):.6f}). "
                  f"`{ort.get('config')}` lists its operators for a reduced-size ONNX Runtime build "
                  "(`build.sh --minimal_build --include_ops_by_config required_operators.config`).", ""]
    lines += ["Verified here: the graph's coverage by ORT's checker, its parity on real images (fixed shapes, "
              "rewritten ops, precision), the .ort round trip. Needs the phone: latency, and whether the EP's driver "
              "runs every node it was given. There, `bim-export calibrate --profile NAME` fits the CPU path and "
              "`python validate.py .` re-checks this bundle with the onnxruntime it has (a pip wheel has no NNAPI "
              "or CoreML provider: it measures the CPU path); the accelerator's own latency comes from the app or "
              "ORT's `onnxruntime_perf_test` built for the phone.", ""]
    return lines + app_usage_lines(m)


def app_usage_lines(m: dict[str, Any]) -> list[str]:
    """How an Android (Kotlin) or iOS (Swift) app loads model.ort, with this bundle's names and shape."""
    eps = m.get("execution_providers") or []
    pre = m.get("preprocessing") or {}
    shape = (m.get("input") or {}).get("shape") or []
    name = (m.get("input") or {}).get("name", "pixels")
    outputs = (m.get("io") or {}).get("outputs") or ["embedding"]
    out = "embedding" if "embedding" in outputs else [o for o in outputs if o.startswith("embedding")][-1]
    dims = ", ".join(str(d) for d in shape)
    prep = (f"RGB, shorter side to {pre.get('img_size')} px (bicubic), centre crop, planes in CHW order, "
            f"(value / 255 - mean) / std with mean {pre.get('mean')} and std {pre.get('std')}")
    threads = m.get("threads") or 4
    lines = ["## Use it in an app", "", f"Input `{name}`: float32 [{dims}], {prep}. Output `{out}`: float32 "
             "[batch, D], the embedding (cosine similarity compares two)."
             + (f" Output `{out.replace('embedding', 'logits')}`: float32 [batch, {len(m['labels'])}], the class "
                "scores in the order of manifest.json `labels` (softmax gives probabilities)." if m.get("labels")
                else ""), ""]
    if "NnapiExecutionProvider" in eps or "XnnpackExecutionProvider" in eps:
        lines += ["Android (Kotlin, `com.microsoft.onnxruntime:onnxruntime-android`):", "", "```kotlin",
                  "val env = OrtEnvironment.getEnvironment()",
                  "val options = OrtSession.SessionOptions().apply {",
                  "    // NNAPI first: it takes the whole graph; CPU_DISABLED keeps NNAPI off its slow reference CPU",
                  "    addNnapi(EnumSet.of(NNAPIFlags.CPU_DISABLED))",
                  f"    addXnnpack(mapOf(\"intra_op_num_threads\" to \"{threads}\"))  // what NNAPI leaves",
                  "}",
                  "val session = env.createSession(assets.open(\"model.ort\").readBytes(), options)",
                  f"val input = OnnxTensor.createTensor(env, FloatBuffer.wrap(pixels), longArrayOf({dims}))",
                  f"session.run(mapOf(\"{name}\" to input)).use {{ result ->",
                  f"    val embedding = (result.get(\"{out}\").get() as OnnxTensor).floatBuffer",
                  "}", "```", "",
                  "`NNAPIFlags.USE_FP16` lets NNAPI compute an fp32 graph in fp16: faster on some NPUs, not checked "
                  "here; run `python validate.py .` on the phone before shipping it.", ""]
    if "CoreMLExecutionProvider" in eps:
        opts = (m.get("provider_options") or {}).get("CoreMLExecutionProvider") or {"ModelFormat": "MLProgram"}
        pairs = ", ".join(f"\"{k}\": \"{v}\"" for k, v in opts.items())
        lines += ["iOS (Swift, CocoaPods `onnxruntime-objc`):", "", "```swift",
                  "import onnxruntime_objc", "",
                  "let env = try ORTEnv(loggingLevel: .warning)",
                  "let options = try ORTSessionOptions()",
                  f"try options.appendCoreMLExecutionProvider(withOptionsV2: [{pairs}])",
                  "let path = Bundle.main.path(forResource: \"model\", ofType: \"ort\")!",
                  "let session = try ORTSession(env: env, modelPath: path, sessionOptions: options)",
                  "let data = NSMutableData(bytes: pixels, length: pixels.count * MemoryLayout<Float>.size)",
                  f"let input = try ORTValue(tensorData: data, elementType: .float, shape: [{dims}])",
                  f"let outputs = try session.run(withInputs: [\"{name}\": input], outputNames: [\"{out}\"], "
                  "runOptions: nil)",
                  f"let embedding = try outputs[\"{out}\"]!.tensorData()  // float32",
                  "```", "",
                  "On the Neural Engine CoreML computes an fp32 MLProgram in fp16; the parity above is fp32 on the "
                  "CPU EP, so check the app's embeddings against reference.npz once on the phone.", ""]
    return lines
