"""Task classification from content agrees with the shapes world's own labels; prompt normalisation
adds the LLaVA-1.5 answer-format line only where it belongs, once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.curate.normalise import (MULTIPLE_CHOICE_PROMPT, SHORT_ANSWER_PROMPT, classify,
                                         front_image_placeholder, normalise_prompt)
from model import shapes_world

WORLD_TASK = {"caption": "caption", "description": "detailed_description", "ocr": "ocr", "color": "short_vqa",
              "shape": "short_vqa", "count": "short_vqa", "position": "short_vqa", "mc_color": "mcq",
              "mc_shape": "mcq", "mi_which_color": "short_vqa", "mi_same_color": "short_vqa",
              "mi_color_of": "short_vqa", "video_color": "short_vqa", "video_direction": "short_vqa"}


def test_classification_matches_the_world_labels(tmp_path: Path) -> None:
    shapes_world.generate_world(tmp_path, seed=3, n_per_kind=60, n_eval=4)
    wrong = []
    for kind in shapes_world.KINDS:
        for record in json.loads((tmp_path / f"{kind}.json").read_text()):
            modality, task = classify(record)
            expected_modality = {"multi_image": "multi_image", "video": "video"}.get(kind, "single_image")
            if (modality, task) != (expected_modality, WORLD_TASK[record["meta"]["task"]]):
                wrong.append((record["id"], modality, task))
            assert normalise_prompt(record, task) == (record, False)  # the world is already normalised
            assert front_image_placeholder(record) == (record, False)  # and in LLaVA's placeholder layout
    assert wrong == []


def rec(question: str, answer: str, image: bool = True) -> dict:
    return {"id": 1, **({"image": "a.png"} if image else {}),
            "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                              {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("question,answer,task,suffix", [
    ("What is the man holding?", "a kite", "short_vqa", SHORT_ANSWER_PROMPT),
    ("What does the sign say?", "STOP", "ocr", SHORT_ANSWER_PROMPT),
    ("Which animal is shown?\nA. cat\nB. dog\nC. cow", "B", "mcq", MULTIPLE_CHOICE_PROMPT),
    ("Which animal is shown?\n(A) cat\n(B) dog", "(A)", "mcq", MULTIPLE_CHOICE_PROMPT),
    ("Describe the image in detail.", "A long paragraph " * 10, "detailed_description", None),
    ("", "A dog on a beach.", "caption", None),
    ("Why might the man be smiling here, do you think?", "He seems to have just won a prize at the fair.",
     "conversation", None),
])
def test_normalise_by_task(question: str, answer: str, task: str, suffix: str | None) -> None:
    record = rec(question, answer)
    assert classify(record) == ("single_image", task)
    out, changed = normalise_prompt(record, task)
    assert changed == (suffix is not None)
    if suffix:
        assert out["conversations"][0]["value"] == f"<image>\n{question}\n{suffix}"
        assert record["conversations"][0]["value"] == f"<image>\n{question}"  # the input is not mutated
        assert normalise_prompt(out, task) == (out, False)  # idempotent
        assert classify(out) == ("single_image", task)  # the suffix does not change the class
    else:
        assert out is record


def test_multi_turn_is_a_conversation_and_kept_as_is() -> None:
    record = rec("What colour?", "red")
    record["conversations"] += [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "round"}]
    assert classify(record) == ("single_image", "conversation")
    assert normalise_prompt(record, "conversation") == (record, False)
    assert classify(rec("Hello", "Hi!", image=False))[0] == "text"
