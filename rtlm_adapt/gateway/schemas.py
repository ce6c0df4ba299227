"""Request and response bodies of the gateway's OpenAI-compatible API (pydantic).

The request models check what the gateway itself reads (messages or prompt, max_tokens,
stream, stream_options) with strict types, so a wrong type is a 400 naming the field rather
than a silent coercion; every other OpenAI or vLLM field passes through to the backend as sent.
The response models describe what the backends answer, for an accurate OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class _PassThrough(BaseModel):
    # Unknown fields are kept and forwarded; types of known fields are not coerced.
    model_config = ConfigDict(extra="allow", strict=True)


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 2.0; strict pydantic would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integral = Annotated[int, BeforeValidator(_integral)]
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]


class StreamOptions(_PassThrough):
    include_usage: bool | None = None


class ChatMessage(_PassThrough):
    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class _Generation(_PassThrough):
    model: str | None = None
    max_tokens: Count | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: Integral | None = Field(
        default=None, description="Ignored: the gateway sets vLLM's priority itself."
    )


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    # min_length on each member: beside the anyOf, JSON Schema would apply it to strings only
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    model_config = ConfigDict(extra="allow")
    index: int
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A backend's answer, passed through (fields beyond these are kept)."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    backends: dict[str, bool]
    queued: int


def prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    """The text the length predictor reads: the last user turn (what the answer replies to),
    or the completion prompt."""
    if isinstance(body, CompletionRequest):
        return body.prompt if isinstance(body.prompt, str) else "\n".join(body.prompt)
    for message in reversed(body.messages):
        if message.role == "user":
            return _content_text(message.content)
    return "\n".join(_content_text(m.content) for m in body.messages)


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # content parts: [{"type": "text", "text": "..."}, {"type": "image_url", ...}]
    return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
