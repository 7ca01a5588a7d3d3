"""OpenAI-compatible endpoints: ``GET /v1/models`` and ``POST /v1/chat/completions``.

``user`` is the user id and ``model`` is ``personalize`` (the router picks) or ``personalize:<method>``. The
conversation becomes one prompt: the last user message, after the earlier turns as ``role: text`` lines. The answer
is the ordinary OpenAI shape plus a ``personalize`` field with the full result (the method that ran, retrieved ids
and scores, timings, notes). With ``stream`` the answer comes as server-sent events, ``data: {chunk}`` lines ending
with ``data: [DONE]``; the chunks are sent once the answer is decoded (decoding is batched, not streamed token by
token), so an error is always an ordinary JSON error response, never a broken stream.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from personalize.errors import InvalidInputError
from personalize.results import GenerationResult
from personalize.server import wire
from personalize.server.auth import Caller, authenticate
from personalize.server.routes import ERRORS, check_new_tokens, personalizer, run_generation, server_settings
from personalize.server.schemas import ChatIn, ChatMessage, GenerateIn
from personalize.serving.requests import METHODS

MODEL = "personalize"
router = APIRouter(prefix="/v1", responses=ERRORS)


def method_of(model: str) -> str:
    """``personalize`` is ``auto``; ``personalize:<method>`` names the method."""
    name, sep, method = model.partition(":")
    if name != MODEL or (sep and method not in METHODS):
        raise InvalidInputError(
            f"unknown model {model[:60]!r}: use {MODEL!r} or {MODEL}:<method>, method one of {', '.join(METHODS)}",
            "model",
        )
    return method if sep else "auto"


def conversation_prompt(messages: list[ChatMessage]) -> str:
    """The last user message, after the earlier turns as ``role: text`` lines."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        raise InvalidInputError("messages hold no user message to answer", "messages")
    earlier = [f"{m.role}: {m.text()}" for m in messages[:last] if m.text().strip()]
    return "\n".join([*earlier, messages[last].text()])


def generate_body(body: ChatIn) -> tuple[GenerateIn, str]:
    """The chat request as a generate request, and the name its token limit came under."""
    if body.user is None:
        raise InvalidInputError("user is required: it is the id of the user to personalize for", "user")
    if body.n not in (None, 1):
        raise InvalidInputError("n must be 1: decoding is greedy, every choice would be the same", "n")
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    n = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerateIn(
        user_id=body.user,
        prompt=conversation_prompt(body.messages),
        method=method_of(body.model),
        k=body.k,
        max_new_tokens=n,
        retriever=body.retriever,
        task=body.task,
    ), field


def finish_reason(result: GenerationResult, asked: int) -> str:
    return "length" if result.new_tokens >= asked else "stop"


def details(result: GenerationResult) -> dict[str, Any]:
    """The ``personalize`` field: the whole result but the answer's text (already in the message)."""
    out = wire.result_to_wire(result)
    out.pop("text")
    return out


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.new_tokens,
        "total_tokens": result.prompt_tokens + result.new_tokens,
    }


def completion(body: ChatIn, result: GenerationResult, asked: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": finish_reason(result, asked),
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "personalize": details(result),
    }


def pieces(text: str) -> list[str]:
    """The answer cut into word-sized deltas (each keeps its leading whitespace)."""
    return re.findall(r"\s*\S+|\s+$", text) or [""]


def chunks(body: ChatIn, result: GenerationResult, asked: int) -> Iterator[str]:
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = body.model

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for piece in pieces(result.text):
        yield event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    last = [{"index": 0, "delta": {}, "finish_reason": finish_reason(result, asked)}]
    yield event(last, personalize=details(result))
    if body.stream_options is not None and body.stream_options.include_usage:
        yield event([], usage=usage(result))
    yield "data: [DONE]\n\n"


@router.get("/models", summary="The models: personalize and personalize:<method>")
def models(caller: Caller = Depends(authenticate)) -> dict[str, Any]:
    names = [MODEL, *(f"{MODEL}:{m}" for m in METHODS if m != "auto")]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "personalize"} for n in names],
    }


@router.post("/chat/completions", summary="OpenAI-compatible chat completion for a user (user = the user id)")
def chat_completions(request: Request, body: ChatIn, caller: Caller = Depends(authenticate)) -> Any:
    generate, field = generate_body(body)
    caller.check_user(generate.user_id)
    check_new_tokens(generate.max_new_tokens, server_settings(request).max_new_tokens, field)
    result = run_generation(request, generate)
    asked = generate.max_new_tokens or personalizer(request).settings.max_new_tokens
    if body.stream:
        return StreamingResponse(
            chunks(body, result, asked),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return JSONResponse(completion(body, result, asked))
