"""The OpenAI-compatible wire format: request schemas (validated with msgspec, unknown fields refused) and
response/event builders. Nothing here touches the engine; `router.py` connects the two.

Our extension field: `num_spec_tokens` = "auto" (the policy decides, the default), "off", or an integer
0..max_spec_tokens to fix K for this request.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from typing import Any, Literal

import msgspec
from starlette.responses import JSONResponse

from workers.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob


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

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

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
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM's; accepted, usage comes once at the end


# Every optional field takes null as "the default"; fields we do not implement are accepted only at their
# neutral value (`_refuse_unsupported`), so that clients that always send them keep working.
class _SamplingFields(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: off
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    user: str | None = None  # accepted and ignored
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # only empty
    num_spec_tokens: int | Literal["auto", "off"] | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]  # a string, token ids, or a one-element list of either
    echo: bool | None = None
    logprobs: int | None = None  # the chosen token's and this many alternatives per position
    suffix: str | None = None  # only null
    best_of: int | None = None  # only 1


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    tools: list[Any] | None = None  # only empty
    tool_choice: str | dict[str, Any] | None = None  # only "none" or "auto" (with no tools)
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None  # only empty
    function_call: str | dict[str, Any] | None = None  # only "none" or "auto"


def parse_request(body: bytes, request_type: type[msgspec.Struct]) -> Any:
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.ValidationError as error:
        raise APIError(400, f"invalid request: {error}", param=_error_param(str(error))) from error
    except msgspec.DecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from error


def _error_param(message: str) -> str | None:
    """The field a msgspec validation message is about: `$.messages[0].content` -> messages[0].content."""
    where = re.search(r"- at `\$\.?([^`]*)`", message)
    path = where.group(1) if where else ""
    named = re.search(r"(?:unknown|missing required) field `([^`]+)`", message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None


def _refuse_unsupported(request: _SamplingFields) -> None:
    """400 naming the field for any option we accept only at its neutral value."""
    unsupported: list[tuple[str, bool]] = [("logit_bias", bool(request.logit_bias))]
    if isinstance(request, CompletionRequest):
        unsupported += [("suffix", bool(request.suffix)), ("best_of", request.best_of not in (None, 1))]
    if isinstance(request, ChatCompletionRequest):
        text_format = request.response_format in (None, {"type": "text"})
        unsupported += [
            ("response_format", not text_format),
            ("tools", bool(request.tools)),
            ("tool_choice", request.tool_choice not in (None, "none", "auto")),
            ("functions", bool(request.functions)),
            ("function_call", request.function_call not in (None, "none", "auto")),
        ]
    for name, is_set in unsupported:
        if is_set:
            raise APIError(400, f"{name} is not supported by this server", param=name)


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def sampling_params(
    request: _SamplingFields, default_max_tokens: int, max_spec_tokens: int, stop_token_ids_allowed: range
) -> SamplingParams:
    """Check the ranges OpenAI documents and build the engine's SamplingParams (400 names the field)."""
    _refuse_unsupported(request)
    if _default(request.n, 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    temperature, top_p = _default(request.temperature, 1.0), _default(request.top_p, 1.0)
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = _default(request.top_k, 0)
    if top_k < -1:
        raise APIError(400, f"top_k must be >= 0 (or -1 for off), got {top_k}", param="top_k")
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
    penalties = {
        name: _penalty(request, name, default, low, high)
        for name, default, low, high in [
            ("presence_penalty", 0.0, -2.0, 2.0),
            ("frequency_penalty", 0.0, -2.0, 2.0),
            ("repetition_penalty", 1.0, 0.0, 2.0),
        ]
    }
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=max(0, top_k),
        seed=request.seed,
        max_tokens=max_tokens,
        stop_token_ids=tuple(stop_ids),
        stop=tuple(stops),
        ignore_eos=bool(request.ignore_eos),
        num_spec_tokens=_num_spec_tokens(_default(request.num_spec_tokens, "auto"), max_spec_tokens),
        num_logprobs=_num_logprobs(request),
        **penalties,
    )


def _penalty(request: _SamplingFields, name: str, default: float, low: float, high: float) -> float:
    value = float(_default(getattr(request, name), default))
    lowest_ok = value > low if name == "repetition_penalty" else value >= low
    if not (math.isfinite(value) and lowest_ok and value <= high):
        bounds = f"({low:g}, {high:g}]" if name == "repetition_penalty" else f"[{low:g}, {high:g}]"
        raise APIError(400, f"{name} must be in {bounds}, got {value}", param=name)
    return value


def _num_logprobs(request: _SamplingFields) -> int | None:
    """Completions: `logprobs` = n alternatives; chat: `logprobs` true with `top_logprobs` = n."""
    if isinstance(request, CompletionRequest):
        number, param = request.logprobs, "logprobs"
        if number is not None and request.echo:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    elif isinstance(request, ChatCompletionRequest):
        param = "top_logprobs"
        if not request.logprobs:
            if request.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        number = _default(request.top_logprobs, 0)
    else:
        return None
    if number is not None and not 0 <= number <= MAX_LOGPROBS:
        raise APIError(400, f"{param} must be in [0, {MAX_LOGPROBS}], got {number}", param=param)
    return number


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
    created: int,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole response (usage given) or one streaming chunk (usage None, or a final usage-only chunk)."""
    if chat:
        key = "message" if usage_body is not None and finish_reason is not None else "delta"
        choice: dict[str, Any] = {
            "index": 0,
            key: {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": logprobs,
        }
        obj = "chat.completion" if key == "message" else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
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


def logprobs_body(
    items: list[TokenLogprob], token_text: Callable[[int], str], chat: bool, text_offset: int = 0
) -> dict[str, Any]:
    """The `logprobs` of a choice: OpenAI's chat form (`content` entries) or the completions form
    (parallel lists; `text_offset` counts characters from the start of the choice's text)."""
    if chat:
        return {
            "content": [
                {
                    **_chat_token(token_text(item.token_id), item.logprob),
                    "top_logprobs": [_chat_token(token_text(t), lp) for t, lp in item.top],
                }
                for item in items
            ],
            "refusal": None,
        }
    tokens = [token_text(item.token_id) for item in items]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in items],
        "top_logprobs": [{token_text(t): lp for t, lp in item.top} for item in items],
        "text_offset": offsets,
    }


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else msgspec.json.encode(data).decode()
    return f"data: {payload}\n\n".encode()
