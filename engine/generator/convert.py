"""Convert an original LLaVA-repository checkpoint into transformers' LLaVA format.

The released RAP checkpoints (``Hoar012/RAP-LLaVA-13b``: LLaVA-1.5-13B, trained with the
``vicuna_v1`` conversation template; ``Hoar012/RAP-Phi3-mini``: LLaVA-Phi-3-mini with ``phi3``)
are in the format of the LLaVA repository: one causal LM config with ``mm_*`` fields, and
weights named

    model.embed_tokens / model.layers.N.* / model.norm / lm_head     the language model
    model.mm_projector.0 / .2                                        the mlp2x_gelu projector
    model.vision_tower.vision_tower.vision_model.*                   the CLIP vision tower

The conversion maps the config (vision feature layer and selection, projector, image padding,
context length), renames the weights shard by shard (never the whole model in memory), adds the
``<image>`` token to the tokenizer (and an embedding row for it when the vocabulary has none
spare: the mean row, since image-token embeddings are replaced by image features anyway), and
writes a processor whose chat template reproduces the original conversation template.

Prompts for a converted model are tokenized as the LLaVA repository tokenizes them (text
between images piece by piece, see :mod:`engine.generator.tokens`), so its token ids are the
ones the checkpoint saw in training. Nothing in a checkpoint is executed: configs are read as
JSON, ``trust_remote_code`` is off, and ``auto_map`` (LLaVA-Phi-3's custom classes) is dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path

from engine.errors import InvalidInputError, MissingWeightError
from engine.generator.templates import TEMPLATES

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_VISION_PREFIX = "model.vision_tower.vision_tower."
_PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
# Original text architectures we convert, by what their model_type / architectures mention.
_TEXT_TYPES = (("phi3", "phi3"), ("phi", "phi3"), ("llama", "llama"), ("vicuna", "llama"))
# Config keys of the LLaVA repository that are not the language model's.
_LLAVA_ONLY = re.compile(
    r"^(mm_|image_|tokenizer_|tune_|freeze_|unfreeze_|use_mm_|s2|pretrain_)|"
    r"^(architectures|model_type|_name_or_path|transformers_version|torch_dtype|dtype|auto_map)$"
)
# What OpenAI's CLIP vision towers (the ones LLaVA uses) have in common, for inferring their
# config from the weights when no config.json is at hand.
_CLIP_HEAD_DIM = 64
_MAX_SHARD_BYTES = 4 * 1024**3


def original_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise MissingWeightError(f"No config.json in {src}: not a model checkpoint folder.")
    config = json.loads(path.read_text())
    if config.get("model_type") == "llava" and "text_config" in config:
        raise InvalidInputError(f"{src} is already a transformers LLaVA checkpoint.")
    if "mm_vision_tower" not in config and "mm_projector_type" not in config:
        raise InvalidInputError(
            f"{src} is not an original LLaVA checkpoint (no mm_vision_tower in config.json)."
        )
    return config


def text_model_type(config: dict) -> str:
    """``llama`` or ``phi3``: the language model under the original LLaVA wrapper."""
    described = " ".join([str(config.get("model_type", "")), *config.get("architectures", [])])
    for needle, kind in _TEXT_TYPES:
        if needle in described.lower():
            return kind
    raise InvalidInputError(
        f"Unsupported original LLaVA language model '{config.get('model_type')}' "
        "(LLaVA-1.5 / Vicuna / Llama and LLaVA-Phi-3 are supported)."
    )


def default_template(config: dict) -> str:
    return "phi3" if text_model_type(config) == "phi3" else "vicuna_v1"


def text_config(config: dict, vocab_size: int):
    """The language model's transformers config from the original config's fields."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if not _LLAVA_ONLY.search(k)}
    fields["vocab_size"] = vocab_size
    return AutoConfig.for_model(text_model_type(config), **fields)


def map_key(key: str) -> str | None:
    """The transformers name of an original weight; None for weights LLaVA never used."""
    if key.startswith(_VISION_PREFIX):
        rest = key[len(_VISION_PREFIX) :]
        rest = rest.removeprefix("vision_model.")
        return None if rest.endswith("position_ids") else "model.vision_tower." + rest
    for old, new in _PROJECTOR.items():
        if key.startswith(old):
            return "model.multi_modal_projector." + new + key[len(old) :]
    if key.startswith(("model.mm_projector.", "model.image_newline")):
        raise InvalidInputError(
            f"Weight {key}: only LLaVA-1.5's mlp2x_gelu projector without image newlines "
            "(not LLaVA-NeXT's anyres) can be converted."
        )
    if key.startswith("model.vision_resampler"):
        return None
    if key.startswith("lm_head."):
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    raise InvalidInputError(f"Unexpected weight in an original LLaVA checkpoint: {key}")


# ----------------------------------------------------------------------------- weights


