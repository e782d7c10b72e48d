"""Validate an inference request (OpenAI chat shape) into a GenerationRequest, or fail with a clear 4xx.

    request = parse_chat_request(json_body, limits)          # RequestError(status, message) if bad
    request.record, request.media                             # a LLaVA record + its media bytes

Accepted: `{"model", "messages": [{"role": "system"|"user"|"assistant", "content": str | [parts]}],
"max_tokens", "temperature", "top_p", "stop", "stream", "seed", "n"}` (`n` 1 only: one choice) where parts are `{"type": "text",
"text"}`, `{"type": "image_url", "image_url": {"url": ...}}` and `{"type": "video_url", "video_url":
{"url": ...}}`. Media URLs: `data:<mime>;base64,...` (or bare base64), or `s3://bucket/key` only for a
bucket in the allow-list. Nothing else is fetched: http(s), file and any other scheme are refused.
Budgets (serving.budgets) come first, so a hostile body is refused in milliseconds with 413: the text's
bytes before anything is tokenized, the message count, and every image's pixels from its header
before any image is decoded (per request, and per call with a shared `CallBudget` when one HTTP call
carries several bodies). Then every image is decoded here, so a bad payload never reaches the model.
All failures are RequestError with the HTTP status to answer and a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from model import chat
from model.media import ImageBombError, MediaError, decode_image, image_size, load_video
from serving.budgets import BYTES_PER_TOKEN, DEFAULTS

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w-]+=[\w.-]+)*;base64,(?P<data>.*)$", re.DOTALL)
ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
RESERVED_TEXT = chat.SPECIAL_TOKENS
# The whole HTTP body of one call, refused (413) from its Content-Length, or while it arrives, before it is
# parsed. Media travel base64 inside the body (4/3 of their bytes), so this caps what one call can make the
# server hold: 50 MiB is OpenAI's own payload limit (what clients already fit), one image or video at the
# default 20 MiB media cap (26.7 MiB as base64) plus text, and about 200 MB for body, parsed copy and decoded
# media of a call at once. Raise it (`--max-body-bytes`) together with `--max-media-bytes`.
MAX_BODY_BYTES = 50 << 20


class RequestError(ValueError):
    """A request the server must refuse; `status` is the HTTP code (400, 404, 413, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_images: int = 8
    max_videos: int = 1
    max_media_bytes: int = 20 << 20  # per image or video, decoded from base64
    max_new_tokens: int = 512
    allowed_s3_buckets: tuple[str, ...] = ()
    video_frames: int = 8
    max_video_pixels: int = 1 << 32  # frames x pixels decoded to sample one video: 1080p x ~2,000 frames (70 s)
    # None: derived from the model by the Engine (serving.budgets); serving.budgets.DEFAULTS without one
    max_text_bytes: int | None = None  # UTF-8 bytes of all text parts, checked before tokenizing
    max_messages: int | None = None
    max_request_pixels: int | None = None  # all images of one body, from their headers
    max_call_pixels: int | None = None  # all bodies of one HTTP call (v1 instances, v2/Triton rows)
    max_body_bytes: int = MAX_BODY_BYTES  # the whole HTTP body of one call (KServe door)

    def budget(self, name: str) -> int:
        value = getattr(self, name)
        return DEFAULTS[name] if value is None else value


class CallBudget:
    """Pixels admitted so far by the bodies of one HTTP call; pass the same one to each parse."""

    def __init__(self) -> None:
        self.pixels = 0


@dataclass
class GenerationRequest:
    record: dict[str, Any]  # LLaVA record: conversations + image/video member names
    media: dict[str, bytes] = field(default_factory=dict)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _media_bytes(url: Any, where: str, limits: Limits) -> bytes:
    if not isinstance(url, str) or not url:
        raise RequestError(400, f"{where}: url must be a non-empty string")
    if url.startswith("s3://"):
        bucket = url[5:].split("/", 1)[0]
        if bucket not in limits.allowed_s3_buckets:
            raise RequestError(400, f"{where}: bucket {bucket!r} is not allowed (allowed: {list(limits.allowed_s3_buckets)})")
        from onevision import storage

        try:
            data = storage.read_bytes(url)
        except storage.StorageError as err:
            raise RequestError(400, f"{where}: cannot read {url}: {err}") from None
    else:
        match = _DATA_URL.match(url)
        if match is None and url.startswith("data:"):
            raise RequestError(400, f"{where}: a data: URL must be base64 (data:<mime>;base64,<payload>)")
        if match is None and re.match(r"^[a-zA-Z][\w+.-]*:", url):
            scheme = url.split(":", 1)[0]
            raise RequestError(400, f"{where}: URL scheme {scheme!r} is not allowed; send the media as a "
                                    "data: URL (base64) or an s3:// object of an allowed bucket")
        payload = match.group("data") if match else url
        if len(payload) * 3 // 4 > limits.max_media_bytes:
            raise RequestError(413, f"{where}: media over {limits.max_media_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, f"{where}: invalid base64") from None
    if len(data) > limits.max_media_bytes:
        raise RequestError(413, f"{where}: media over {limits.max_media_bytes} bytes")
    return data


def _content_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise RequestError(400, f"{where}.content must be a string or a list of content parts")
    return content


def parse_chat_request(body: Any, limits: Limits, call: CallBudget | None = None) -> GenerationRequest:
    """An OpenAI-style chat body -> GenerationRequest (RequestError on anything malformed or over budget)."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list")
    if len(messages) > limits.budget("max_messages"):
        raise RequestError(413, f"messages: {len(messages)} messages, at most {limits.budget('max_messages')} "
                                "fit this model's context")
    text_budget = _TextBudget(limits.budget("max_text_bytes"))
    conversations, media, images, videos = [], {}, [], []
    pixels, image_parts = 0, {}  # image name -> where it was in the body
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            raise RequestError(400, f"{where}.role must be one of {sorted(ROLES)}")
        text = []
        for j, part in enumerate(_content_parts(message.get("content"), where)):
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise RequestError(400, f"{where}.content[{j}].text must be a string")
                text_budget.take(part["text"], f"{where}.content[{j}].text")  # before any scan or tokenizing
                reserved = [t for t in RESERVED_TEXT if t in part["text"]]
                if reserved:  # chat-control tokens in user text would forge turns; placeholders need media
                    raise RequestError(400, f"{where}.content[{j}].text contains reserved token(s) {reserved}; "
                                            "send images and videos as image_url / video_url parts")
                text.append(part["text"])
            elif kind in ("image_url", "video_url"):
                if message["role"] != "user":
                    raise RequestError(400, f"{where}: media only in user messages")
                if len(images) + (kind == "image_url") > limits.max_images or \
                        len(videos) + (kind == "video_url") > limits.max_videos:  # counted before any decoding
                    raise RequestError(400, f"too many media: at most {limits.max_images} image(s) and "
                                            f"{limits.max_videos} video(s) per request")
                url = (part.get(kind) or {}).get("url") if isinstance(part.get(kind), dict) else part.get(kind)
                data = _media_bytes(url, f"{where}.content[{j}].{kind}", limits)
                if kind == "image_url":
                    name = f"img{len(images)}"
                    pixels += _header_pixels(data, name, f"{where}.content[{j}]")
                    _check_pixels(pixels, limits, call, f"{where}.content[{j}]")
                    images.append(name)
                    image_parts[name] = f"{where}.content[{j}]"
                    text.append(chat.IMAGE_TOKEN + "\n")
                else:
                    name = f"vid{len(videos)}.mp4"
                    try:
                        load_video(name, limits.video_frames, data=data, max_decoded_pixels=limits.max_video_pixels)
                    except MediaError as err:
                        raise RequestError(400, f"{where}.content[{j}]: not a usable video ({err})") from None
                    videos.append(name)
                    text.append(chat.VIDEO_TOKEN + "\n")
                media[name] = data
            else:
                raise RequestError(400, f"{where}.content[{j}]: unknown content part {kind!r}")
        conversations.append({"from": ROLES[message["role"]], "value": "".join(text)})
    if conversations[-1]["from"] != "human":
        raise RequestError(400, "the last message must be from the user")
    if call is not None:
        call.pixels += pixels
    for name, part in image_parts.items():  # only now, every header within budget: decode (validation)
        try:
            decode_image(media[name], name)
        except MediaError as err:
            raise RequestError(400, f"{part}: not a usable image ({err})") from None
    record: dict[str, Any] = {"id": "request", "conversations": conversations}
    if images:
        record["image"] = images
    if videos:
        record["video"] = videos
    return GenerationRequest(record, media, **_sampling(body, limits))


class _TextBudget:
    """UTF-8 bytes of a body's text parts, refused (413) as soon as they pass the budget."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0

    def take(self, text: str, where: str) -> None:
        # len(text) <= its UTF-8 size: a huge text is refused without even encoding it
        self.used += len(text) if len(text) > self.budget else len(text.encode("utf-8", "surrogatepass"))
        if self.used > self.budget:
            raise RequestError(413, f"{where}: the text is over this model's budget of {self.budget} bytes "
                                    f"({BYTES_PER_TOKEN} bytes per token of its context); shorten the prompt")


def _header_pixels(data: bytes, name: str, where: str) -> int:
    """An image's pixels from its header alone (nothing decoded); 413 past the per-image cap, 400 if no image."""
    try:
        width, height = image_size(data, name)
    except ImageBombError as err:
        raise RequestError(413, f"{where}: image too large ({err})") from None
    except MediaError as err:
        raise RequestError(400, f"{where}: not a usable image ({err})") from None
    return width * height


def _check_pixels(pixels: int, limits: Limits, call: CallBudget | None, where: str) -> None:
    budget = limits.budget("max_request_pixels")
    if pixels > budget:
        raise RequestError(413, f"{where}: the images come to {pixels} pixels, over this model's budget of "
                                f"{budget} pixels per request; send smaller images (the model resizes to its "
                                "AnyRes grid anyway)")
    if call is not None and call.pixels + pixels > limits.budget("max_call_pixels"):
        raise RequestError(413, f"{where}: the images of this call come to {call.pixels + pixels} pixels, over "
                                f"the budget of {limits.budget('max_call_pixels')} pixels per call; split it")


def _sampling(body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    def number(key: str, default: float, low: float, high: float) -> float:
        value = body.get(key, default)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise RequestError(400, f"{key} must be a number in [{low}, {high}]")
        return float(value)

    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError(400, "stop must be a string or a list of at most 4 strings")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # several choices per request are not implemented
        raise RequestError(400, f"n must be 1 (one choice per request), got {n!r}; send n separate requests")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(400, "seed must be an integer")
    return {"max_new_tokens": int(number("max_tokens", 64, 1, limits.max_new_tokens)),
            "temperature": number("temperature", 0.0, 0.0, 2.0), "top_p": number("top_p", 1.0, 0.01, 1.0),
            "stop": stop, "stream": _flag(body, "stream"), "seed": seed}


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"{key} must be true or false")
    return value
