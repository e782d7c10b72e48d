"""Our checkpoints as an lmms-eval model: the training-time chat template and processing, batched greedy.

    python -m lmms_eval --model onevision \
        --model_args pretrained=s3://onevision/runs/r1/stage2_ov/hf,template=qwen_1_5,video_frames=8 \
        --tasks shapes_color,ai2d --batch_size 1 --output_path out/ --log_samples

Why not the stock `llava_hf`: it renders prompts with the checkpoint's own chat template and processes
images in its own way; this class reuses `model.processing.SampleProcessor` and `model.generation`, the
code the model was trained and is served with, so a score measures the model, not a prompt mismatch.
A context that already holds `<image>`/`<video>` placeholders (our offline tasks, interleaved
multi-image prompts) keeps them; otherwise one placeholder per visual is put before the question, as
LLaVA does. Protocol: greedy (sampling arguments are ignored, with a warning), `until` strings cut the
answer, batch size 1 by default (larger batches give identical greedy answers; benchmarks/bench_evaluation.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from PIL import Image

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from model import chat
from model.builder import load_pretrained
from model.generation import generate
from model.processing import SampleProcessor


def _as_bytes(visual: Any, index: int) -> tuple[str, bytes, bool]:
    """(member name, bytes, is video) for a PIL image or a video/image file path."""
    if isinstance(visual, Image.Image):
        buf = io.BytesIO()
        visual.save(buf, "PNG")
        return f"img{index}.png", buf.getvalue(), False
    if isinstance(visual, (str, Path)):
        path = Path(visual)
        is_video = path.suffix.lower() in (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
        return f"{'vid' if is_video else 'img'}{index}{path.suffix.lower()}", path.read_bytes(), is_video
    raise TypeError(f"unsupported visual type {type(visual).__name__}")


def build_record(request_id: str, context: str, visuals: list[Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A LLaVA record (one user turn) and its media for one lmms-eval request."""
    media: dict[str, bytes] = {}
    images, videos = [], []
    for i, visual in enumerate(visuals or []):
        name, data, is_video = _as_bytes(visual, i)
        media[name] = data
        (videos if is_video else images).append(name)
    n_image, n_video = chat.count_placeholders([{"value": context}])
    if (n_image, n_video) != (len(images), len(videos)):
        stripped = context.replace(chat.IMAGE_TOKEN, "").replace(chat.VIDEO_TOKEN, "").lstrip()
        context = "".join(f"{chat.IMAGE_TOKEN}\n" for _ in images) + "".join(f"{chat.VIDEO_TOKEN}\n" for _ in videos) + stripped
    record: dict[str, Any] = {"id": request_id, "conversations": [{"from": "human", "value": context}]}
    if images:
        record["image"] = images
    if videos:
        record["video"] = videos
    return record, media


class OneVisionLMM(lmms):
    def __init__(self, pretrained: str, template: chat.Template = "qwen_1_5", video_frames: int = 8,
                 batch_size: int | str = 1, device: str = "cpu", max_new_tokens: int = 64,
                 dtype: str = "float32", **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"onevision: unknown model_args {sorted(kwargs)}")
        self.pretrained = pretrained
        self._device = torch.device(device)
        self._model, self.processor = load_pretrained(pretrained, dtype=getattr(torch, dtype))
        self._model.to(self._device).eval()
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self.sample_processor = SampleProcessor(self.processor, template, 1 << 20, video_frames=int(video_frames))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _answers(self, chunk: list[Instance], gen_kwargs: dict[str, Any]) -> list[str]:
        prompts = []
        for request in chunk:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            record, media = build_record(f"{task}-{split}-{doc_id}", context, visuals)
            prompts.append(self.sample_processor.prompt(record, media=media))
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0:
            logger.warning("onevision: sampling requested; evaluating greedily (the paper's protocol)")
        max_new = int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens)
        answers = generate(self._model, self.processor, prompts, max_new_tokens=max_new)
        until = [u for u in (gen_kwargs.get("until") or []) if u]
        if isinstance(gen_kwargs.get("until"), str):
            until = [gen_kwargs["until"]]
        for stop in until:
            answers = [a.split(stop)[0] for a in answers]
        return answers

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Same generation kwargs batch together; answers go back in request order.
        order: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            order.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in order.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                for i, answer in zip(batch, self._answers([requests[i] for i in batch], gen_kwargs)):
                    out[i] = answer
        return [a or "" for a in out]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("onevision: loglikelihood tasks are not supported; use generate_until tasks")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("onevision: multi-round tasks are not supported")
