"""Property-based fuzzing (hypothesis) of the three parsers that take outside input: the recipe parser,
the LLaVA-record validator of curation and the serving request parser. Whatever the input, each either
accepts it or fails with its own clean validation error - never anything else."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.curate.checks import REASONS, Limits, check_record
from onevision.recipe import RecipeError, parse_recipe
from serving.requests import Limits as RequestLimits
from serving.requests import RequestError, parse_chat_request

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=25)
KEYS = ["messages", "role", "content", "type", "text", "image_url", "video_url", "url", "max_tokens", "temperature",
        "top_p", "stop", "stream", "seed", "user", "assistant", "system", "data:image/png;base64,AAAA", "s3://x/y",
        "http://example.com/a.png", "id", "conversations", "from", "value", "human", "gpt", "image", "video",
        "<image>", "<video>", "<|im_end|>"]
structured = st.recursive(scalars | st.sampled_from(KEYS), lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(KEYS), inner, max_size=5), max_leaves=30)


@FUZZ
@given(st.dictionaries(st.sampled_from(["name", "model", "stages", "evaluation", "training", "curation",
                                        "deploy", "cluster", "extends", "description"]), json_values, max_size=8))
def test_recipe_parser_only_raises_recipe_errors(doc: dict) -> None:
    try:
        parse_recipe(doc)
    except RecipeError as err:
        assert str(err)  # names what is wrong


@FUZZ
@given(structured)
def test_record_validator_returns_a_verdict_for_anything(record) -> None:
    verdict = check_record(record, {}, Limits(model_max_length=512, video_frames=4))
    assert verdict.reason_code is None or (verdict.reason_code in REASONS and verdict.reason)


@FUZZ
@given(structured | st.text(max_size=40).map(lambda s: {"messages": [{"role": "user", "content": s}]}))
def test_request_parser_only_raises_request_errors(body) -> None:
    try:
        request = parse_chat_request(body, RequestLimits(allowed_s3_buckets=()))
    except RequestError as err:
        assert 400 <= err.status < 500 and err.message
    else:
        json.dumps(request.record)  # what it accepts is a well-formed record
