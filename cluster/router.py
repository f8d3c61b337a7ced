"""The ingress: OpenAI-compatible HTTP in front of the engine loop.

A plain class (no Ray): `app.py` wraps it in a Serve deployment; tests can drive it directly. Every
error a client causes is answered in the OpenAI error format and affects no other request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.config import AppConfig
from cluster.engine_loop import EngineClient, EngineFailure, short_reason
from cluster.metrics import CONTENT_TYPE
from cluster.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_body,
    logprobs_body,
    new_id,
    parse_request,
    sampling_params,
    sse,
    usage,
)
from workers.kv_cache import CacheCapacityError
from workers.sampling import TokenLogprob
from workers.sequence import RequestOutput
from workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


class Router:
    def __init__(
        self, config: AppConfig, loop: EngineClient, tokenizer: Tokenizer, api_key: str | None
    ) -> None:
        self.config = config
        self.loop = loop  # the engine: on a thread of this process, or in the target's host actor
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.metrics = loop.metrics
        self.created = int(time.time())
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/health"): self.health,
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.render_metrics,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
        }

    async def __call__(self, request: Request) -> Response:
        self.loop.start(asyncio.get_running_loop())
        handler = self.routes.get((request.method, request.url.path))
        try:
            if handler is None:
                known = {path for _, path in self.routes}
                status = 405 if request.url.path in known else 404
                raise APIError(status, f"no route for {request.method} {request.url.path}")
            if request.url.path != "/health":
                self._authorize(request)
            return await handler(request)
        except APIError as error:
            return error.response()
        except Exception as error:  # noqa: BLE001 (a bug of ours still answers in the OpenAI format)
            logger.exception("unexpected error serving %s %s", request.method, request.url.path)
            return APIError(500, f"internal error: {error}", error_type="server_error").response()

    # -- endpoints -------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Answers at once, from state the engine loop keeps (no call to a model replica)."""
        if not self.loop.is_alive:
            raise unavailable("the engine loop is not running")
        if self.loop.last_error is not None:
            raise unavailable(f"the last engine iteration failed: {self.loop.last_error}")
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.config.model.served_name,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "moespec",
                        "max_model_len": self.config.model.max_seq_len,
                    },
                ],
            }
        )

    async def render_metrics(self, request: Request) -> Response:
        for name, value in self.loop.gauges().items():
            self.metrics.set_gauge(name, value)
        return Response(self.metrics.render(), headers={"content-type": CONTENT_TYPE})

    async def completions(self, request: Request) -> Response:
        body = parse_request(await self._body(request), CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt)
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt_ids = list(prompt)
        else:
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt)", param="prompt")
        echo = None
        if body.echo:
            echo = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt_ids)
        return await self._generate(body, prompt_ids, chat=False, echo=echo)

    async def chat_completions(self, request: Request) -> Response:
        body = parse_request(await self._body(request), ChatCompletionRequest)
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(
                [
                    {"role": "system" if m.role == "developer" else m.role, "content": m.text}
                    for m in body.messages
                ]
            )
        except Exception as error:  # noqa: BLE001 (a template error is the request's problem, not ours)
            raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from error
        template = self.tokenizer.chat_template or ""
        prompt_ids = self.tokenizer.encode(text, add_bos="bos_token" not in template)
        return await self._generate(body, prompt_ids, chat=True)

    # -- generation ------------------------------------------------------------------------------------------

    async def _generate(
        self, body: Any, prompt_ids: list[int], chat: bool, echo: str | None = None
    ) -> Response:
        if body.model is not None and body.model != self.config.model.served_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.config.model.served_name!r}",
                param="model",
            )
        max_model_len = self.config.model.max_seq_len
        default_max = max(1, min(256, max_model_len - len(prompt_ids)))
        params = sampling_params(
            body, default_max, self.config.engine.max_spec_tokens, range(self.loop.vocab_size)
        )
        try:
            self.loop.validate(prompt_ids, params)  # the context length is the served max_model_len
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from error
        if self.loop.num_outstanding >= self.config.max_outstanding:
            self.metrics.count("requests_rejected_total")
            raise APIError(
                429,
                "the server is at capacity; retry later",
                error_type="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        request_id = new_id("chatcmpl" if chat else "cmpl")
        outputs = self.loop.submit(request_id, prompt_ids, params)
        self.metrics.count("requests_total")
        reply = _Reply(request_id, self.config.model.served_name, chat, params.num_logprobs is not None, echo)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(reply, outputs, include_usage), media_type="text/event-stream"
            )
        return await self._collect(reply, outputs)

    async def _collect(self, reply: _Reply, outputs: asyncio.Queue[Any]) -> Response:
        text, logprobs, last = [reply.echo or ""], [], None
        async for out in self._outputs(reply.request_id, outputs):
            text.append(out.new_text)
            logprobs += out.new_logprobs
            last = out
        assert last is not None
        return JSONResponse(
            completion_body(
                reply.request_id,
                reply.model,
                "".join(text),
                last.finish_reason,
                reply.chat,
                usage(last.num_prompt_tokens, last.num_output_tokens),
                reply.created,
                self._logprobs(reply, logprobs),
            )
        )

    async def _stream(
        self, reply: _Reply, outputs: asyncio.Queue[Any], include_usage: bool
    ) -> AsyncIterator[bytes]:
        try:
            if reply.echo:
                yield sse(self._chunk(reply, reply.echo, None, []))
            async for out in self._outputs(reply.request_id, outputs):
                if out.new_text or out.finish_reason or (reply.has_logprobs and out.new_logprobs):
                    yield sse(self._chunk(reply, out.new_text, out.finish_reason, out.new_logprobs))
                if out.is_finished and include_usage:
                    final = completion_body(
                        reply.request_id, reply.model, "", None, reply.chat, None, reply.created
                    )
                    final["choices"] = []
                    final["usage"] = usage(out.num_prompt_tokens, out.num_output_tokens)
                    yield sse(final)
        except APIError as error:
            yield sse(error.body())
        yield sse("[DONE]")

    def _chunk(
        self, reply: _Reply, text: str, finish_reason: str | None, logprobs: list[TokenLogprob]
    ) -> dict[str, Any]:
        body = completion_body(
            reply.request_id,
            reply.model,
            text,
            finish_reason,
            reply.chat,
            None,
            reply.created,
            self._logprobs(reply, logprobs),
        )
        reply.text_offset += len(text)
        return body

    def _logprobs(self, reply: _Reply, items: list[TokenLogprob]) -> dict[str, Any] | None:
        if not reply.has_logprobs:
            return None
        return logprobs_body(items, self._token_text, reply.chat, reply.text_offset)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _outputs(self, request_id: str, outputs: asyncio.Queue[Any]) -> AsyncIterator[RequestOutput]:
        """The request's outputs until it finishes; aborts it if the caller goes away (cancellation)."""
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise _as_api_error(item)
                finished = item.is_finished
                if item.finish_reason == "abort":
                    raise APIError(499, "the request was aborted")
                yield item
        finally:
            if not finished:
                self.loop.abort(request_id)

    # -- checks ----------------------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.api_key):
            raise APIError(
                401,
                "a valid API key is required (Authorization: Bearer <key>)",
                error_type="authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _body(self, request: Request) -> bytes:
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes")
        return body


@dataclass
class _Reply:
    """What every chunk of one response repeats, and where its text has got to."""

    request_id: str
    model: str
    chat: bool
    has_logprobs: bool
    echo: str | None  # the prompt text, for completions with echo
    created: int = field(default_factory=lambda: int(time.time()))
    text_offset: int = 0  # characters of the choice's text sent so far (completions' logprobs.text_offset)


def unavailable(message: str) -> APIError:
    return APIError(503, message, error_type="service_unavailable", headers={"Retry-After": "1"})


def _as_api_error(error: BaseException) -> APIError:
    """What a request's engine-side error means over HTTP: 400 only for what the client sent (the engine's
    validation of a new request), 504 past the deadline, 503 for server faults (short, no traceback)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, TimeoutError):
        return APIError(504, str(error), error_type="timeout")
    if isinstance(error, EngineFailure) and isinstance(error.error, CacheCapacityError):
        return APIError(
            503, f"the server has no free KV-cache slot; retry later ({error})", error_type="server_error"
        )
    if isinstance(error, EngineFailure):
        return APIError(
            503, f"the model failed while serving this request ({error})", error_type="server_error"
        )
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    return APIError(
        503, f"the server could not take this request ({short_reason(error)})", error_type="server_error"
    )
