"""The Router over a local engine and an in-process ASGI transport: HTTP-level tests without Ray."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch
from starlette.requests import Request

from cluster.choosers import make_chooser
from cluster.config import AppConfig
from cluster.router import Router
from tests.cluster.serving_app import app_args
from workers.drafter import Drafter
from workers.engine import EngineConfig, SpecEngine
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.target import Target
from workers.tokenizer import Tokenizer

Scope = MutableMapping[str, Any]


def local_router(target: Path, draft: Path, api_key: str | None = None, **sections: dict[str, Any]) -> Router:
    config = AppConfig.from_args(app_args(target, draft, **sections))
    cache = CacheConfig(config.model.max_seqs, config.model.max_seq_len + config.engine.max_spec_tokens + 1)
    target_engine = Target(ModelRunner.from_checkpoint(target, cache, dtype=torch.float32))
    drafter = Drafter(ModelRunner.from_checkpoint(draft, cache, dtype=torch.float32))
    tokenizer = Tokenizer(target)
    chooser = make_chooser(config.policy, target_engine.info, config.engine.max_spec_tokens)
    engine_config = EngineConfig(
        max_batch_size=config.engine.max_batch_size,
        max_spec_tokens=config.engine.max_spec_tokens,
        max_waiting=config.engine.max_waiting + config.engine.max_batch_size,
    )
    engine = SpecEngine(target_engine, drafter, chooser, engine_config, tokenizer)
    return Router(config, engine, tokenizer, api_key)


def asgi(router: Router) -> Callable[[Scope, Any, Any], Awaitable[None]]:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        response = await router(Request(scope, receive))
        await response(scope, receive, send)

    return app
