"""LoRA fine-tuning of a multimodal LLM on RAP-format data (``rapbot train rap``).

The language model's linear projections (attention and MLP) get LoRA adapters through peft;
the vision tower stays frozen; the projector is trained only when asked. The loop runs under
``accelerate.Accelerator``, so ``accelerate launch -m rapbot.cli train rap ...`` (or
``accelerate launch $(which rapbot) train rap ...``) trains on several GPUs with DDP, and a
plain ``rapbot train rap`` on one GPU or the CPU.

A checkpoint (every ``save_every`` optimizer steps, and at the end) is a folder
``checkpoint-STEP`` holding the adapter, the optimizer, the scheduler, every process's RNG
states and ``trainer_state.json`` (step, epoch, batches done in that epoch). It is written
under a temporary name and renamed when complete, so a crash never leaves a half checkpoint
that ``--resume`` would pick. The final adapter is saved in the output folder itself
(``adapter_config.json`` + ``adapter_model.safetensors``), ready for ``Generator.load_adapter``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidInputError
from engine.train.rap_data import RapCollator, RapDataset, drop_over_max_concepts, load_records
from engine.train.recipes import TrainOptions

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
# Names of the vision side (never adapted) and of the projector (trained with --train-projector).
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|image_newline)(\.|$)")
_PROJECTOR = ("multi_modal_projector", "visual.merger", "mm_projector")


@dataclass(kw_only=True)
class TrainConfig(TrainOptions):
    """A run: where the data, base model and output are, and the hyper-parameters
    (:class:`~engine.train.recipes.TrainOptions`, a recipe's or the small-run defaults)."""

    data: Path
    images: Path
    base: str  # a model folder or hub name (see engine.generator.load.generator_location)
    out: Path
    max_steps: int = 0  # 0: as many as the epochs take
    resume: str | None = None  # "latest" or a checkpoint folder
    save_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0
    cpu: bool = False
    progress: bool = True
    cache_dir: Path | None = None  # where hub models are downloaded to
    local_files_only: bool = False  # offline: never download


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this run only
    adapter: Path | None = None
    resumed_from: Path | None = None
    main_process: bool = True  # False on the other processes of a multi-GPU run


# ------------------------------------------------------------------------------ the model


def lora_targets(model) -> list[str]:
    """Full names of the language model's linear layers: attention and MLP projections.

    The vision tower, the projector and the output head are left out (RAP's
    ``find_all_linear_names`` does the same). Works for LLaVA, LLaVA-Phi-3 (fused ``qkv_proj``
    and ``gate_up_proj``) and Qwen2-VL without a per-architecture list.
    """
    import torch

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if _VISION.search(name) or any(p in name for p in _PROJECTOR):
            continue
        names.append(name)
    if not names:
        raise InvalidInputError("Found no language-model linear layers to put LoRA on.")
    return names


def projector_modules(model) -> list[str]:
    names = [n for n, _ in model.named_modules() if n.endswith(_PROJECTOR)]
    if not names:
        raise InvalidInputError("--train-projector: this model has no projector module I know.")
    return [min(names, key=len)]


def add_lora(model, config: TrainConfig):
    """Freeze the model and wrap it with trainable LoRA adapters (and the projector)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    targets = lora_targets(model)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # An anchored regex on full names: "q_proj" alone would also match the vision tower.
        target_modules="^(" + "|".join(re.escape(n) for n in targets) + ")$",
        modules_to_save=projector_modules(model) if config.train_projector else None,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft <-> transformers 5 deprecation noise, not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return get_peft_model(model, lora)


def parameter_groups(model, config: TrainOptions) -> list[dict]:
    """The trainable parameters as optimizer groups: the projector at ``projector_lr`` when
    one is set (LLaVA's ``--mm_projector_lr``), everything else (LoRA) at ``lr``."""
    projector, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            is_projector = any(p in name for p in _PROJECTOR)
            (projector if is_projector and config.projector_lr is not None else rest).append(param)
    groups = [{"params": rest, "lr": config.lr}]
    if projector:
        groups.append({"params": projector, "lr": config.projector_lr})
    return groups


def load_base(config: TrainConfig, device, bf16: bool):
    """The base model (on ``device``) and its processor, through the generator's loader."""
    from engine.generator.hf import Generator

    generator = Generator.load(
        config.base,
        device=str(device),
        dtype="bfloat16" if bf16 else "float32",
        cache_dir=config.cache_dir,
        local_files_only=config.local_files_only,
    )
    model, processor = generator.model, generator.processor
    if config.template:  # the conversation template the recipe's base was trained with
        from engine.generator.templates import TEMPLATES

        if config.template not in TEMPLATES:
            raise InvalidInputError(f"Unknown template '{config.template}'")
        processor.chat_template = TEMPLATES[config.template]
    # No KV cache while training (checkpointing requires it); the text model has its own flag.
    for config_ in (model.config, getattr(model.config, "text_config", None)):
        if config_ is not None:
            config_.use_cache = False
    return model, processor


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing on every decoder layer.

    Non-reentrant checkpointing works with frozen inputs, so LoRA needs no
    ``enable_input_require_grads``. transformers 5 renamed the method; older ones have the old.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------- checkpoints


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """``resume`` = "latest" (the newest complete checkpoint in ``out``, if any) or a folder."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / STATE_FILE).is_file():
            raise InvalidInputError(f"Not a training checkpoint (no {STATE_FILE}): {path}")
        return path
    steps = [(step, p) for step, p in _checkpoints(out) if (p / STATE_FILE).is_file()]
    return max(steps)[1] if steps else None


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints in ``out``, oldest first."""
    found = []
    for path in out.glob(CHECKPOINT_PREFIX + "*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, model, optimizer, scheduler, out: Path, state: dict) -> Path:
    """Write ``checkpoint-STEP`` atomically (temporary folder, then rename); keep the newest."""
    import torch

    final = out / f"{CHECKPOINT_PREFIX}{state['step']}"
    tmp = out / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: marks it complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(out: Path, keep: int) -> None:
    done = _checkpoints(out)
    for _, path in done[: max(0, len(done) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path) -> dict:
    """Restore adapter weights, optimizer, scheduler and this process's RNG; the saved state."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng_state_{accelerator.process_index}.pt"
    if rng.is_file():  # resuming on fewer/more processes: the others start from the seed
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / STATE_FILE).read_text())


# ------------------------------------------------------------------------------ the data


class EpochShuffle:
    """Sampler: a fresh permutation per epoch, fixed by (seed, epoch) — reproducible on resume."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = list(range(self.size))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return iter(order)


# ------------------------------------------------------------------------------ the loop


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train rap", unit="step")


def train(config: TrainConfig) -> TrainResult:
    """Fine-tune LoRA on RAP data; returns the final step and this run's per-step losses."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    if config.batch_size < 1 or config.grad_accum < 1 or config.epochs < 1:
        raise InvalidInputError("--batch-size, --grad-accum and --epochs must be at least 1.")
    cuda = torch.cuda.is_available() and not config.cpu
    bf16 = config.bf16 and cuda and torch.cuda.is_bf16_supported()
    if config.bf16 and not bf16:
        log.warning("bf16 needs a GPU that supports it; training in fp32")
    accelerator = Accelerator(
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=config.grad_accum,
        cpu=not cuda,
    )
    set_seed(config.seed)
    out = Path(config.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    records = load_records(config.data)
    if config.drop_over_max_concepts:
        records = drop_over_max_concepts(records, config.max_concepts)
    model, processor = load_base(config, accelerator.device, bf16)
    if config.gradient_checkpointing:
        enable_checkpointing(model)
    model = add_lora(model, config)
    model.train()

    dataset = RapDataset(
        records,
        processor,
        config.images,
        max_concepts=config.max_concepts,
        noise_concepts=config.noise_concepts,
        max_length=config.max_length,
        seed=config.seed,
    )
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    sampler = EpochShuffle(len(dataset), config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=RapCollator(pad_id),
        num_workers=config.num_workers,
        # Its own generator: creating a loader iterator then draws no numbers from the global
        # RNG, so a resumed run's dropout masks match the uninterrupted run's.
        generator=torch.Generator().manual_seed(config.seed),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config), lr=config.lr, weight_decay=config.weight_decay
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total = config.max_steps or steps_per_epoch * config.epochs
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per
    # process, and `total` already counts this process's share of the data).
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * total), total
    )

    state = {"step": 0, "epoch": 0, "batch": 0}
    resumed = find_checkpoint(out, config.resume) if config.resume else None
    if resumed is not None:
        saved = load_checkpoint(accelerator, model, optimizer, scheduler, resumed)
        state.update({k: saved[k] for k in state})
        log.info("resuming from %s (step %d)", resumed, state["step"])
    elif config.resume and config.resume != "latest":
        raise InvalidInputError(f"No checkpoint at {config.resume}")

    result = TrainResult(
        state["step"], resumed_from=resumed, main_process=accelerator.is_main_process
    )
    log_file = out / LOG_FILE
    bar = _progress(total, state["step"], config.progress and accelerator.is_local_main_process)
    window: list[float] = []  # micro-batch losses of the current optimizer step
    started = time.monotonic()
    try:
        while state["step"] < total:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            loader.set_epoch(epoch)
            batches = (
                accelerator.skip_first_batches(loader, state["batch"]) if state["batch"] else loader
            )
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
                window.append(loss.detach().float())
                state["batch"] += 1
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state["step"] += 1
                step_loss = accelerator.gather(torch.stack(window).mean()).mean().item()
                window = []
                result.losses.append(step_loss)
                lr = scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if accelerator.is_main_process:
                    with log_file.open("a") as f:
                        f.write(
                            json.dumps(
                                {"step": state["step"], "epoch": epoch, "loss": step_loss, "lr": lr}
                            )
                            + "\n"
                        )
                done = state["step"] >= total
                if done or state["step"] % config.save_every == 0:
                    at_end = state["batch"] >= len(loader)
                    saved = dict(state)
                    if at_end:  # the next run starts the next epoch from its first batch
                        saved.update(epoch=epoch + 1, batch=0)
                    saved["config"] = _jsonable(config)
                    save_checkpoint(accelerator, model, optimizer, scheduler, out, saved)
                    if accelerator.is_main_process:
                        prune_checkpoints(out, config.keep_checkpoints)
                if done:
                    break
            else:
                state.update(epoch=epoch + 1, batch=0)
                continue
            break
    finally:
        bar.close()
    result.step = state["step"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)
        summary = {"step": state["step"], "seconds": round(time.monotonic() - started, 1)}
        (out / "rap_train.json").write_text(
            json.dumps({**summary, "config": _jsonable(config)}, indent=2)
        )
    result.adapter = out
    accelerator.end_training()
    return result


def _jsonable(config: TrainConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
