"""Hooks of the offline shapes tasks (lmms-eval `!function shapes_utils.<name>`).

Docs are JSONL rows written by `components.evaluate.offline.write_offline_data`: `question` (the user
turn, placeholders included, as in training), `answer`, `visuals` (absolute image or video paths),
`task`, `chance`. Scoring is exact match after lmms-eval's normalisation (case, spaces, final period).
"""

from PIL import Image

from model.generation import normalise


def doc_to_visual(doc):
    return [path if path.endswith((".mp4", ".gif")) else Image.open(path).convert("RGB") for path in doc["visuals"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