def _shards(src: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            names = sorted(set(json.loads((src / index).read_text())["weight_map"].values()))
            return [src / name for name in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).is_file():
            return [src / single]
    raise MissingWeightError(f"No weights in {src} (model.safetensors or pytorch_model.bin).")


def _read_shard(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def original_weights(src: Path) -> Iterator[tuple[str, object]]:
    """``(name, tensor)`` of every weight, one shard in memory at a time."""
    for shard in _shards(src):
        tensors = _read_shard(shard)
        yield from tensors.items()
        del tensors


def _key_index(src: Path) -> dict[str, Path]:
    """Which shard holds each weight, read from the index or the file headers."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            weight_map = json.loads((src / index).read_text())["weight_map"]
            return {key: src / name for key, name in weight_map.items()}
    found: dict[str, Path] = {}
    for shard in _shards(src):
        if shard.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(shard), "pt") as f:
                found.update(dict.fromkeys(f.keys(), shard))
        else:
            found.update(dict.fromkeys(_read_shard(shard), shard))
    return found


def _tensor(src: Path, index: dict[str, Path], name: str):
    """One weight, reading as little as the file format allows."""
    if name not in index:
        raise InvalidInputError(f"{src} has no weight {name}.")
    shard = index[name]
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            return f.get_tensor(name)
    return _read_shard(shard)[name]


# ----------------------------------------------------------------------------- vision tower


def vision_config(config: dict, src: Path, vision_tower: str | None, local_files_only: bool):
    """The CLIP vision config: from a folder (``--vision-tower`` or a local ``mm_vision_tower``),
    else inferred from the checkpoint's vision weights (OpenAI CLIP's conventions)."""
    from transformers import CLIPVisionConfig

    ref = vision_tower or config.get("mm_vision_tower", "")
    if ref and (Path(ref).expanduser() / "config.json").is_file():
        return CLIPVisionConfig.from_pretrained(str(Path(ref).expanduser()))
    prefix = _VISION_PREFIX + "vision_model."
    index = _key_index(src)
    keys = {k for k in index if k.startswith(prefix)}
    if not keys:
        try:
            return CLIPVisionConfig.from_pretrained(ref, local_files_only=local_files_only)
        except OSError as error:
            raise MissingWeightError(
                f"The checkpoint has no vision tower weights and '{ref}' is not available "
                f"({str(error).splitlines()[0]}): pass --vision-tower /path/to/{Path(ref).name}."
            ) from None
    patch = _tensor(src, index, prefix + "embeddings.patch_embedding.weight")
    positions = _tensor(src, index, prefix + "embeddings.position_embedding.weight").shape[0]
    fc1 = _tensor(src, index, prefix + "encoder.layers.0.mlp.fc1.weight")
    layers = 1 + max(int(m.group(1)) for k in keys if (m := re.search(r"layers\.(\d+)\.", k)))
    hidden = patch.shape[0]
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // _CLIP_HEAD_DIM),
        patch_size=patch.shape[-1],
        image_size=int(math.isqrt(positions - 1)) * patch.shape[-1],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _external_vision_weights(ref: str, local_files_only: bool) -> dict:
    """Vision tower weights from ``mm_vision_tower`` when the checkpoint has none."""
    from transformers import CLIPVisionModel

    try:
        tower = CLIPVisionModel.from_pretrained(ref, local_files_only=local_files_only)
    except OSError as error:
        raise MissingWeightError(
            f"Vision tower '{ref}' is not available ({str(error).splitlines()[0]}): "
            f"pass --vision-tower /path/to/{Path(ref).name}."
        ) from None
    return {
        _VISION_PREFIX + "vision_model." + k.removeprefix("vision_model."): v
        for k, v in tower.state_dict().items()
    }


# ----------------------------------------------------------------------------- processor


def build_processor(src: Path, config: dict, vision, template: str, vision_tower: str | None):
    """Tokenizer with ``<image>``, LLaVA-1.5's image preprocessing, the conversation template."""
    from transformers import AutoTokenizer, LlavaImageProcessor, LlavaProcessor

    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", "resize", None):
        raise InvalidInputError(f"image_aspect_ratio '{aspect}' (LLaVA-NeXT) is not supported.")
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json too and warns that llava_llama is not a model type it
    # knows; that is expected here and says nothing useful to the person converting.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # LLaVA-Phi-3-style configs name custom code in auto_map: never run it (and never
        # stop at transformers' "run custom code?" prompt); the tokenizers are standard ones.
        tokenizer = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    added = (
        {"additional_special_tokens": [IMAGE_TOKEN]}
        if IMAGE_TOKEN not in tokenizer.get_vocab()
        else {}
    )
    if tokenizer.pad_token is None:
        added["pad_token"] = "<pad>"
    if added:
        tokenizer.add_special_tokens(added)
    tokenizer.model_max_length = int(
        config.get("tokenizer_model_max_length") or config.get("max_position_embeddings") or 2048
    )
    size = vision.image_size
    mean_std = _image_stats(vision_tower or config.get("mm_vision_tower", ""))
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_pad=aspect == "pad",  # expand2square with the mean colour, as LLaVA-1.5 trained
        **mean_std,
    )
    select = config.get("mm_vision_select_feature", "patch")
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default" if select == "patch" else "full",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=TEMPLATES[template],
        image_token=IMAGE_TOKEN,
    )


