"""Contrastive training and evaluation of the CIR-LVLM encoder (``rapbot train/eval cir``).

Triplet files are a JSON list or JSON lines; image names are looked up under the image folder
as given, then with ``.png``, ``.jpg``, ``.jpeg``, ``.webp`` added (and 12-digit zero-padded,
for COCO/CIRCO ids). Supported records:

* CIRR: ``{"reference", "target_hard", "caption", "img_set": {"members": [...]}}`` (``img_set``
  optional; it enables Recall_subset@K).
* FashionIQ: ``{"candidate", "target", "captions": [c1, c2]}``; the captions are joined with
  " and " as in the FashionIQ baselines.
* CIRCO: ``{"reference_img_id", "target_img_id", "relative_caption", "gt_img_ids": [...]}``
  (``gt_img_ids`` are the several ground truths for mAP@K).

Training: InfoNCE over in-batch negatives, ``logits = q @ t.T / temperature``, with in-batch
copies of a query's own target image masked out, plus ``key_loss_weight`` times the prompt
pool's key-matching loss. Only the LoRA weights and the prompt pool train. A checkpoint
``checkpoint-STEP`` (every ``save_every`` steps and at the end) holds those weights, the
optimizer and ``state.json``; the batch order is a function of (seed, step), so ``--resume``
continues exactly. The final weights are ``cir_encoder.pt`` + ``cir_config.json`` in ``out``,
and the base VLM is put beside them in ``out/base`` (hard links to a local base folder where the
file system allows, else a copy), so that the folder alone loads the encoder, offline, wherever
it is moved (:func:`load_encoder`; the photo search's ``RAPBOT_SEARCH_MODEL``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cir.lvlm import INSTRUCTIONS, CirLvlmEncoder
from engine.errors import InvalidInputError, MissingWeightError
from engine.progress import Progress, counter
from engine.weights import first_line

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
ENCODER_FILE = "cir_encoder.pt"
CONFIG_FILE = "cir_config.json"
BASE_DIR = "base"  # the base VLM, inside the output folder
_EXTS = ("", ".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Triplet:
    reference: str
    text: str
    target: str
    subset: tuple[str, ...] | None = None  # CIRR img_set members
    positives: tuple[str, ...] = ()  # CIRCO ground truths (default: the target)
    kind: str = "cirr"  # the benchmark its format comes from: cirr, fashioniq, circo, shoes


def parse_record(rec: dict) -> Triplet:
    if "target_hard" in rec:  # CIRR
        members = (rec.get("img_set") or {}).get("members")
        return Triplet(
            str(rec["reference"]),
            str(rec["caption"]),
            str(rec["target_hard"]),
            tuple(map(str, members)) if members else None,
            kind="cirr",
        )
    if "candidate" in rec:  # FashionIQ: two captions joined as SEARLE/CLIP4Cir join them
        caps = rec.get("captions") or [rec.get("caption", "")]
        text = " and ".join(c.strip(".?, ") for c in caps if c and c.strip(".?, "))
        return Triplet(str(rec["candidate"]), text, str(rec["target"]), kind="fashioniq")
    if "reference_img_id" in rec:  # CIRCO
        gts = tuple(str(g) for g in rec.get("gt_img_ids") or [rec["target_img_id"]])
        return Triplet(
            str(rec["reference_img_id"]),
            str(rec["relative_caption"]),
            str(rec.get("target_img_id", gts[0])),
            positives=gts,
            kind="circo",
        )
    if "ReferenceImageName" in rec:  # Shoes (relative_captions_shoes.json)
        return Triplet(
            _image_stem(str(rec["ReferenceImageName"])),
            str(rec["RelativeCaption"]).strip(),
            _image_stem(str(rec["ImageName"])),
            kind="shoes",
        )
    raise InvalidInputError(
        f"unknown CIR record (not CIRR, FashionIQ, CIRCO or Shoes): {sorted(rec)}"
    )


def _image_stem(name: str) -> str:
    """``img_womens_clogs_851.jpg`` -> ``img_womens_clogs_851`` (found again by ImageCache)."""
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and f".{suffix.lower()}" in _EXTS else name


def load_triplets(path: str | Path) -> list[Triplet]:
    text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not records:
        raise InvalidInputError(f"no triplets in {path}")
    return [parse_record(r) for r in records]


class ImageCache:
    """Images by name under a folder, as RGB, the ``max_items`` most recently used kept decoded
    (training draws batches at random and evaluation walks galleries of 100k+ images: keeping
    every decoded image would grow without bound)."""

    def __init__(self, root: str | Path, max_items: int = 512) -> None:
        self.root = Path(root).expanduser()
        self.max_items = max(0, int(max_items))
        self._cache: OrderedDict[str, object] = OrderedDict()

    def path(self, name: str) -> Path:
        candidates = [name] + ([name.zfill(12)] if name.isdigit() else [])
        for stem in candidates:
            for ext in _EXTS:
                p = self.root / f"{stem}{ext}"
                if p.is_file():
                    return p
        raise InvalidInputError(f"image {name!r} not found under {self.root}")

    def __call__(self, name: str):
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        from engine.images import load_image_file

        image = load_image_file(self.path(name))
        if self.max_items:
            self._cache[name] = image
            if len(self._cache) > self.max_items:
                self._cache.popitem(last=False)
        return image


@dataclass
class CirTrainConfig:
    data: Path
    images: Path
    base: str
    out: Path
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    temperature: float = 0.05
    key_loss_weight: float = 0.1
    pool_size: int = 8
    prompt_len: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    progress: bool = True
    device: str = "cpu"


@dataclass
class CirTrainResult:
    step: int
    out: Path
    losses: list[float] = field(default_factory=list)
    prompt_usage: list[int] = field(default_factory=list)  # selections per pool prompt


def encoder_kwargs(config: CirTrainConfig) -> dict:
    return {
        "pool_size": config.pool_size,
        "prompt_len": config.prompt_len,
        "lora_r": config.lora_r,
        "lora_alpha": config.lora_alpha,
    }


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The items of optimizer step ``step``: a stream of seeded per-epoch permutations."""
    out, perms = [], {}
    start = step * batch_size
    for pos in range(start, start + min(batch_size, n)):
        epoch, i = divmod(pos, n)
        if epoch not in perms:  # one shuffle per epoch touched, not one per item
            perms[epoch] = list(range(n))
            random.Random(seed * 1_000_003 + epoch).shuffle(perms[epoch])
        out.append(perms[epoch][i])
    return out


