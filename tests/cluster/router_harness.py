"""The Router over a local engine and an in-process ASGI transport: HTTP-level tests without Ray."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.requests import Request

from cluster.choosers import make_chooser
from cluster.config import AppConfig
from cluster.engine_builder import build_engine, local_backends
from cluster.engine_loop import EngineLoop
from cluster.router import Router
from tests.cluster.serving_app import app_args
from workers.tokenizer import Tokenizer

Scope = MutableMapping[str, Any]


def local_router(target: Path, draft: Path, api_key: str | None = None, **sections: dict[str, Any]) -> Router:
    """The app's engine (the same builder and derived settings), its models in this process."""
    config = AppConfig.from_args(app_args(target, draft, **sections))
    target_engine, drafter = local_backends(config)
    tokenizer = Tokenizer(target)
    chooser = make_chooser(config.policy, target_engine.info, config.engine.max_spec_tokens)
    engine = build_engine(config, target_engine, drafter, chooser, tokenizer)
    return Router(config, EngineLoop.for_config(config, engine), tokenizer, api_key)


def asgi(router: Router) -> Callable[[Scope, Any, Any], Awaitable[None]]:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        response = await router(Request(scope, receive))
        await response(scope, receive, send)

    return app
