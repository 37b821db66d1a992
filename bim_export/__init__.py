"""bim-export: block-wise masked image modeling for timm ViTs, exported per device to ONNX.

The package, one line per module in data-flow order. Imports run one way: a module imports only
modules listed above it; ``train`` and ``deploy`` never import each other, and both use the bridge
(tests/test_layout.py checks all three).

bridge (used by both halves)
    errors                  the one error hierarchy; exit codes
    resources               where shipped profiles, targets and assets live
    stale                   owner tags of temporary outputs; removal of killed runs' leftovers
    atomic                  atomic writes; what an output may replace; the umask
    machine                 machine description (CPU, GPUs), is it a profile's device; sha256 (ships in bundles)
    table                   plain-text tables
    progress                a long job's stages and counts; the command line's bars, lines and log
    data                    image folders, preprocessing, sample and check images
    knn                     kNN on features (numpy; ships in bundles)
    architecture            BimConfig, the timm encoder, the exit API (exit_tokens)
    checkpoint              checkpoint directories: save, load, metrics (and what scored them)
    backbone                a depth's plain timm ViT out of a checkpoint
train (BIM pretraining)
    train.config            TrainConfig (nests BimConfig), from YAML, flags and --set
    train.distributed       torchrun process groups, gradient averaging
    train.images            training image files: listing, decoding (CPU or GPU), crops
    train.bad_images        unreadable images met in training: replaced, counted, reported
    train.decoder           the light MAE decoder of an exit (activation checkpointing optional)
    train.model             BimModel: masking, stages, decoders, the stage API, block-wise backward
    train.pretrained        --init: a timm ViT's pretrained weights into the encoder
    train.loader            the seeded data stream: batches, augmentation, masks
    train.optim             AdamW groups, warm-up + cosine schedule, a stage's optimizer
    train.update            when parameters step: per stage (exact) or per step, and the fallback rules
    train.run_state         a step's checkpoint and the state a resumed run continues with
    train.stage_parallel    stages over groups of ranks: the cut, forward tokens between groups, faults
    train.splits            the evaluation protocol (reference / query split)
    train.probe             linear probe
    train.evaluate          kNN / linear probe of every exit
    train.trainer           the training loop, resume, checkpoints
deploy (per-device export)
    deploy.registry         named extension points (timm's register_model style)
    deploy.presets          quantization presets (registry)
    deploy.providers        ONNX Runtime execution providers, their op lists and rewrites (registry)
    deploy.device_scripts   the targets/ inference scripts a bundle ships (registry)
    deploy.schema_errors    one line for a profile file's schema errors (field, problem, value)
    deploy.profiles         device profiles: schema, loading, budgets
    deploy.plausibility     hardware figures no real device has (per watt, per core, per memory type)
    deploy.export           backbone -> ONNX at the profile's opset, metadata, graph surgery
    deploy.usability        ONNX Runtime's mobile usability checker: what NNAPI / CoreML take of a graph
    deploy.rewrite          graph forms: the batch fixed, ops an accelerator lacks in ops it has
    deploy.quantize         fp16 / int8 conversion
    deploy.latency          costmodel -> stats -> measure (+ worker) -> roofline -> calibration -> predict
    deploy.placement        a phone candidate's device (its accelerator or the CPU cores) and latency there
    deploy.selector         the choice of depth x precision (pure Python)
    deploy.parity           ONNX Runtime vs PyTorch: ParityResult (ships in bundles)
    deploy.validate         re-checking a finished bundle (ships in bundles)
    deploy.candidates       every depth x precision built once, parity-checked, timed
    deploy.ortformat        model.ort and required_operators.config for apps, checked against model.onnx
    deploy.pareto           pareto.png: latency (with its stated error) vs quality of every candidate
    deploy.report           report.md: the choice and why
    deploy.bundle           the bundle folder and its manifest
    deploy.info             what a finished bundle holds, its choice and its validations
    deploy.pipeline         bim-export --target: checkpoint -> bundles
cli                         the command line: parse, call one library function, print
"""

__version__ = "0.1.0"
