"""Shared fixtures: one local Ray instance for the whole session (started on first use)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(
            num_cpus=8, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False
        )
        started = True
    yield ray
    if started:
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
