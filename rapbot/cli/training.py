"""`train rap`, `train cir`: fine-tune the answer model (RAP) and the composed search encoder.

Adding a method is a parser in :func:`register` that sets ``handler`` plus that function.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rapbot.cli.common import emit, settings_for


def register(sub, common: argparse.ArgumentParser) -> None:
    train = sub.add_parser("train", parents=[common], help="fine-tune models (rap, cir)")
    train_kinds = train.add_subparsers(dest="train_command", required=True, metavar="KIND")

    t = train_kinds.add_parser(
        "rap", parents=[common], help="LoRA fine-tuning on RAP-format data (accelerate-ready)"
    )
    t.set_defaults(handler=run_train_rap)
    t.add_argument("--data", required=True, help="RAP records: a JSON list or JSON lines")
    t.add_argument("--images", default=None, help="image root (default: the data's folder)")
    t.add_argument(
        "--base", required=True, help="base model: folder, hub name, tiny-llava, rap-llava..."
    )
    t.add_argument("--out", required=True, help="output folder: adapter and checkpoints")
    t.add_argument(
        "--recipe",
        choices=["rap-llava", "rap-phi3"],
        default=None,
        help="RAP's released training run (LoRA r 128 / alpha 256, lr 1e-4, projector at 2e-5, "
        "K 2 / 3, records with more than K concepts dropped, its chat template); options given "
        "here override it. Without: small-run defaults",
    )
    # Hyper-parameters default to None: the recipe's value, or the small-run default
    # (engine.train.recipes.TrainOptions), unless given.
    t.add_argument("--lora-r", type=int, default=None, help="LoRA rank (8; recipes 128)")
    t.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (16; recipes 256)")
    t.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (0.05)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine (2e-4)")
    t.add_argument(
        "--projector-lr", type=float, default=None, help="projector learning rate (recipes 2e-5)"
    )
    t.add_argument("--epochs", type=int, default=None, help="(1)")
    t.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: the epochs')")
    t.add_argument("--batch-size", type=int, default=None, help="per device (1; recipes 8)")
    t.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation (1)")
    t.add_argument(
        "--max-concepts", type=int, default=None, help="concepts per prompt, RAP's K (2; phi3 3)"
    )
    t.add_argument(
        "--noise-concepts", type=int, default=None, help="random extra concepts (1; recipes 0)"
    )
    t.add_argument(
        "--max-length", type=int, default=None, help="longest sequence in tokens (2048 / 4096)"
    )
    t.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision (GPU)")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None)
    t.add_argument(
        "--train-projector", action="store_true", default=None, help="also train the projector"
    )
    _resume_option(t)
    t.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    t.add_argument("--keep-checkpoints", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="data loader processes")
    t.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = train_kinds.add_parser(
        "cir", parents=[common], help="CIR-LVLM composed image search encoder (InfoNCE, LoRA)"
    )
    c.set_defaults(handler=run_train_cir)
    c.add_argument("--data", required=True, help="triplets: CIRR, FashionIQ or CIRCO JSON")
    c.add_argument("--images", default=None, help="image folder (default: the data's folder)")
    c.add_argument("--base", required=True, help="base VLM: folder, hub name, tiny-llava...")
    c.add_argument("--out", required=True, help="output folder: encoder and checkpoints")
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--batch-size", type=int, default=16, help="in-batch negatives per step")
    c.add_argument("--lr", type=float, default=1e-4)
    c.add_argument("--temperature", type=float, default=0.05)
    c.add_argument("--pool-size", type=int, default=8, help="prompts in the prompt pool")
    c.add_argument("--prompt-len", type=int, default=4, help="tokens per soft prompt")
    c.add_argument("--lora-r", type=int, default=8)
    c.add_argument("--save-every", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    _resume_option(c)
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resume_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in --out (or the one given)",
    )


def run_train_rap(args: argparse.Namespace) -> int:
    from engine.train.rap_train import TrainConfig, train
    from engine.train.recipes import TrainOptions, resolve_options
    from engine.weights import is_offline, models_dir

    settings = settings_for(args)
    chosen = {f: getattr(args, f) for f in TrainOptions.__dataclass_fields__ if hasattr(args, f)}
    options = resolve_options(args.recipe, chosen)
    result = train(
        TrainConfig(
            **vars(options),
            **_locations(args, settings),
            max_steps=args.max_steps,
            resume=args.resume,
            save_every=args.save_every,
            keep_checkpoints=args.keep_checkpoints,
            seed=args.seed,
            num_workers=args.workers,
            cpu=args.cpu,
            progress=not args.no_progress,
            cache_dir=models_dir(settings) / "hf",
            local_files_only=is_offline(settings),
        )
    )
    if not result.main_process:  # `accelerate launch`: one summary, not one per GPU
        return 0
    return _trained(args, result.step, result.losses, "adapter", result.adapter)


def run_train_cir(args: argparse.Namespace) -> int:
    from engine.cir.train import CirTrainConfig, train

    settings = settings_for(args)
    result = train(
        CirTrainConfig(
            **_locations(args, settings),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            pool_size=args.pool_size,
            prompt_len=args.prompt_len,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            save_every=args.save_every,
            seed=args.seed,
            device=args.device,
            resume=args.resume,
            progress=not args.no_progress,
        )
    )
    extra = {"prompt_usage": result.prompt_usage}
    return _trained(args, result.step, result.losses, "out", result.out, extra)


def _locations(args: argparse.Namespace, settings) -> dict:
    """The data, image folder, base model and output folder every training run takes."""
    from engine.generator.load import generator_location

    data = Path(args.data).expanduser()
    return {
        "data": data,
        "images": Path(args.images).expanduser() if args.images else data.parent,
        "base": generator_location(args.base, settings) or args.base,
        "out": Path(args.out).expanduser(),
    }


def _trained(
    args: argparse.Namespace, step: int, losses: list, key: str, folder, extra: dict | None = None
) -> int:
    """The run's summary: the step reached, where the result is, the last loss."""
    last = losses[-1] if losses else None
    what = "adapter" if key == "adapter" else "encoder"
    text = f"Trained to step {step}; {what} saved in {folder}"
    payload = {"step": step, key: str(folder), "loss": last, **(extra or {})}
    emit(args, payload, text + (f" (last loss {last:.4f})" if last is not None else ""))
    return 0
