"""RAP generation and retrieval cost at real size on one GPU (issue 12's GPU figures).

NOT YET RUN: no GPU machine was lent when this was written, so docs/benchmarks.md has no
figures from it yet. Run ``python benchmarks/bench_gpu_rap.py`` on a CUDA machine and paste
the output there with the card's name.

- A LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 tower, mlp2x_gelu projector, Llama-7B) with
  random bf16 weights — no download — given the RAP prompt with K = 0, 2 and 3 concepts (the
  query image plus one 576-token image per concept, ~60 text tokens): time to first token and
  decoding tokens/s, each as a ratio to K = 0 measured in the same run.
- CLIP ViT-L-14-336 (open_clip, random bf16 weights): crops/s at batch 1 and 16, the second as
  a ratio to the first.
"""

from __future__ import annotations

import statistics
import time

import _setup  # noqa: F401  (repository on sys.path)

NEW_TOKENS = 64
TEXT_TOKENS = 60
REPEATS = 3


def llava_7b():
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval()
    return model, config


def rap_inputs(config, k: int):
    import torch

    images = 1 + k
    text = torch.randint(3, 32000, (TEXT_TOKENS,))
    ids = [1]
    for chunk in text.chunk(images + 1)[:-1]:  # text, image, text, image ... as RAP lays out
        ids += chunk.tolist() + [config.image_token_index] * config.image_seq_length
    ids += text.chunk(images + 1)[-1].tolist()
    input_ids = torch.tensor([ids], device="cuda")
    pixels = torch.randn(images, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels,
    }


def timed_generate(model, inputs, new_tokens: int) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_generation() -> None:
    model, config = llava_7b()
    rows = {}
    for k in (0, 2, 3):
        inputs = rap_inputs(config, k)
        timed_generate(model, inputs, 2)  # warm-up
        first = statistics.median(timed_generate(model, inputs, 1) for _ in range(REPEATS))
        whole = statistics.median(timed_generate(model, inputs, NEW_TOKENS) for _ in range(REPEATS))
        rows[k] = (inputs["input_ids"].shape[1], first, (NEW_TOKENS - 1) / (whole - first))
    base_first, base_rate = rows[0][1], rows[0][2]
    print("LLaVA-1.5-7B architecture, random bf16 weights")
    print(f"{'K':>3}{'prompt tokens':>15}{'TTFT ms':>10}{'x K=0':>8}{'tok/s':>9}{'x K=0':>8}")
    for k, (tokens, first, rate) in rows.items():
        print(
            f"{k:>3}{tokens:>15}{1000 * first:>10.1f}{first / base_first:>8.2f}"
            f"{rate:>9.1f}{rate / base_rate:>8.2f}"
        )
    del model


def bench_clip() -> None:
    import open_clip
    import torch

    model = open_clip.create_model("ViT-L-14-336", pretrained=None, device="cuda")
    model = model.to(torch.bfloat16).eval()
    rates = {}
    for batch in (1, 16):
        crops = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            model.encode_image(crops)  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            rounds = max(4, 64 // batch)
            for _ in range(rounds):
                model.encode_image(crops)
            torch.cuda.synchronize()
        rates[batch] = rounds * batch / (time.perf_counter() - start)
    print("CLIP ViT-L-14-336, random bf16 weights")
    print(
        f"batch 1: {rates[1]:.1f} crops/s; batch 16: {rates[16]:.1f} crops/s "
        f"({rates[16] / rates[1]:.2f}x batch 1)"
    )


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_rap needs a CUDA GPU.")
    print(f"card: {torch.cuda.get_device_name(0)}")
    bench_generation()
    torch.cuda.empty_cache()
    bench_clip()


if __name__ == "__main__":
    main()
