"""Generation speed (time to first token, tokens/s) and RAP prompt length as K grows.

Tiny models on the CPU by default; ``--arch llava-1.5-7b`` or ``qwen2-vl-2b`` builds the
real-size architecture with random weights on a GPU (the compute, hence the speed, is the same
as with the real weights; no download needed). Every run generates exactly ``--new-tokens``
tokens (``min_new_tokens``), greedy, batch 1, from the RAP prompt with K concept images.

    python benchmarks/bench_generation.py [--arch tiny-llava,tiny-qwen2-vl] [--k 0,2]
        [--new-tokens 32] [--runs 3] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTION = "What is Mochi doing?"
COLOURS = [(200, 30, 30), (30, 160, 60), (40, 60, 220), (230, 200, 40), (120, 60, 160), (0, 0, 0)]


def real_size(arch: str, device: str):
    """A real-size architecture with random weights, and a processor for it."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from engine.generator.templates import CHATML_VISION_TEMPLATE, VICUNA_V1_TEMPLATE
    from engine.generator.tiny import _llava_tokenizer, _qwen_tokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if arch == "llava-1.5-7b":
        tokenizer = _llava_tokenizer()  # ids stay < 512: a real vocabulary is not needed
        tokenizer.model_max_length = 2048
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
                projection_dim=768,
                hidden_act="quick_gelu",
            ),
            text_config=LlamaConfig(
                vocab_size=32064,
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                max_position_embeddings=4096,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            image_seq_length=576,
        )
        model_class = LlavaForConditionalGeneration
        processor = LlavaProcessor(
            image_processor=LlavaImageProcessor(
                size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=True
            ),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=VICUNA_V1_TEMPLATE,
        )
    elif arch == "qwen2-vl-2b":
        tokenizer = _qwen_tokenizer()
        ids = tokenizer.convert_tokens_to_ids
        config = Qwen2VLConfig(
            vision_config={
                "depth": 32,
                "embed_dim": 1280,
                "hidden_size": 1536,
                "num_heads": 16,
                "mlp_ratio": 4,
            },
            text_config={
                "vocab_size": 151936,
                "hidden_size": 1536,
                "intermediate_size": 8960,
                "num_hidden_layers": 28,
                "num_attention_heads": 12,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1000000.0,
                    "mrope_section": [16, 24, 24],
                },
                "tie_word_embeddings": True,
            },
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=True,
        )
        model_class = Qwen2VLForConditionalGeneration
        processor = Qwen2VLProcessor(
            # 448x448 at most: 256 tokens per image, a usual serving budget.
            image_processor=Qwen2VLImageProcessor(min_pixels=224 * 224, max_pixels=448 * 448),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=CHATML_VISION_TEMPLATE,
        )
    else:
        raise SystemExit(f"unknown --arch {arch}")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


class FirstToken:
    """A streamer that notes when the first new token arrives (the prompt is the first put)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def timed_generation(generator, prompt, new_tokens: int, sync) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) for one generation."""
    import torch

    inputs = generator.inputs(prompt)
    streamer = FirstToken()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        generator.model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=generator.tokenizer.pad_token_id,
        )
    sync()
    end = time.perf_counter()
    first = (streamer.first_at or end) - start
    return first, (new_tokens - 1) / max(end - start - first, 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny-llava,tiny-qwen2-vl")
    parser.add_argument("--k", default="0,2", help="concept counts to time generation at")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()

    import platform

    import torch
    from PIL import Image

    from engine.embedder import resolve_device
    from engine.generator.hf import Generator
    from engine.generator.prompt import PromptConcept, rap_prompt
    from engine.generator.tiny import TINY_MODELS, tiny_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"device: {device} ({where or 'cpu'}), torch threads {torch.get_num_threads()}")
    tmp = Path(tempfile.mkdtemp(prefix="rapbot-bench-gen-"))
    query = Image.new("RGB", (640, 480), (90, 90, 90))
    crops = [Image.new("RGB", (224, 224), c) for c in COLOURS[:5]]
    concepts = [PromptConcept(f"C{i}", "a remembered thing", crop) for i, crop in enumerate(crops)]

    for arch in args.arch.split(","):
        started = time.perf_counter()
        if arch in TINY_MODELS:
            generator = Generator.load(tiny_model_path(arch, tmp), device=str(device))
        else:
            generator = Generator(*real_size(arch, str(device)))
        sync()
        print(f"\n## {arch}: built in {time.perf_counter() - started:.1f} s")
        params = sum(p.numel() for p in generator.model.parameters()) / 1e6
        print(f"{params:.1f} M parameters, context {generator.context_tokens} tokens")

        print("\nprompt length (tokens) by K: with the query image | text-only")
        for k in range(6):
            visual = generator.inputs(rap_prompt(QUESTION, concepts[:k], query))
            text = generator.inputs(rap_prompt(QUESTION, concepts[:k]))
            print(f"  K={k}: {visual['input_ids'].shape[1]:6d} | {text['input_ids'].shape[1]:6d}")
        chosen = generator.select_concepts(QUESTION, concepts, query)
        print(f"  K chosen from the context budget: {len(chosen)}")

        warm = rap_prompt(QUESTION, concepts[:1], query)
        for _ in range(2):  # first calls pay one-off costs (allocations, kernel choice)
            timed_generation(generator, warm, args.new_tokens, sync)
        print(f"\ngeneration, {args.new_tokens} new tokens, median of {args.runs}:")
        print("  K | prompt tokens | first token (ms) | decode tokens/s | total (s)")
        for k in [int(x) for x in args.k.split(",")]:
            prompt = rap_prompt(QUESTION, concepts[:k], query)
            length = generator.inputs(prompt)["input_ids"].shape[1]
            timed_generation(generator, prompt, 4, sync)  # warm-up at this prompt length
            runs = [
                timed_generation(generator, prompt, args.new_tokens, sync) for _ in range(args.runs)
            ]
            first = statistics.median(r[0] for r in runs)
            rate = statistics.median(r[1] for r in runs)
            total = first + (args.new_tokens - 1) / rate
            print(f"  {k} | {length:13d} | {first * 1000:16.1f} | {rate:15.1f} | {total:9.2f}")
        del generator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
