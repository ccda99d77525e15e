"""The configured generator: which model a ``generator`` setting names, and loading it.

Values of ``RAPBOT_GENERATOR`` (or a profile's ``generator``):

- ``""`` / ``none``: no LLM; answers are the recognition-only sentences.
- ``tiny-llava`` / ``tiny-qwen2-vl``: built offline, once, in ``<data_dir>/models/tiny/``.
- ``rap-llava`` / ``rap-phi3``: the released RAP checkpoints after ``rapbot models convert``,
  expected in ``<data_dir>/models/RAP-LLaVA-13b-hf`` / ``RAP-Phi3-mini-hf``.
- a folder: a transformers checkpoint (``config.json`` + weights + processor files).
- any other name: a Hugging Face hub repo (``llava-hf/llava-1.5-7b-hf``,
  ``Qwen/Qwen2-VL-2B-Instruct`` ...), downloaded once into ``<data_dir>/models/hf``.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import MissingWeightError
from engine.generator.tiny import TINY_MODELS, tiny_model_path
from engine.profiles import Profile
from engine.settings import EngineSettings
from engine.weights import is_offline, looks_like_path, models_dir

# Converted RAP checkpoints: alias -> (folder under <data_dir>/models, source repo, template).
RAP_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "rap-llava": ("RAP-LLaVA-13b-hf", "Hoar012/RAP-LLaVA-13b", "vicuna_v1"),
    "rap-phi3": ("RAP-Phi3-mini-hf", "Hoar012/RAP-Phi3-mini", "phi3"),
}
OFF = ("", "none", "off")


def generator_location(spec: str, settings: EngineSettings, seed: int = 0) -> str | None:
    """What ``Generator.load`` is given for a setting: a folder or a hub name; None = off."""
    spec = spec.strip()
    if spec.lower() in OFF:
        return None
    if spec in TINY_MODELS:
        return str(tiny_model_path(spec, models_dir(settings) / "tiny", seed=seed))
    if spec in RAP_CHECKPOINTS:
        folder, repo, template = RAP_CHECKPOINTS[spec]
        path = models_dir(settings) / folder
        if not (path / "config.json").is_file():
            raise MissingWeightError(
                f"Generator '{spec}' is not converted yet: download {repo} into a folder SRC, run "
                f"`rapbot models convert SRC {path} --template {template}`, or set "
                "RAPBOT_GENERATOR=none for recognition-only answers."
            )
        return str(path)
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise MissingWeightError(
                f"Generator model folder not found: {path} (a transformers checkpoint with "
                "config.json; set RAPBOT_GENERATOR to its folder)."
            )
        return str(path)
    return spec  # a hub repo name


def load_generator(profile: Profile, settings: EngineSettings):
    """The profile's generator, loaded, or None for recognition-only answers."""
    location = generator_location(profile.generator, settings, seed=profile.seed)
    if location is None:
        return None
    from engine.generator.hf import Generator

    return Generator.load(
        location,
        device=settings.device,
        load_in_4bit=settings.generator_load_in_4bit,
        load_in_8bit=settings.generator_load_in_8bit,
        adapter=settings.generator_adapter or None,
        cache_dir=models_dir(settings) / "hf",
        local_files_only=is_offline(settings),
        max_new_tokens=settings.generator_max_new_tokens,
        context_tokens=settings.generator_context_tokens,
        max_concepts=settings.generator_max_concepts,
    )
