"""RAP's Generate step: multimodal LLMs answering with the retrieved concepts in their prompt.

- :mod:`engine.generator.prompt`: the RAP prompt (pure) and K from the context budget.
- :mod:`engine.generator.templates`: chat templates of the RAP checkpoints (vicuna_v1, phi3).
- :mod:`engine.generator.hf`: :class:`~engine.generator.hf.Generator` over transformers
  (generate, stream, LoRA adapters).
- :mod:`engine.generator.rap`: the engine's retrieval results -> the prompt's concepts.
- :mod:`engine.generator.load`: the ``generator`` setting -> a loaded Generator (or None).
- :mod:`engine.generator.tiny`: tiny random LLaVA / Qwen2-VL built offline for tests.
- :mod:`engine.generator.convert`: original LLaVA-format checkpoints -> transformers.

Nothing here imports transformers at import time; the heavy imports happen on first use.
"""