def info_nce(q: torch.Tensor, t: torch.Tensor, targets: list[str], temperature: float):
    """Cross-entropy of each query over the batch's targets; duplicates of its target masked."""
    logits = q @ t.T / temperature
    same = torch.tensor([[a == b for b in targets] for a in targets], device=logits.device)
    eye = torch.eye(len(targets), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(targets), device=logits.device))


def train_step(encoder, optimizer, triplets, images: ImageCache, config) -> float:
    encoder.train()
    q = encoder.encode_queries([images(t.reference) for t in triplets], [t.text for t in triplets])
    tg = encoder.encode_targets([images(t.target) for t in triplets])
    loss = info_nce(q.embeddings, tg.embeddings, [t.target for t in triplets], config.temperature)
    loss = loss + config.key_loss_weight * q.key_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _checkpoints(out: Path) -> list[Path]:
    found = [
        p for p in out.glob(CHECKPOINT_PREFIX + "*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def save_checkpoint(encoder, optimizer, step: int, losses: list[float], config) -> Path:
    out = Path(config.out)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".tmp-{CHECKPOINT_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(encoder.trainable_state(), tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    usage = encoder.pool.usage.tolist()  # the usage penalty's history: resumed exactly
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "losses": losses, "prompt_usage": usage})
    )
    log.info("cir checkpoint step=%d prompt_usage=%s", step, usage)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # never a half-written checkpoint
    for old in _checkpoints(out)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # follows the hub cache's symlinks to their blobs
    except OSError:
        shutil.copy2(src, dst)


def _base_folder(base: str) -> Path | None:
    """The local folder of a base VLM: the folder given, or a hub name's cached snapshot."""
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base), local_files_only=True))
    except Exception:
        return None


