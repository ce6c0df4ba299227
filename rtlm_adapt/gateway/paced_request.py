"""What the paced backend reads from an OpenAI-style completion body (validated like vLLM's
server would: a bad field is a ValueError, which the backend answers with a 400).

>>> call = parse_call({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3},
...                   chat=True, default_model="paced", default_max_tokens=16)
>>> call.prompt_tokens, call.max_tokens, call.stream
(2, 3, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PacedCall:
    """A parsed completion request."""

    chat: bool
    model: str
    max_tokens: int
    stream: bool
    include_usage: bool
    priority: int
    prompt_tokens: int


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def count_words(content: Any) -> int:
    """Prompt 'tokens': whitespace words of text, text parts, or the length of a token-id list."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        if content and all(is_int(x) for x in content):
            return len(content)  # a pre-tokenized prompt
        return sum(count_words(x) for x in content)
    if isinstance(content, dict):  # a chat content part, {"type": "text", "text": ...}
        return count_words(content.get("text"))
    return 0


def parse_call(body: Any, *, chat: bool, default_model: str, default_max_tokens: int) -> PacedCall:
    """Validate an OpenAI-style body; raises ValueError (answered with a 400)."""
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        prompt_tokens = sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
    else:
        if "prompt" not in body:
            raise ValueError("'prompt' is required")
        prompt_tokens = count_words(body["prompt"])
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not is_int(max_tokens) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    priority = body.get("priority", 0)
    if not is_int(priority):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ValueError(f"stream must be a boolean, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ValueError("stream_options must be an object")
    model = body.get("model") or default_model
    return PacedCall(
        chat=chat,
        model=str(model),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=stream and bool(options.get("include_usage")),
        priority=priority,
        prompt_tokens=prompt_tokens,
    )
