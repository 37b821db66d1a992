"""The ``bim-export`` command line: parse, call one library function, print its result.

Exit codes (docs/design.md): 0 success, 1 unexpected failure (traceback kept), 2 bad input or usage,
3 no candidate meets the budget (table on stdout), 4 validation of a finished export failed.
Heavy libraries are imported inside the handlers so ``bim-export --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .core.errors import BimExportError, InputError, NoCandidateError
from .core.launcher import record_for_launcher, tell_launcher
from .core.progress import ConsoleProgress, console_logging

SUBCOMMANDS = ("export", "train", "finetune", "eval", "backbone", "profiles", "calibrate", "validate", "info")


class _Parser(argparse.ArgumentParser):
    """argparse with the project's usage exit: one ``error:`` line, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise InputError(f"{self.prog}: {message}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


# ------------------------------------------------------------------------------------- export


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export the best backbone for a device (the main job)",
                       description=_cmd_export.__doc__)
    _export_args(p)
    p.set_defaults(func=_cmd_export)


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="profile name or alias (jetson, mobile, ...), a YAML file, or 'all'")
    p.add_argument("--checkpoint", type=Path, action="append", default=None,
                   help="BIM checkpoint directory, or a folder of runs (each sub-folder that is a checkpoint); give it "
                        "several times to let the checkpoints compete in one table (default: the one shipped)")
    p.add_argument("--resolutions", default=None, metavar="PX,PX,...",
                   help="input sizes whose candidates compete, e.g. 224,192,160 ('native': each checkpoint's own), "
                        "each a multiple of the patch size; quality is measured at each size (overrides the "
                        "profile's resolutions; default: the checkpoint's own size only)")
    p.add_argument("--out", type=Path, default=Path("exports"),
                   help="bundles go to OUT/<profile> (default: exports); an existing OUT/<profile> is replaced "
                        "only if it is an earlier bundle")
    p.add_argument("--data", type=Path, default=None, help="images for calibration and parity (default: built-in sample set)")
    p.add_argument("--multi-exit", action="store_true", help="one ONNX graph with an output per exit")
    p.add_argument("--early-exit", nargs="?", type=float, const=0.5, default=None, metavar="POINTS",
                   help="joint fine-tuned checkpoint: also one graph per stage segment, each image stopping at the first "
                        "confident exit; thresholds lose at most POINTS of held-out accuracy against the deepest exit "
                        "(default 0.5)")
    p.add_argument("--eval-data", type=Path, default=None,
                   help="labelled folder: with --early-exit, the thresholds are fitted on it (default: the "
                        "checkpoint's held-out split); with several checkpoints scored on different sets, or "
                        "--resolutions, every candidate's quality is re-scored on it at its own resolution")


def _cmd_export(args) -> int:
    """Pick the best depth x precision (of each checkpoint, at each resolution asked for) for a device
    profile, export it to ONNX, check parity and latency, and write a self-describing bundle to
    OUT/<profile>/."""
    from .deploy.pipeline import run_export
    from .deploy.sources import parse_resolutions

    summary = run_export(target=args.target, checkpoint=args.checkpoint, out=args.out,
                         data=args.data, multi_exit=args.multi_exit, progress=args.progress,
                         early_exit=args.early_exit, eval_data=args.eval_data,
                         resolutions=parse_resolutions(args.resolutions))
    print(summary)
    return 0