def _image_stats(ref: str) -> dict:
    """The vision tower's own normalisation when its folder is here (else CLIP's defaults)."""
    path = Path(ref).expanduser() / "preprocessor_config.json" if ref else None
    if path is None or not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("image_mean", "image_std") if k in data}


# ----------------------------------------------------------------------------- conversion


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    template: str | None = None,
    vision_tower: str | None = None,
    local_files_only: bool = True,
) -> Path:
    """Write ``dst``: a transformers LLaVA checkpoint with processor and chat template."""
    import torch
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    config = original_config(src)
    template = template or default_template(config)
    if template not in TEMPLATES:
        raise InvalidInputError(f"Unknown template '{template}' ({', '.join(TEMPLATES)}).")
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise InvalidInputError(
            f"Projector '{config.get('mm_projector_type')}': only mlp2x_gelu converts to "
            "transformers' LLaVA."
        )
    vision = vision_config(config, src, vision_tower, local_files_only)
    processor = build_processor(src, config, vision, template, vision_tower)
    tokenizer = processor.tokenizer
    vocab = max(len(tokenizer), int(config.get("vocab_size", 0)))
    select = config.get("mm_vision_select_feature", "patch")
    target = LlavaConfig(
        vision_config=vision,
        text_config=text_config(config, vocab),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision.image_size // vision.patch_size) ** 2
        + (0 if select == "patch" else 1),
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
    )
    with torch.device("meta"):  # names and shapes only: no memory, no init time
        expected = {
            k: tuple(v.shape) for k, v in LlavaForConditionalGeneration(target).state_dict().items()
        }

    dst.mkdir(parents=True, exist_ok=True)
    weights = original_weights(src)
    if not any(k.startswith(_VISION_PREFIX) for k in _key_index(src)):
        ref = vision_tower or config["mm_vision_tower"]
        external = _external_vision_weights(ref, local_files_only)
        weights = _chain(weights, external.items())
    written = _write_shards(weights, expected, vocab, dst)
    missing = sorted(set(expected) - written)
    if missing:
        raise InvalidInputError(f"The checkpoint lacks {len(missing)} weights, e.g. {missing[0]}.")

    target.save_pretrained(dst)
    processor.save_pretrained(dst)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=_stop_ids(tokenizer, template),
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(dst)
    log.info("converted %s -> %s (template %s)", src, dst, template)
    return dst


def _chain(*iterables):
    for iterable in iterables:
        yield from iterable


def _stop_ids(tokenizer, template: str) -> list[int]:
    ends = ["</s>"] if template.endswith("_v1") else ["<|end|>", "<|endoftext|>"]
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in ends if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _grow_vocab(tensor, rows: int):
    """Embedding/output rows for new tokens: the mean row (deterministic, neutral)."""
    import torch

    if tensor.shape[0] >= rows:
        return tensor
    extra = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, extra.expand(rows - tensor.shape[0], -1)], dim=0)


def _write_shards(weights, expected: dict[str, tuple], vocab: int, dst: Path) -> set[str]:
    """Renamed weights into safetensors shards of at most 4 GiB, plus the index."""
    from safetensors.torch import save_file

    shard: dict = {}
    size = 0
    files: list[tuple[str, list[str]]] = []
    written: set[str] = set()

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(dst / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size = {}, 0

    for key, tensor in weights:
        new = map_key(key)
        if new is None:
            continue
        if new.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = _grow_vocab(tensor, vocab)
        if new not in expected:
            raise InvalidInputError(f"Weight {key} has no place in the converted model ({new}).")
        if tuple(tensor.shape) != expected[new]:
            raise InvalidInputError(
                f"Weight {key} has shape {tuple(tensor.shape)}, expected {expected[new]}."
            )
        shard[new] = tensor.contiguous().clone()
        written.add(new)
        size += tensor.numel() * tensor.element_size()
        if size >= _MAX_SHARD_BYTES:
            flush()
    flush()
    _name_shards(files, dst)
    return written


def _name_shards(files: list[tuple[str, list[str]]], dst: Path) -> None:
    """transformers' naming: one ``model.safetensors``, or numbered shards and an index."""
    if len(files) == 1:
        (dst / files[0][0]).rename(dst / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for number, (name, keys) in enumerate(files, start=1):
        final = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        (dst / name).rename(dst / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
