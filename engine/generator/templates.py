"""Chat templates (Jinja, transformers' ``apply_chat_template`` format) for the RAP models.

The released RAP checkpoints were trained with the original LLaVA repository's conversation
templates, not with the ones that ship with the transformers ports of LLaVA, so converted
checkpoints get templates that reproduce those prompts character for character:

- ``vicuna_v1`` (RAP-LLaVA-13b, trained with ``--version v1``, which the LLaVA repository maps
  to ``conv_vicuna_v1``): ``SYSTEM USER: <msg> ASSISTANT:``, an answer ends with ``</s>``; the
  system prompt speaks of a "user".
- ``llava_v1`` (LLaVA-1.5's evaluation scripts, ``conv_llava_v1``): the same layout with a
  system prompt that speaks of a "human". Not what RAP-LLaVA was trained with; kept for
  LLaVA-1.5 checkpoints evaluated the way LLaVA evaluates them.
- ``phi3`` (RAP-Phi3-mini, LLaVA-Phi-3): ``<|system|>\\nSYSTEM<|end|>\\n<|user|>\\n<msg><|end|>
  \\n<|assistant|>\\n``.
- ``chatml_vision`` (Qwen2-VL style): ``<|im_start|>role\\n...<|im_end|>`` with
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image.

Message content is either a string or a list of ``{"type": "text", "text": ...}`` and
``{"type": "image"}`` items, rendered in order; an image item becomes the model's image token.
"""

from __future__ import annotations

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
PHI3_SYSTEM = "You are a helpful AI assistant."
CHATML_SYSTEM = "You are a helpful assistant."

# One macro renders a message's content; ``image`` is what an image item becomes.
_CONTENT = (
    "{%- macro render(content, image) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif item['type'] == 'image' -%}{{ image }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def _two_separator_template(system: str) -> str:
    """SeparatorStyle.TWO (sep " ", sep2 "</s>"): system + " ", then "USER: m " and
    "ASSISTANT: a</s>" alternately; the generation prompt is "ASSISTANT:"."""
    return (
        _CONTENT + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ render(messages[0]['content'], '') }}{%- set rest = messages[1:] -%}"
        "{%- else -%}{{ '" + system.replace("'", "\\'") + "' }}"
        "{%- set rest = messages -%}{%- endif -%}"
        "{{ ' ' }}"
        "{%- for message in rest -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ 'USER: ' + render(message['content'], '<image>') + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT: ' + render(message['content'], '') + '</s>' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


# conv_vicuna_v1 and conv_llava_v1 differ only in the system prompt.
VICUNA_V1_TEMPLATE = _two_separator_template(VICUNA_V1_SYSTEM)
LLAVA_V1_TEMPLATE = _two_separator_template(LLAVA_V1_SYSTEM)

# conv_phi3_instruct (SeparatorStyle.MPT, sep "<|end|>"): system + sep, then role + m + sep;
# the generation prompt is the bare assistant role.
PHI3_TEMPLATE = (
    _CONTENT + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ '<|system|>\\n' + render(messages[0]['content'], '') + '<|end|>' }}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}{{ '<|system|>\\n" + PHI3_SYSTEM + "<|end|>' }}"
    "{%- set rest = messages -%}{%- endif -%}"
    "{%- for message in rest -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '\\n<|user|>\\n' + render(message['content'], '<image>') + '<|end|>' }}"
    "{%- else -%}{{ '\\n<|assistant|>\\n' + render(message['content'], '') + '<|end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|assistant|>\\n' }}{%- endif -%}"
)

# Qwen2-VL's own layout (ChatML with vision markers), written for the tiny Qwen2-VL.
CHATML_VISION_TEMPLATE = (
    _CONTENT + "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + CHATML_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{{ render(message['content'], '<|vision_start|><|image_pad|><|vision_end|>') }}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TEMPLATES: dict[str, str] = {
    "vicuna_v1": VICUNA_V1_TEMPLATE,
    "llava_v1": LLAVA_V1_TEMPLATE,
    "phi3": PHI3_TEMPLATE,
    "chatml_vision": CHATML_VISION_TEMPLATE,
}
