"""Conversation templates: LLaVA `plain` (Stage-1) and ChatML `qwen_1_5` (every later stage).

    from model.chat import render_segments
    render_segments([{"from": "human", "value": "<image>\\nWhat colour?"}, {"from": "gpt", "value": "red"}], "qwen_1_5")
    # [("<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\nWhat colour?<|im_end|>\\n<|im_start|>assistant\\n", False),
    #  ("red<|im_end|>", True), ("\\n", False)]

A conversation renders to (text, trainable) segments; only assistant replies are trainable. Training,
evaluation and serving all render through here, so the prompt a model is served with is the prompt it
was trained on. `CHAT_TEMPLATE` is the same ChatML as a Jinja template, saved with the tokenizer for
stock tools (processor.apply_chat_template, lmms-eval's llava_hf).
"""

from __future__ import annotations

from typing import Any, Literal

IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN)
DEFAULT_SYSTEM = "You are a helpful assistant."
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
Template = Literal["plain", "qwen_1_5"]
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ConversationError(ValueError):
    """A conversation that cannot be rendered (empty, unknown role, turns out of order)."""


def normalise_turns(conversations: Any) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> [(role, text)], validating roles and alternation (user first)."""
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("empty conversation")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ConversationError(f"turn {i} is not {{'from': ..., 'value': str}}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ConversationError(f"turn {i} has unknown role {turn.get('from')!r}")
        turns.append((role, turn["value"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    for i, (role, _) in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(f"roles must alternate user/assistant starting with user; turn {i} is {role}")
    if not body:
        raise ConversationError("no user turn")
    return turns


def render_segments(conversations: Any, template: Template,
                    add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Render to [(text, trainable)]. For training the last turn must be the assistant's."""
    turns = normalise_turns(conversations)
    if not add_generation_prompt and turns[-1][0] != "assistant":
        raise ConversationError("a training conversation must end with an assistant turn")
    if template == "plain":
        # LLaVA `plain`: the prompt is only the visual placeholders; the target is the caption + "\n".
        user = next(text for role, text in turns if role == "user")
        placeholders = "".join(tok for tok in _placeholders(user))
        if add_generation_prompt:
            return [(placeholders, False)]
        reply = next(text for role, text in turns if role == "assistant")
        return [(placeholders, False), (reply.strip() + "\n", True)]
    if template != "qwen_1_5":
        raise ConversationError(f"unknown template {template!r}")
    system = DEFAULT_SYSTEM
    if turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
    segments: list[tuple[str, bool]] = []
    prompt = f"{IM_START}system\n{system}{IM_END}\n"
    for role, text in turns:
        if role == "user":
            prompt += f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"
        else:
            segments += [(prompt, False), (f"{text}{IM_END}", True)]
            prompt = "\n"
    if add_generation_prompt:
        segments.append((prompt, False))
    elif prompt:
        segments.append((prompt, False))
    return segments


def _placeholders(text: str) -> list[str]:
    """The <image>/<video> placeholders of a text, in order."""
    out, i = [], 0
    while True:
        positions = [(text.find(tok, i), tok) for tok in (IMAGE_TOKEN, VIDEO_TOKEN)]
        positions = [(p, tok) for p, tok in positions if p >= 0]
        if not positions:
            return out
        p, tok = min(positions)
        out.append(tok)
        i = p + len(tok)


def count_placeholders(conversations: Any) -> tuple[int, int]:
    """(number of <image>, number of <video>) over every turn."""
    found = [tok for turn in conversations if isinstance(turn, dict)
             for tok in _placeholders(str(turn.get("value", "")))]
    return found.count(IMAGE_TOKEN), found.count(VIDEO_TOKEN)
