"""bench.vllm_k0_served's client without vLLM: tokens per second from the completions' usage."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from bench.vllm_k0_served import completions_per_second


class _Completions(BaseHTTPRequestHandler):
    bodies: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        reply = json.dumps({"usage": {"completion_tokens": body["max_tokens"]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_: object) -> None:
        return None


def test_the_client_counts_the_completions_tokens_greedily() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Completions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rate = completions_per_second(url, ["a", "b"], 3, 7)
    finally:
        server.shutdown()
    assert rate > 0
    assert [b["prompt"] for b in _Completions.bodies] == ["a", "b", "a"]
    assert all(
        b["max_tokens"] == 7 and b["temperature"] == 0 and b["ignore_eos"] for b in _Completions.bodies
    )
