"""bim-export: block-wise masked image modeling for timm ViTs, exported per device to ONNX.

The package, one folder per part, one line per module in data-flow order. A folder line names its
purpose and, after ``uses:``, the only folders its modules may import (a lazy import inside a
function counts); within a folder a module imports only modules listed above it. So ``train`` and
``deploy`` never import each other, ``runtime`` imports nothing of the project but itself, and
nothing imports upward (tests/test_layout.py checks all of it).

runtime/    the device runtime: what a bundle runs without torch (stdlib, numpy, onnxruntime, Pillow;
            serving adds starlette + uvicorn)
            uses: nothing else; ships in every bundle as its runtime/ package
    errors              the root of the error hierarchy and the errors a device meets (exit codes)
    machine             machine description (CPU, GPUs), is it a profile's device; sha256
    preprocess          evaluation preprocessing: one implementation for the package and the devices
    knn                 kNN on features (numpy)
    labels              a classifier's answer: softmax probabilities, the top-k labels
    session             ONNX Runtime sessions: provider fallback (and its warning), batched runs
    parity              ONNX Runtime vs reference outputs: ParityResult
    early_exit          the stage segments run in turn, each image leaving at its first confident exit
    validate            re-checking a finished bundle
    batcher             micro-batching of served requests: a bounded queue, one inference thread
    serve               the HTTP endpoint of a bundle (starlette + uvicorn, optional): requests, answers
core/       infrastructure: errors, shipped files, atomic outputs, tables
            uses: runtime
    errors              the one error hierarchy; exit codes
    resources           where shipped profiles, targets and assets live
    stale               owner tags of temporary outputs; removal of killed runs' leftovers
    atomic              atomic writes; what an output may replace; the umask
    table               plain-text tables
    progress            a long job's stages and counts; the command line's bars, lines and log
    launcher            what a worker tells torchrun when it stops (its error file)
model/      the model contract both halves share: images in, the encoder, checkpoints, backbones
            uses: core, runtime
    images              image folders, the sample images, the images checks of an export run on
    architecture        BimConfig, the timm encoder, the exit API (exit_tokens)
    checkpoint          checkpoint directories: save, load, metrics (and what scored them)
    classifier          fine-tuned checkpoints: heads on the exits, labels, joint or per-exit weights
    splits              the evaluation protocol (reference / query split; a fine-tuned one's held-out images)
    backbone            a depth's plain timm ViT out of a checkpoint (at its own or another resolution)
    quality             a backbone's quality measured at a resolution (kNN or task top-1, by that protocol)
train/      BIM pretraining
            uses: model, core, runtime
    config              TrainConfig (nests BimConfig), from YAML, flags and --set
    finetune_config     FinetuneConfig: the fine-tuning recipe, from YAML and --set
    distributed         torchrun process groups, gradient averaging
    images              training image files: listing, decoding (CPU or GPU), crops
    bad_images          unreadable images met in training: replaced, counted, reported
    decoder             the light MAE decoder of an exit (activation checkpointing optional)
    model               BimModel: masking, stages, decoders, the stage API, block-wise backward
    pretrained          --init: a timm ViT's pretrained weights into the encoder
    loader              the seeded data stream: batches, augmentation, masks
    optim               AdamW groups, warm-up + cosine schedule, a stage's optimizer
    update              when parameters step: per stage (exact) or per step, and the fallback rules
    run_state           a step's checkpoint and the state a resumed run continues with
    heartbeat           which rank of a stage-parallel run stopped: heartbeats, notes, the launcher's SIGTERM
    stage_parallel      stages over groups of ranks: the cut, forward tokens between groups, faults
    probe               linear probe
    task                a classifier's task metrics: top-1, calibration error (ECE)
    evaluate            kNN / linear probe of every exit; task metrics of a fine-tuned one
    trainer             the training loop, resume, checkpoints
    finetune_data       labelled folders: checks, the recorded held-out split, the augmented stream
    finetune_model      the classifiers fine-tuned (joint or per exit), from and to checkpoints
    finetune            the fine-tuning loop, resume, torchrun, task metrics per exit
deploy/     per-device export
            uses: model, core, runtime
    registry            named extension points (timm's register_model style)
    presets             quantization presets (registry)
    providers           ONNX Runtime execution providers, their op lists and rewrites (registry)
    device_scripts      the targets/ inference scripts a bundle ships (registry)
    schema_errors       one line for a profile file's schema errors (field, problem, value)
    profiles            device profiles: schema, loading, budgets
    profile_text        profiles as text: the shipped table, one profile as YAML, budgets in a line
    plausibility        hardware figures no real device has (per watt, per core, per memory type)
    export              backbone -> ONNX at the profile's opset, metadata
    subgraph            the part of a multi-exit graph that computes some exits (a candidate's graph)
    usability           ONNX Runtime's mobile usability checker: what NNAPI / CoreML take of a graph
    triton              a Triton model repository: config.pbtxt from the graph and the profile
    tensorrt            build_engine.sh (trtexec) and trt_engine.md: the TensorRT a graph needs
    rewrite             graph forms: the batch fixed, ops an accelerator lacks in ops it has
    quantize            fp16 / int8 conversion
    latency             costmodel -> stats -> measure (+ worker) -> roofline -> calibration -> predict
    placement           a phone candidate's device (its accelerator or the CPU cores) and latency there
    candidate_table     the candidate table as text, and how the quality metric is named
    selector            the choice of (checkpoint, resolution,) depth x precision (pure Python)
    workshop            a run's shared artefacts: check images, graphs built once, reference outputs
    sources             a run's checkpoints x resolutions: their workshops, quality that compares
    candidates          every (checkpoint, resolution) depth x precision for a profile: pruned, parity-checked, timed
    thresholds          early exit's confidence thresholds, fitted on held-out images (numpy)
    early_exit          early exit: one graph per stage segment, thresholds, accuracy vs host latency
    ortformat           model.ort and required_operators.config for apps, checked against model.onnx
    pareto              pareto.png: latency (with its stated error) vs quality of every candidate
    manifest            manifest.json: what a bundle holds and why
    report              report.md: the choice and why
    bundle              the bundle folder and its manifest (registered writers)
    info                what a finished bundle holds, its choice and its validations
    pipeline            bim-export --target: checkpoint -> bundles
cli         the command line: parse, call one library function, print
            uses: deploy, train, model, core, runtime
"""

__version__ = "0.1.0"
