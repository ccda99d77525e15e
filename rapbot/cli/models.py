"""`models convert`: model files (original RAP checkpoints to the transformers format)."""

from __future__ import annotations

import argparse

from rapbot.cli.common import emit, settings_for


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
