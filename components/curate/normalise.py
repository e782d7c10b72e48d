"""Classify a LLaVA record (modality, task type), put its placeholders where LLaVA puts them, and give
fixed-form questions the LLaVA-1.5 answer-format prompts.

    modality, task = classify(record)          # ("single_image", "mcq")
    record, moved = front_image_placeholder(record)
    record, changed = normalise_prompt(record, task)

Placeholders (LLaVA-NeXT `preprocess_multimodal`): the one `<image>` of a single-image record moves to the
front of its turn, followed by a newline, wherever it was written ("...sentence.\n<image>", "Look at
<image> and...", "<image>What..." all become "<image>\n..."). Multi-image and video records keep their
placeholders where they are: their order says which image or clip the text refers to.

Answer format: LLaVA-1.5 (and the OneVision data) ask for it in the prompt: short-answer VQA ends with
SHORT_ANSWER_PROMPT, multiple choice with MULTIPLE_CHOICE_PROMPT. Mixing sources that do and do not
carry them teaches the model to answer "yes" to a request for a paragraph. Only single-question records
are touched, and only where the answer really has that form: SHORT_ANSWER_PROMPT where the answer is a
word or a short phrase (`is_word_or_phrase`; "Read the text in the image." answered by a sentence gets
none), MULTIPLE_CHOICE_PROMPT where it is the option letter alone; never twice (idempotent).
Classification is from content alone (a record's own `meta` is not trusted), so that sources that
label their tasks differently land in the same data-card buckets.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from model import chat

MODALITIES = ("text", "single_image", "multi_image", "video")
TASKS = ("caption", "detailed_description", "ocr", "short_vqa", "mcq", "conversation")
SHORT_ANSWER_PROMPT = chat.SHORT_ANSWER  # LLaVA-1.5
MULTIPLE_CHOICE_PROMPT = chat.OPTION_LETTER  # LLaVA-1.5
PHRASE_MAX_WORDS = 4  # VQAv2/GQA-style short answers: "red", "two dogs", "on the table"

_PLACEHOLDER = re.compile(r"(Image \d+:\s*)?<(image|video)>\s*")
_OPTION = re.compile(r"^\s*\(?([A-H])[.)]\s+\S", re.MULTILINE)
_LETTER_ANSWER = re.compile(r"^\(?([A-H])\)?(?:[.)]\s*.*)?$", re.DOTALL)
_OCR = re.compile(r"\b(ocr|text|written|word|words|read|says?|title|label|sign)\b", re.IGNORECASE)
_CAPTION = re.compile(r"\b(caption|briefly|short description|summari[sz]e|concise)\b", re.IGNORECASE)
_DETAIL = re.compile(r"\b(in detail|detailed|elaborate|comprehensive|thorough)\b", re.IGNORECASE)
_DESCRIBE = re.compile(r"\b(describe|description|what is (in|shown in) (the|this) (image|picture))\b", re.IGNORECASE)
_INSTRUCTION = re.compile(r"\n\s*Answer\b[^\n]*$", re.IGNORECASE)  # an answer-format line ends the question
_LETTER_ONLY = re.compile(r"^\(?[A-H]\)?\.?$")


def is_word_or_phrase(answer: str) -> bool:
    """One word or a short phrase: one line, at most PHRASE_MAX_WORDS words, and not a sentence
    (several words closed by . ! or ?). "Stop", "two dogs", "Yes." are; "The sign says stop." is not."""
    text = answer.strip()
    words = text.split()
    return 0 < len(words) <= PHRASE_MAX_WORDS and "\n" not in text and not (len(words) > 1 and text[-1] in ".!?")


def front_image_placeholder(record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(record, moved): a single-image record's `<image>` at the front of its turn, then a newline."""
    if modality(record) != "single_image":
        return record, False
    for i, turn in enumerate(record["conversations"]):
        value = turn["value"]
        if chat.IMAGE_TOKEN not in value:
            continue
        before, _, after = value.partition(chat.IMAGE_TOKEN)
        before, after = before.rstrip(" \t"), after.lstrip(" \t")
        joiner = " " if before and after and not before.endswith("\n") and not after.startswith("\n") else ""
        canonical = f"{chat.IMAGE_TOKEN}\n{(before + joiner + after).strip()}".strip()  # a bare "<image>" stays
        if canonical == value:
            return record, False
        out = copy.deepcopy(record)
        out["conversations"][i]["value"] = canonical
        return out, True
    return record, False


def modality(record: dict[str, Any]) -> str:
    images = record.get("image")
    n_images = 1 if isinstance(images, str) else len(images or [])
    if record.get("video"):
        return "video"
    return {0: "text", 1: "single_image"}.get(n_images, "multi_image")


def _question_answer(turns: list[tuple[str, str]]) -> tuple[str, str, int]:
    """(first user question without placeholders, last answer, number of user turns)."""
    questions = [text for role, text in turns if role == "user"]
    answers = [text for role, text in turns if role == "assistant"]
    question = _PLACEHOLDER.sub("", questions[0]).strip() if questions else ""
    while _INSTRUCTION.search(question):  # the answer-format line is not part of the question
        question = _INSTRUCTION.sub("", question).rstrip()
    return question, (answers[-1].strip() if answers else ""), len(questions)


def classify_task(turns: list[tuple[str, str]]) -> str:
    """One of TASKS from the conversation (chat.normalise_turns output)."""
    question, answer, n_questions = _question_answer(turns)
    if n_questions > 1:
        return "conversation"
    words = len(answer.split())
    options = set(_OPTION.findall(question))
    if (len(options) >= 2 or MULTIPLE_CHOICE_PROMPT in question) and _LETTER_ANSWER.match(answer):
        return "mcq"
    if _DETAIL.search(question) or (_DESCRIBE.search(question) and words >= 40):
        return "detailed_description"
    if not question or _CAPTION.search(question) or (_DESCRIBE.search(question) and words < 40):
        return "detailed_description" if words >= 40 else "caption"
    if _OCR.search(question) and words <= 10:
        return "ocr"
    if words <= 4:
        return "short_vqa"
    return "conversation"


def classify(record: dict[str, Any]) -> tuple[str, str]:
    """(modality, task) of a record whose conversation is well-formed."""
    return modality(record), classify_task(chat.normalise_turns(record["conversations"]))


def normalise_prompt(record: dict[str, Any], task: str) -> tuple[dict[str, Any], bool]:
    """(record, changed): the answer-format prompt appended to a fixed-form single question whose answer
    has that form (a word or phrase; the option letter alone)."""
    if task not in ("short_vqa", "ocr", "mcq"):
        return record, False
    _, answer, _ = _question_answer(chat.normalise_turns(record["conversations"]))
    if not (_LETTER_ONLY.match(answer) if task == "mcq" else is_word_or_phrase(answer)):
        return record, False
    conversations = record["conversations"]
    first_user = next(i for i, turn in enumerate(conversations)
                      if chat.ROLES.get(str(turn.get("from", "")).lower()) == "user")
    question = str(conversations[first_user]["value"]).rstrip()
    if _INSTRUCTION.search(question) or question.endswith((SHORT_ANSWER_PROMPT, MULTIPLE_CHOICE_PROMPT)):
        return record, False
    suffix = MULTIPLE_CHOICE_PROMPT if task == "mcq" else SHORT_ANSWER_PROMPT
    out = copy.deepcopy(record)
    out["conversations"][first_user]["value"] = f"{question}\n{suffix}"
    return out, True
