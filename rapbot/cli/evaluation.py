"""`eval rap`, `eval cir`: the RAP benchmarks and composed image search metrics.

Adding a method is a parser in :func:`register` that sets ``handler`` plus that function.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack, closing
from functools import partial
from pathlib import Path

from engine.errors import InvalidInputError
from rapbot.cli.common import emit, progress_of, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    evaluate = sub.add_parser("eval", parents=[common], help="evaluate models (rap, cir)")
    eval_kinds = evaluate.add_subparsers(dest="eval_command", required=True, metavar="KIND")

    e = eval_kinds.add_parser(
        "rap", parents=[common], help="RAP's captioning, QA and recognition metrics"
    )
    e.set_defaults(handler=run_eval_rap)
    e.add_argument("set", nargs="?", help="evaluation set (JSON; see the README)")
    e.add_argument("--images", default=None, help="image root (default: the set's folder)")
    who = e.add_mutually_exclusive_group()
    who.add_argument("--generator", default=None, help="a generator model (as for --base)")
    who.add_argument(
        "--engine", action="store_true", help="the whole engine (--profile, RAPBOT_GENERATOR)"
    )
    e.add_argument("--adapter", default=None, help="a LoRA adapter for --generator")
    e.add_argument("--name", default=None, help="the method's name in the tables")
    e.add_argument("--tasks", default="caption,visual_qa,text_qa,recognition")
    e.add_argument("--limit", type=int, default=None, help="at most N items per task")
    e.add_argument("--k", type=int, default=2, help="concepts in a caption prompt")
    e.add_argument("--no-distractors", action="store_true", help="captions: true concepts only")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--device", default="auto", help="--generator's device")
    e.add_argument("--out", default=None, help="save the answers (predictions JSON) here")
    e.add_argument(
        "--score", nargs="+", default=None, metavar="PRED", help="only table saved predictions"
    )
    e.add_argument(
        "--qa-reading",
        choices=["strict", "lenient"],
        default="strict",
        help="QA in Table 4: strict (the normalized answer must be the letter, as RAP's "
        "eval_qa.py; the paper's numbers) or lenient (the option picked in words or 'A.'); "
        "the other reading is printed below it",
    )

    ec = eval_kinds.add_parser(
        "cir", parents=[common], help="composed image search: Recall@K, Recall_subset@K, mAP@K"
    )
    ec.set_defaults(handler=run_eval_cir)
    ec.add_argument(
        "set", nargs="+", help="triplets: CIRR, FashionIQ (one file per category), CIRCO, Shoes"
    )
    ec.add_argument(
        "--gallery",
        nargs="+",
        default=None,
        help="the images ranked: a split file, folder or comma-separated list, one for all sets"
        " or one per set (required for FashionIQ and CIRCO)",
    )
    ec.add_argument("--images", default=None, help="image folder (default: the set's folder)")
    ec.add_argument("--encoder", required=True, help="a `rapbot train cir` output folder")
    ec.add_argument("--device", default="cpu")


def run_eval_rap(args: argparse.Namespace) -> int:
    from engine.eval.rap_eval import (
        GeneratorAnswerer,
        evaluate_engine,
        load_eval_set,
        read_predictions,
        report,
        run_eval,
        score_json,
    )

    settings = settings_for(args)
    if args.score:
        runs = [read_predictions(path) for path in args.score]
    else:
        if not args.set or not (args.generator or args.engine):
            raise InvalidInputError(
                "Give an evaluation set and --generator MODEL or --engine (or --score FILES)."
            )
        eval_set = load_eval_set(args.set, args.images)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        with ExitStack() as stack:
            if args.engine:
                from engine.engine import Engine

                engine = stack.enter_context(closing(Engine.open(settings)))
                name = args.name or f"engine ({settings.profile})"
                evaluate = partial(evaluate_engine, engine, eval_set)
            else:
                from engine.generator.hf import Generator
                from engine.generator.load import generator_location
                from engine.weights import is_offline, models_dir

                generator = Generator.load(
                    generator_location(args.generator, settings) or args.generator,
                    device=args.device,
                    adapter=args.adapter,
                    cache_dir=models_dir(settings) / "hf",
                    local_files_only=is_offline(settings),
                    max_new_tokens=args.max_new_tokens,
                )
                answerer = GeneratorAnswerer(
                    generator, eval_set, k=args.k, distractors=not args.no_distractors
                )
                name = args.name or args.generator + (" + adapter" if args.adapter else "")
                evaluate = partial(run_eval, eval_set, answerer)
            with progress_of(args, "eval rap") as progress:
                run = evaluate(method=name, tasks=tasks, limit=args.limit, progress=progress)
        if args.out:
            Path(args.out).expanduser().write_text(json.dumps(run, indent=1, ensure_ascii=False))
        runs = [run]
    emit(args, {"results": [score_json(run) for run in runs]}, report(runs, args.qa_reading))
    return 0


def run_eval_cir(args: argparse.Namespace) -> int:
    from engine.cir.train import evaluate_files, load_encoder

    encoder = load_encoder(args.encoder, device=args.device)
    with progress_of(args, "eval cir") as report_progress:
        results = evaluate_files(
            encoder, args.set, args.gallery, args.images, progress=report_progress
        )
    lines = [
        f"{name}: " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items())
        for name, scores in results.items()
    ]
    emit(args, results, "\n".join(lines))
    return 0