def save_base(encoder, base: str, out: Path) -> None:
    """Put the base VLM in ``out/base``: its folder's files (hard-linked where possible), or, if
    it has no local folder, the model and processor as loaded (the weights without LoRA)."""
    dest, tmp = out / BASE_DIR, out / f".tmp-{BASE_DIR}"
    source = _base_folder(base)
    if source is not None and dest.exists() and source.resolve() == dest.resolve():
        return
    shutil.rmtree(tmp, ignore_errors=True)
    if source is not None:
        ignore = shutil.ignore_patterns(".git", ".cache", "*.lock")
        shutil.copytree(source, tmp, copy_function=_link_or_copy, ignore=ignore)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
        model.save_pretrained(tmp)
        encoder.processor.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def save_encoder(encoder, config: CirTrainConfig) -> None:
    out = Path(config.out)
    save_base(encoder, str(config.base), out)
    torch.save(encoder.trainable_state(), out / ENCODER_FILE)
    meta = {
        "base": BASE_DIR,
        "base_source": str(config.base),
        "instructions": INSTRUCTIONS,  # the wording it learned; loading checks it
        **encoder_kwargs(config),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def encoder_base(folder: str | Path) -> tuple[dict, str]:
    """(the encoder's settings, its base VLM's location) from a ``rapbot train cir`` folder;
    a clear :class:`MissingWeightError` when the folder is not one."""
    folder = Path(folder).expanduser()
    for name in (CONFIG_FILE, ENCODER_FILE):
        if not (folder / name).is_file():
            raise MissingWeightError(
                f"No CIR-LVLM encoder in {folder}: {name} is missing (give the folder that"
                " `rapbot train cir --out` wrote)."
            )
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        base = str(meta.pop("base"))
    except (OSError, ValueError, KeyError, AttributeError) as error:
        message = f"Unreadable {folder / CONFIG_FILE}: {first_line(error)}"
        raise MissingWeightError(message) from None
    meta.pop("base_source", None)
    # Folders written before the wording was recorded were trained under today's wording
    # (unchanged since the encoder was added).
    trained = meta.pop("instructions", INSTRUCTIONS)
    if trained != INSTRUCTIONS:
        trained = trained if isinstance(trained, dict) else {}
        changed = [k for k, text in INSTRUCTIONS.items() if trained.get(k) != text]
        raise MissingWeightError(
            f"The CIR-LVLM encoder in {folder} was trained with other {'/'.join(changed)}"
            " instructions than this version encodes with; train it again with `rapbot train"
            " cir` (its embeddings would not match)."
        )
    inside = folder / base
    # Folders from before the base was saved inside name it by its own path or hub name.
    return meta, str(inside) if inside.is_dir() else base


def load_encoder(folder: str | Path, device: str = "cpu") -> CirLvlmEncoder:
    """A trained encoder from ``rapbot train cir``'s output folder (with its ``base``: offline)."""
    folder = Path(folder).expanduser()
    meta, base = encoder_base(folder)
    try:
        encoder = CirLvlmEncoder.from_pretrained(
            base, device=device, local_files_only=Path(base).is_dir(), **meta
        )
        state = torch.load(folder / ENCODER_FILE, map_location=device)
        encoder.load_trainable_state(state)
    except (OSError, ValueError, RuntimeError) as error:
        raise MissingWeightError(
            f"Could not load the CIR-LVLM encoder in {folder} (base {base}): {first_line(error)}"
        ) from None
    return encoder.eval()


def train(config: CirTrainConfig, encoder: CirLvlmEncoder | None = None) -> CirTrainResult:
    triplets = load_triplets(config.data)
    images = ImageCache(config.images)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    if encoder is None:
        encoder = CirLvlmEncoder.from_pretrained(
            config.base, device=config.device, **encoder_kwargs(config)
        )
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    step, losses = 0, []
    if config.resume:
        found = _checkpoints(out)
        ckpt = found[-1] if config.resume == "latest" and found else Path(config.resume)
        if config.resume == "latest" and not found:
            raise InvalidInputError(f"--resume: no checkpoint in {out}")
        encoder.load_trainable_state(torch.load(ckpt / "trainable.pt", map_location="cpu"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu"))
        state = json.loads((ckpt / "state.json").read_text())
        step, losses = state["step"], state["losses"]
        if "prompt_usage" in state:
            encoder.pool.usage.copy_(torch.tensor(state["prompt_usage"], dtype=torch.long))
    (out / "train_config.json").write_text(json.dumps(asdict(config), default=str, indent=2))
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, desc="train cir", unit="step")
    while step < config.steps:
        batch = [
            triplets[i] for i in batch_indices(len(triplets), config.batch_size, step, config.seed)
        ]
        losses.append(train_step(encoder, optimizer, batch, images, config))
        step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % config.save_every == 0 or step == config.steps:
            save_checkpoint(encoder, optimizer, step, losses, config)
    if bar is not None:
        bar.close()
    save_encoder(encoder, config)
    return CirTrainResult(step, out, losses, encoder.pool.usage.tolist())


def gallery_names(triplets: list[Triplet]) -> list[str]:
    """Every image the triplets name (the gallery when none is given: CIRR and Shoes only)."""
    names: dict[str, None] = {}
    for t in triplets:
        for n in (t.reference, t.target, *(t.subset or ()), *t.positives):
            names.setdefault(n, None)
    return list(names)


@torch.no_grad()
def embed(
    encoder,
    triplets: list[Triplet],
    images: ImageCache,
    batch_size: int = 32,
    gallery: list[str] | None = None,
    progress: Progress | None = None,
    stage: str = "eval cir",
):
    """(query embeddings, gallery embeddings, gallery names); the gallery is ``gallery`` or
    every image the triplets name. Images are loaded one batch at a time (not kept).
    ``progress(stage, done, total)`` counts the queries and gallery images encoded."""
    encoder.eval()
    names = list(gallery) if gallery is not None else gallery_names(triplets)
    tick = counter(progress, stage, len(triplets) + len(names))
    qs, gs = [], []
    for i in range(0, len(triplets), batch_size):
        chunk = triplets[i : i + batch_size]
        qs.append(
            encoder.encode_queries(
                [images(t.reference) for t in chunk], [t.text for t in chunk]
            ).embeddings.cpu()
        )
        tick(len(chunk))
    for i in range(0, len(names), batch_size):
        batch = [images(n) for n in names[i : i + batch_size]]
        gs.append(encoder.encode_targets(batch).embeddings.cpu())
        tick(len(batch))
    return torch.cat(qs), torch.cat(gs), names


def evaluate(
    encoder,
    triplets: list[Triplet],
    images: ImageCache,
    batch_size: int = 32,
    gallery: list[str] | None = None,
    progress: Progress | None = None,
    stage: str = "eval cir",
) -> dict:
    """The benchmark's metrics in percent under its official protocol
    (:mod:`engine.eval.cir_protocol`): ``gallery`` is the split's image names (required for
    FashionIQ and CIRCO); the reference is left out of its own ranking for CIRR only.
    ``progress``: see :func:`embed`."""
    from engine.eval import cir_protocol
    from engine.eval.cir_metrics import rank_gallery

    kinds = {t.kind for t in triplets}
    if len(kinds) != 1:
        raise InvalidInputError(f"one benchmark's triplets at a time, not {sorted(kinds)}")
    kind = kinds.pop()
    cir_protocol.check_gallery(kind, gallery, triplets)
    q, g, names = embed(encoder, triplets, images, batch_size, gallery, progress, stage)
    exclude = [t.reference for t in triplets] if cir_protocol.excludes_reference(kind) else None
    rankings = rank_gallery(q, g, names, exclude=exclude)
    return cir_protocol.score(kind, rankings, triplets)


def evaluate_files(
    encoder,
    sets: list[str | Path],
    galleries: list[str] | None = None,
    images: str | Path | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """``rapbot eval cir``: each triplet file scored under its benchmark's protocol, keyed by
    the file's name (FashionIQ: its category), with ``galleries`` one per file or one for all;
    several FashionIQ categories add their ``average``. ``progress(file name, done, total)``
    counts each file's queries and gallery images as they are encoded."""
    from engine.eval import cir_protocol

    galleries = list(galleries or [])
    if galleries and len(galleries) not in (1, len(sets)):
        raise InvalidInputError("Give one --gallery for all sets or one per set.")
    results: dict[str, dict[str, float]] = {}
    kinds = set()
    for i, path in enumerate(sets):
        path = Path(path).expanduser()
        triplets = load_triplets(path)
        kinds.add(triplets[0].kind)
        spec = galleries[i if len(galleries) > 1 else 0] if galleries else None
        gallery = cir_protocol.read_gallery(spec) if spec else None
        root = ImageCache(Path(images).expanduser() if images else path.parent)
        scores = evaluate(encoder, triplets, root, batch_size, gallery, progress, path.name)
        key = path.name
        if triplets[0].kind == "fashioniq":
            key = cir_protocol.fashioniq_category(path)
        results[key] = scores
    if kinds == {"fashioniq"} and len(results) > 1:
        results["average"] = cir_protocol.average_categories(results)
    return results
