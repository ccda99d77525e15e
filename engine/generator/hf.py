"""A multimodal LLM through transformers: ``AutoModelForImageTextToText`` + ``AutoProcessor``.

Works with any model whose processor takes ``text`` with image tokens and ``images`` and has a
chat template: LLaVA-1.5 (and converted RAP-LLaVA / RAP-Phi3 checkpoints), LLaVA-Phi-3,
Qwen2-VL / Qwen2.5-VL, the tiny test models. A :class:`~engine.generator.prompt.RapPrompt` goes
into one user turn of the chat template with its images in order. Greedy decoding by default,
so the same prompt gives the same answer. LoRA adapters load and merge through peft.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import MissingWeightError, RapbotError
from engine.generator.prompt import (
    MAX_CONCEPTS,
    PromptConcept,
    RapPrompt,
    choose_k,
    rap_prompt,
)
from engine.generator.tokens import llava_ids, uses_llava_tokenization
from engine.weights import first_line

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

# Tokens that end a turn in the chat formats we know; whichever the tokenizer has stop generation.
_TURN_ENDS = ("</s>", "<|end|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
# A tokenizer's "no limit" sentinel is ~1e30: anything above this is not a real context size.
_NO_LIMIT = 1_000_000


def torch_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 on GPUs that have it (fp16 on older ones), fp32 on CPU, unless one is named."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype):
    """bitsandbytes 4/8-bit settings, or None; a clear error when bitsandbytes is missing."""
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise RapbotError("Choose either 4-bit or 8-bit loading for the generator, not both.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        bits = 4 if load_in_4bit else 8
        raise RapbotError(
            f"{bits}-bit loading needs bitsandbytes and a CUDA GPU: pip install bitsandbytes "
            "(or unset RAPBOT_GENERATOR_LOAD_IN_4BIT / _8BIT)."
        ) from None
    from transformers import BitsAndBytesConfig

    if load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return BitsAndBytesConfig(load_in_8bit=True)


class Generator:
    """One loaded model and processor; turns a RAP prompt into an answer (whole or streamed)."""

    def __init__(
        self,
        model,
        processor,
        *,
        name: str = "",
        max_new_tokens: int = 128,
        context_tokens: int = 0,
        max_concepts: int = MAX_CONCEPTS,
    ) -> None:
        self.model = model
        self.processor = processor
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.max_new_tokens = max_new_tokens
        self.max_concepts = max_concepts
        self._context_tokens = context_tokens
        self._lock = threading.Lock()  # one generation at a time per model
        self._keeps_order: bool | None = None

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        ref: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        adapter: str | Path | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        **options: Any,
    ) -> Generator:
        """Load a model folder or hub name; offline, a missing one is a MissingWeightError."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from engine.embedder import resolve_device

        target = resolve_device(device)
        torch_type = torch_dtype(target, dtype)
        quant = quantization_config(load_in_4bit, load_in_8bit, torch_type)
        # Never run a checkpoint's own code, nor stop at transformers' "run it?" prompt.
        common: dict[str, Any] = {
            "cache_dir": cache_dir,
            "local_files_only": local_files_only,
            "trust_remote_code": False,
        }
        try:
            processor = AutoProcessor.from_pretrained(str(ref), **common)
            model = AutoModelForImageTextToText.from_pretrained(
                str(ref),
                dtype=torch_type,
                quantization_config=quant,
                device_map={"": str(target)} if quant is not None else None,
                **common,
            )
        except (OSError, ValueError) as error:  # not cached offline, no such repo, not a VLM
            how = f"download it (`hf download {ref} --local-dir DIR`) and set RAPBOT_GENERATOR=DIR"
            if cache_dir and not local_files_only:
                how += f", or check the network (cache: {cache_dir})"
            raise MissingWeightError(
                f"Could not load generator model '{ref}' ({first_line(error)}): {how}."
            ) from None
        if quant is None:
            model.to(target)
        model.eval()
        generator = cls(model, processor, name=str(ref), **options)
        if adapter:
            generator.load_adapter(adapter)
        log.info("generator %s on %s (%s)", ref, target, torch_type)
        return generator

    def load_adapter(self, path: str | Path, adapter_name: str | None = None) -> None:
        """Put a peft (LoRA) adapter on the model; generation uses it from now on. Adapters
        are named after their folder unless named here."""
        from peft import PeftModel

        adapter_name = adapter_name or Path(path).name or "default"

        if not (Path(path).expanduser() / "adapter_config.json").is_file():
            raise MissingWeightError(
                f"Generator adapter not found: {path} (a folder with adapter_config.json, "
                "as saved by peft)."
            )
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=adapter_name)
                self.model.set_adapter(adapter_name)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(path), adapter_name=adapter_name
                )
            self.model.eval()

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (faster generation, same output)."""
        from peft import PeftModel

        with self._lock:
            if not isinstance(self.model, PeftModel):
                raise RapbotError("No adapter is loaded on the generator: nothing to merge.")
            if getattr(self.model.get_base_model(), "is_quantized", False):
                raise RapbotError(
                    "A 4/8-bit model cannot take a merged adapter exactly; keep it unmerged."
                )
            self.model = self.model.merge_and_unload()
            self.model.eval()

    # ----------------------------------------------------------------------------- facts

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_token(self) -> str:
        return self.processor.image_token

    @property
    def context_tokens(self) -> int:
        """The model's usable context: the override, the tokenizer's limit, or the config's."""
        if self._context_tokens:
            return self._context_tokens
        limit = getattr(self.tokenizer, "model_max_length", 0) or 0
        if 0 < limit < _NO_LIMIT:
            return int(limit)
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return int(getattr(text, "max_position_embeddings", 2048))

    def image_tokens(self, image: Image.Image) -> int:
        """How many prompt tokens this image becomes for this model."""
        sizes = [(image.height, image.width)]
        try:
            data = self.processor._get_num_multimodal_tokens(image_sizes=sizes)
            return int(data.num_image_tokens[0])
        except (AttributeError, KeyError, TypeError, IndexError):  # a processor without it
            return int(getattr(self.model.config, "image_seq_length", 576))

    def stop_token_ids(self) -> list[int]:
        """End-of-sequence ids: the model's own plus each chat format's end-of-turn token."""
        ids = self.model.generation_config.eos_token_id
        found = {ids} if isinstance(ids, int) else set(ids or [])
        specials = set(self.tokenizer.all_special_tokens) | {
            t.content for t in self.tokenizer.added_tokens_decoder.values()
        }
        for token in _TURN_ENDS:
            if token in specials:
                found.add(self.tokenizer.convert_tokens_to_ids(token))
        return sorted(found)

    # ----------------------------------------------------------------------------- prompts

    def clean(self, text: str) -> str:
        """User text without the model's control tokens: nobody can add an image slot or end
        a turn by typing ``<image>`` or ``<|im_end|>``."""
        controls = set(self.tokenizer.all_special_tokens) | {
            t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special
        }
        controls |= {self.image_token, "<image>"}
        controls.discard("")
        previous = None
        while previous != text:  # "<ima<image>ge>" must not become "<image>"
            previous = text
            for token in controls:
                text = text.replace(token, "")
        return text

    def render(self, prompt: RapPrompt) -> str:
        """The prompt in the model's chat template, image slots as its image tokens."""
        template = getattr(self.processor, "chat_template", None)
        if not template:  # a base model without a chat format: the bare RAP prompt
            return prompt.text(self.image_token)
        messages = prompt.messages()
        if not self._template_keeps_image_order():
            # e.g. llava-hf's LLaVA-1.5 template puts every image before all text: give it the
            # RAP text with the image tokens already in place instead.
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": prompt.text(self.image_token)}],
                }
            ]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def _template_keeps_image_order(self) -> bool:
        """Whether the chat template renders content items in order (images between texts)."""
        if self._keeps_order is None:
            probe = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "AAA"},
                        {"type": "image"},
                        {"type": "text", "text": "BBB"},
                    ],
                }
            ]
            text = self.processor.apply_chat_template(probe, tokenize=False)
            image = text.find(self.image_token)
            self._keeps_order = -1 < text.find("AAA") < image < text.find("BBB")
        return self._keeps_order

    def inputs(self, prompt: RapPrompt):
        """Token ids, attention mask and pixel values, on the model's device. LLaVA models get
        their ids as the LLaVA repository made them in training (:mod:`engine.generator.tokens`)."""
        images = list(prompt.images) or None
        text = self.render(prompt)
        batch = self.processor(text=[text], images=images, return_tensors="pt", padding=False)
        if images and uses_llava_tokenization(self.processor):
            llava_ids(batch, self.processor, text, len(images))
        return batch.to(self.device)

    def select_concepts(
        self,
        question: str,
        candidates: Sequence[PromptConcept],
        query_image: Image.Image | None,
        max_new_tokens: int | None = None,
    ) -> list[PromptConcept]:
        """The first K candidates, K chosen from the model's context budget (RAP's K)."""
        if not candidates:
            return []
        base = rap_prompt(question, (), None)
        question_tokens = len(self.tokenizer(self.render(base)).input_ids)
        shown = [c.image for c in candidates if c.image is not None]
        if query_image is not None:
            shown.append(query_image)
        image_tokens = max((self.image_tokens(img) for img in shown), default=0)
        k = choose_k(
            self.context_tokens,
            image_tokens,
            question_tokens,
            max_new_tokens or self.max_new_tokens,
            query_image=query_image is not None,
            max_k=self.max_concepts,
        )
        return list(candidates[:k])

    # ----------------------------------------------------------------------------- generation

    def _generate_kwargs(self, max_new_tokens: int | None, options: dict) -> dict:
        kwargs = {
            "max_new_tokens": max_new_tokens or self.max_new_tokens,
            "do_sample": False,
            "eos_token_id": self.stop_token_ids(),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        kwargs.update(options)
        if not kwargs.get("do_sample"):
            for key in ("temperature", "top_p", "top_k"):  # meaningless for greedy decoding
                kwargs.pop(key, None)
        return kwargs

    def generate(self, prompt: RapPrompt, max_new_tokens: int | None = None, **options) -> str:
        """The whole answer (greedy unless ``do_sample=True`` is passed)."""
        import torch

        inputs = self.inputs(prompt)
        with self._lock, torch.inference_mode():
            output = self.model.generate(**inputs, **self._generate_kwargs(max_new_tokens, options))
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def stream(
        self, prompt: RapPrompt, max_new_tokens: int | None = None, **options
    ) -> Iterator[str]:
        """The answer in pieces as it is generated; joined, they equal :meth:`generate`'s text.

        ``model.generate`` runs on a thread and hands each new token over a queue; closing this
        iterator early stops the generation at the next token.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        inputs = self.inputs(prompt)
        tokens: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()
        failure: list[BaseException] = []

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        kwargs = self._generate_kwargs(max_new_tokens, options)
        kwargs["streamer"] = _QueueStreamer(tokens)
        kwargs["stopping_criteria"] = StoppingCriteriaList([Cancelled()])

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**inputs, **kwargs)
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
                failure.append(error)
            finally:
                tokens.put(done)

        worker = threading.Thread(target=run, name="rapbot-generate", daemon=True)
        worker.start()
        text = _IncrementalText(self.tokenizer)
        try:
            while (item := tokens.get()) is not done:
                if piece := text.add(item):
                    yield piece
            if failure:
                raise failure[0]
            if piece := text.finish():
                yield piece
        finally:
            cancel.set()
            worker.join()


class _QueueStreamer:
    """transformers' streamer protocol: every new token id goes onto a queue (prompt skipped)."""

    def __init__(self, out: queue.Queue) -> None:
        self.out = out
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.out.put(int(token))

    def end(self) -> None:
        pass


class _IncrementalText:
    """Decodes the growing token list and hands out only new, settled text.

    Text is held back while it ends in an incomplete character (byte-level tokens can split a
    UTF-8 sequence) or in whitespace (the full answer is stripped), so the pieces join to
    exactly ``decode(all tokens).strip()``.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text.rstrip())

    def finish(self) -> str:
        return self._advance(self._text().rstrip())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed earlier text: never seen in
            log.debug("streamed text diverged from the decoded text")  # practice; keep going
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