# -------------------------------------------------------------------------------------- train


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="BIM pretraining of a timm ViT on an image folder", description=_cmd_train.__doc__)
    p.add_argument("--config", type=Path, default=None, help="YAML file of training settings (flags override it)")
    p.add_argument("--data", type=Path, default=None, help="image folder (recursive; class sub-folders optional; default: the built-in sample images)")
    p.add_argument("--model", default=None, help="timm ViT name, e.g. vit_tiny_patch16_224")
    p.add_argument("--exits", type=_int_list, default=None, help="stage exits as block counts, e.g. 3,6,9,12")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoint directory, e.g. runs/NAME: new, empty, or a checkpoint to --resume")
    p.add_argument("--eval-data", type=Path, default=None, help="labelled image folder for kNN / linear probe per exit")
    p.add_argument("--init", default=None, metavar="SOURCE",
                   help="start the encoder from pretrained weights: a .safetensors or .pth file, a bim-export "
                        "checkpoint or backbone folder, or a timm name such as vit_base_patch16_224.mae "
                        "(the decoders start fresh; a resumed run keeps its checkpoint's weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any training setting (TrainConfig in bim_export/train/config.py; "
                        "dots for nested keys), e.g. --set steps=200 --set model_args.img_size=64")
    p.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_mode, metavar="auto",
                   help="continue from the checkpoint in --out (an error if there is none) with the training "
                        "settings stored in it; --config, flags and --set change only what they name. "
                        "'--resume auto': continue if there is one, else start (for requeued jobs)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    """BIM pretraining: every stage exit gets its own light decoder and masked-patch loss, gradients
    stop between stages; one run trains backbones of every exit depth. Works under torchrun."""
    from .train.trainer import train_from_cli

    print(train_from_cli(config_file=args.config, data=args.data, model=args.model, exits=args.exits,
                         out=args.out, eval_data=args.eval_data, init=args.init, overrides=args.overrides,
                         resume=args.resume))
    return 0


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"the only value is 'auto' (got '{text}')")
    return text


# ----------------------------------------------------------------------------------- finetune


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune every exit of a checkpoint on labelled images (a classifier)",
                       description=_cmd_finetune.__doc__)
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="a bim-export checkpoint, pretrained or fine-tuned before (default: the shipped one)")
    p.add_argument("--data", type=Path, default=None,
                   help="labelled image folder: one sub-folder per class (default: the shipped labelled photos, "
                        "9 classes x 10, for a first run)")
    p.add_argument("--out", type=Path, required=True,
                   help="fine-tuned checkpoint directory, e.g. runs/NAME: new, empty, or a run to --resume")
    p.add_argument("--val-data", type=Path, default=None,
                   help="held-out images, same class sub-folders (default: a stratified part of --data, recorded)")
    p.add_argument("--config", type=Path, default=None, help="YAML file of fine-tuning settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any fine-tuning setting (FinetuneConfig in bim_export/train/finetune_config.py), "
                        "e.g. --set mode=per_exit --set epochs=20 --set head=new")
    p.add_argument("--resume", nargs="?", const=True, default=None, type=_resume_mode, metavar="auto",
                   help="continue the run in --out (an error if there is none) with the settings stored in it; "
                        "--config and --set change only what they name. '--resume auto': continue if there "
                        "is one, else start (for requeued jobs)")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    """Fine-tune every exit of a checkpoint on labelled images (class sub-folders): that depth's
    backbone plus a classification head, with AdamW, layer-wise learning-rate decay, warm-up + cosine,
    label smoothing and drop path. mode joint (default): one encoder, a head per exit, the losses
    summed; mode per_exit: each depth on its own. Without --val-data a stratified part of every class
    is held out and recorded; metrics.json gets each exit's held-out top-1 and calibration error
    (ECE). Works under torchrun; --resume continues a killed run."""
    from .core.resources import default_checkpoint_dir, heldout_images_dir
    from .train.finetune import finetune_from_cli

    if args.checkpoint is None:
        args.checkpoint = default_checkpoint_dir()
    if args.data is None:
        args.data = heldout_images_dir()
        print(f"data: the shipped labelled photos ({', '.join(sorted(p.name for p in args.data.iterdir() if p.is_dir()))}); "
              "pass --data DIR for your own", file=sys.stderr)
    print(finetune_from_cli(args.checkpoint, args.data, args.out, val_data=args.val_data, config_file=args.config,
                            overrides=args.overrides, resume=args.resume, progress=args.progress))
    return 0


# --------------------------------------------------------------------------------------- eval


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="kNN and linear probe of every exit on a labelled folder (task top-1 and ECE "
                       "of a fine-tuned checkpoint)", description=_cmd_eval.__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, required=True, help="labelled image folder (one sub-folder per class)")
    p.add_argument("--metrics-out", type=Path, default=None, metavar="FILE",
                   help="write the figures (metrics.json format) to FILE instead of the checkpoint's metrics.json")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    """kNN top-1 and linear-probe top-1 of every exit of a checkpoint on a labelled image folder (of
    a fine-tuned checkpoint: its classifiers' top-1 and calibration error, ECE, on every image of the
    folder, whose classes must be its labels); the figures are written into the checkpoint's metrics.json, or to --metrics-out FILE. The
    checkpoint that ships with bim-export is never rewritten: without --metrics-out its figures
    are only printed."""
    from .train.evaluate import evaluate_checkpoint

    print(evaluate_checkpoint(args.checkpoint, args.data, metrics_out=args.metrics_out))
    return 0


# ----------------------------------------------------------------------------------- backbone


def _add_backbone(sub) -> None:
    p = sub.add_parser("backbone", help="save the depth-d backbone as a plain timm model", description=_cmd_backbone.__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="folder: new, empty, or an earlier backbone (replaced)")
    p.set_defaults(func=_cmd_backbone)


def _cmd_backbone(args) -> int:
    """Save the backbone of one exit depth as safetensors + a timm config.json, loadable with
    timm.create_model(arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=...), **model_args)
    (arch and model_args, depth included, from the config.json), or timm.create_model("local-dir:OUT", pretrained=True)."""
    from .model.backbone import save_backbone

    print(save_backbone(args.checkpoint, args.depth, args.out))
    return 0


# ----------------------------------------------------------------------------------- profiles


def _add_profiles(sub) -> None:
    p = sub.add_parser("profiles", help="list, show or check device profiles", description=_cmd_profiles.__doc__)
    ps = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ps.add_parser("list", help="list the shipped profiles and aliases")
    show = ps.add_parser("show", help="print one profile, its file and the calibration in force")
    show.add_argument("name")
    check = ps.add_parser("check", help="validate a profile YAML file and warn about implausible hardware figures")
    check.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_profiles)


def _cmd_profiles(args) -> int:
    """List the device profiles, print one (resolved aliases, canonical name, its file, the calibration
    in force), or validate a YAML file against the schema and warn about hardware figures no real
    device has (compute per watt and per core, bandwidth for the memory type)."""
    from .deploy import profile_text, profiles

    if args.action == "list":
        print(profile_text.format_profile_list())
    elif args.action == "show":
        from .deploy.latency.calibration import describe_calibration

        prof = profiles.load_profile(args.name)
        print(profile_text.format_profile(prof))
        print(describe_calibration(prof))
    else:
        from .deploy.plausibility import implausible_figures

        prof = profiles.load_profile_file(args.file)
        warnings = implausible_figures(prof)
        for w in warnings:
            print(f"warning: {args.file}: {w}", file=sys.stderr)
        n = len(warnings)
        print(f"{args.file}: ok ({prof.name})" + (f", {n} implausible figure{'s' if n != 1 else ''}" if n else ""))
    return 0


# ---------------------------------------------------------------------------------- calibrate


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="measure on this device and write a calibration file", description=_cmd_calibrate.__doc__)
    p.add_argument("--profile", required=True, help="the profile of the device this runs on")
    p.add_argument("--out", type=Path, default=None,
                   help="calibration file (default: $BIM_EXPORT_CALIBRATION_DIR/<profile>.json, "
                        "else ~/.config/bim-export/calibration/<profile>.json)")
    p.add_argument("--force", action="store_true",
                   help="calibrate although this machine is not the profile's device (its architecture, CPU, "
                        "accelerator or core count differ); every prediction from the file says it was forced")
    p.set_defaults(func=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    """Run on the real device: export a few reference ViTs, time them with ONNX Runtime and fit the
    latency model to them; later predictions for this profile (on any machine that has the file)
    use the fitted factors and are labelled calibrated. A machine that is not the profile's device
    is refused unless --force."""
    from .deploy.latency.calibration import calibrate

    print(calibrate(args.profile, out=args.out, force=args.force))
    return 0


# ----------------------------------------------------------------------------------- validate


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="re-check a bundle's parity and latency on this machine", description=_cmd_validate.__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--check-latency", action="store_true",
                   help="also fail when the latency misses the profile's budget (default: only for the host profile); "
                        "refused on a machine that is not the profile's device")
    p.add_argument("--force", action="store_true",
                   help="check latency although this machine is not the profile's device (recorded as forced)")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    """Re-run parity (against the bundle's reference.npz) and latency on this machine and record the
    measured figures in the bundle's manifest (exit 4 on a parity failure or a changed file). Needs
    only onnxruntime and numpy; the bundle's own validate.py does the same without bim-export."""
    from .deploy.latency.measure import bundle_timer
    from .runtime.validate import validate_bundle

    print(validate_bundle(args.bundle, check_latency=True if args.check_latency else None, force=args.force,
                          timer=bundle_timer))
    return 0


# --------------------------------------------------------------------------------------- info


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what a bundle holds, its choice and its validations", description=_cmd_info.__doc__)
    p.add_argument("bundle", type=Path)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> int:
    """Print what a bundle holds (its files and their sizes), what was chosen (profile, depth,
    precision, quality, latency with its source and error, budgets) and how it was checked (parity
    at export, and every validation recorded on a device). Reads the bundle only."""
    from .deploy.info import bundle_info

    print(bundle_info(args.bundle))
    return 0


# --------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bim-export", description=(
        "Block-wise masked image modeling for timm ViTs, and per-device ONNX export of its backbones. "
        "`bim-export --target NAME` is the same as `bim-export export --target NAME`."))
    parser.add_argument("--version", action="version", version=f"bim-export {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: bim-export's own log; -vv: the libraries' too (torch, onnx, onnxruntime, ...)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for add in (_add_export, _add_train, _add_finetune, _add_eval, _add_backbone, _add_profiles, _add_calibrate, _add_validate,
                _add_info):
        add(sub)
    return parser


def _normalize_argv(argv: list[str]) -> list[str]:
    """``bim-export --target X ...`` (no subcommand) means ``bim-export export --target X ...``."""
    if any(a in SUBCOMMANDS for a in argv if not a.startswith("-")):
        return argv
    if any(a == "--target" or a.startswith("--target=") for a in argv):
        flags = [a for a in argv if a in ("-v", "-vv", "--verbose")]
        return [*flags, "export", *[a for a in argv if a not in flags]]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(_normalize_argv(argv))
        if args.command is None:
            build_parser().print_help()
            return 2
        args.progress = ConsoleProgress(sys.stderr)  # stderr: stdout holds only the result
        with console_logging(args.verbose, args.progress):
            return args.func(args)
    except NoCandidateError as e:
        if e.table:
            print(e.table)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BimExportError as e:
        print(f"error: {e}", file=sys.stderr)
        tell_launcher(f"error: {e}")
        return e.exit_code
    except BrokenPipeError:  # `bim-export ... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        record_for_launcher(e)
        raise


if __name__ == "__main__":
    sys.exit(main())
