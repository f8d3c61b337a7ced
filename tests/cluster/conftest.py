"""Ray Serve for the cluster tests: started once per session on a free port (Serve's HTTP options are fixed
by the first start; `serving_app.running_app` runs one app on it)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.serving_app import free_port


@pytest.fixture(scope="session")
def serve_url(ray_session: Any) -> str:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"
