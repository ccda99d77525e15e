"""`models convert`: model files (original RAP checkpoints to the transformers format);
`calibrate`: the recognition threshold measured for the configured embedding model."""

from __future__ import annotations

import argparse

from rapbot.cli.common import emit, progress, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="model files (convert RAP checkpoints)")
    actions = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    c = actions.add_parser(
        "convert",
        parents=[common],
        help="an original LLaVA-format checkpoint (RAP-LLaVA, RAP-Phi3) -> transformers format",
    )
    c.set_defaults(handler=run_convert)
    c.add_argument("src", help="the original checkpoint's folder (config, weights, tokenizer)")
    c.add_argument("dst", help="folder to write the transformers checkpoint to")
    c.add_argument(
        "--template",
        choices=["vicuna_v1", "llava_v1", "phi3"],
        default=None,
        help="conversation template the checkpoint was trained with (default: phi3 for Phi-3 "
        "models, else vicuna_v1, RAP-LLaVA's; llava_v1 is LLaVA-1.5's evaluation template)",
    )
    c.add_argument(
        "--vision-tower", default=None, help="local CLIP folder when the checkpoint has none"
    )
    k = sub.add_parser(
        "calibrate",
        parents=[common],
        help="measure the recognition threshold on a folder of subject folders and save it",
        description="Remembers each subject's first photo, recognizes the others, prints "
        "precision, recall and 'nobody' accuracy per threshold, and saves the best threshold "
        "for the current embedding model in the data folder (RAPBOT_MATCH_THRESHOLD still "
        "overrides it). Example: rapbot calibrate ~/photos/dreambooth/dataset",
    )
    k.set_defaults(handler=run_calibrate)
    k.add_argument("photos", help="a folder of subject folders (dog/00.jpg, cat/00.jpg ...)")
    k.add_argument("--dry-run", action="store_true", help="report only; save nothing")


def run_calibrate(args: argparse.Namespace) -> int:
    from engine.calibrate import calibrate, subject_photos

    settings = settings_for(args)
    subjects = subject_photos(args.photos)  # a bad folder is reported before any model loads
    tests = sum(len(photos) - 1 for photos in subjects.values())
    with progress(args, tests, "Calibrating") as advance:
        result = calibrate(
            settings, args.photos, write=not args.dry_run, progress=lambda done, total: advance()
        )
    lines = [
        f"{result.subjects} subjects, {result.photos} test photos, model {result.model_id}",
        f"{'threshold':>10} {'precision':>10} {'recall':>8} {'nobody':>8}",
    ]
    for row in result.table:
        mark = "  <- best" if row == result.best else ""
        lines.append(
            f"{row.threshold:>10.4f} {row.precision:>10.3f} {row.recall:>8.3f} "
            f"{row.nobody_accuracy:>8.3f}{mark}"
        )
    if result.written_to:
        lines.append(f"Threshold {result.best.threshold:.4f} saved in {result.written_to}.")
    emit(args, result.as_json(), "\n".join(lines))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from engine.generator.convert import convert_checkpoint
    from engine.weights import is_offline

    dst = convert_checkpoint(
        args.src,
        args.dst,
        template=args.template,
        vision_tower=args.vision_tower,
        local_files_only=is_offline(settings_for(args)),
    )
    emit(args, {"converted": str(dst)}, f"Converted {args.src} -> {dst} (RAPBOT_GENERATOR={dst})")
    return 0
