"""The OpenAI-compatible wire format: request schemas (validated with msgspec, unknown fields refused) and
response/event builders. Nothing here touches the engine; `router.py` connects the two.

Our extension field: `num_spec_tokens` = "auto" (the policy decides, the default), "off", or an integer
0..max_spec_tokens to fix K for this request.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal

import msgspec

from workers.sampling import SamplingParams


class APIError(Exception):
    """An error answered in the OpenAI error format."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status,
            }
        }


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    user: str | None = None
    num_spec_tokens: int | Literal["auto", "off"] = "auto"


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[int]


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]


def parse_request(body: bytes, request_type: type[msgspec.Struct]) -> Any:
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as error:
        raise APIError(400, f"invalid request: {error}") from error
    except msgspec.DecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from error


def sampling_params(
    request: _SamplingFields, default_max_tokens: int, max_spec_tokens: int, stop_token_ids_allowed: range
) -> SamplingParams:
    """Check the ranges OpenAI documents and build the engine's SamplingParams (400 names the field)."""
    if request.n != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    if not (math.isfinite(request.temperature) and 0 <= request.temperature <= 2):
        raise APIError(400, f"temperature must be in [0, 2], got {request.temperature}", param="temperature")
    if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        raise APIError(400, f"top_p must be in (0, 1], got {request.top_p}", param="top_p")
    if request.top_k < 0:
        raise APIError(400, f"top_k must be >= 0, got {request.top_k}", param="top_k")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        raise APIError(400, "stop takes at most 4 non-empty strings of at most 256 characters", param="stop")
    stop_ids = request.stop_token_ids or []
    if any(t not in stop_token_ids_allowed for t in stop_ids):
        raise APIError(400, "stop_token_ids must be token ids of the vocabulary", param="stop_token_ids")
    if request.seed is not None and not 0 <= request.seed < 2**63:
        raise APIError(400, "seed must be in [0, 2**63)", param="seed")
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        max_tokens=max_tokens,
        stop_token_ids=tuple(stop_ids),
        stop=tuple(stops),
        ignore_eos=request.ignore_eos,
        num_spec_tokens=_num_spec_tokens(request.num_spec_tokens, max_spec_tokens),
    )


def _num_spec_tokens(value: int | str, max_spec_tokens: int) -> int | None:
    if value == "auto":
        return None
    if value == "off":
        return 0
    assert isinstance(value, int)
    if not 0 <= value <= max_spec_tokens:
        raise APIError(
            400,
            f"num_spec_tokens must be auto, off or 0..{max_spec_tokens}, got {value}",
            param="num_spec_tokens",
        )
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }


def completion_body(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str | None,
    chat: bool,
    usage_body: dict[str, int] | None,
    created: int | None = None,
) -> dict[str, Any]:
    """A whole response (usage given) or one streaming chunk (usage None, or a final usage-only chunk)."""
    created = created or int(time.time())
    if chat:
        key = "message" if usage_body is not None and finish_reason is not None else "delta"
        choice: dict[str, Any] = {
            "index": 0,
            key: {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        obj = "chat.completion" if key == "message" else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "text_completion"
    body: dict[str, Any] = {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else msgspec.json.encode(data).decode()
    return f"data: {payload}\n\n".encode()
