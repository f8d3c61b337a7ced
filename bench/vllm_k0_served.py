"""Served: vLLM without speculation (off) against our scheduler, worker and executor at every K = 0 (k0: the
draft model loaded, K_max 4), the same on vLLM's executor (k0-fetch: the engine core fetches the empty
drafts from the worker after every step), and our scheduler, worker and executor without a speculative config
(ours: what our code costs a plain step, apart from what the speculative config costs vLLM), launches
alternating; optionally a py-spy profile of each server's engine-core process and its worker process while
the client runs.

    python -m bench.vllm_k0_served --launches 3 [--modes off,k0,k0-fetch,ours] [--concurrency N] [--profile]
        [--out FILE.json]

The client is `--concurrency` threads, each a sequential loop of greedy completions (64 tokens, EOS ignored)
on the code prompts; it prints tokens/s per launch. Profiles (py-spy's raw format), the scheduler's step
records (modes with our scheduler) and server logs go to bench/results/raw/k0_served/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.http_load import load_prompts
from bench.peers import VllmServer
from bench.vllm_policy import MAX_SPEC_TOKENS, RAW, REPO, PolicySettings

OUT = RAW.parent / "k0_served"


MODES = ("off", "k0", "k0-fetch", "ours")


def completions_per_second(
    url: str, prompts: list[str], num_requests: int, max_tokens: int, concurrency: int = 1
) -> float:
    """Output tokens/s of `num_requests` greedy completions, `concurrency` at a time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = pool.map(
            lambda i: _completion(url, prompts[i % len(prompts)], max_tokens), range(num_requests)
        )
        tokens = sum(done)
    return tokens / (time.perf_counter() - start)


def _completion(url: str, prompt: str, max_tokens: int) -> int:
    """One greedy completion; its number of output tokens."""
    body = {
        "model": "demo-moe",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request) as response:
        completion_tokens: int = json.load(response)["usage"]["completion_tokens"]
    return completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=REPO / "models" / "demo-moe")
    parser.add_argument("--draft", type=Path, default=REPO / "models" / "demo-draft")
    parser.add_argument("--launches", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20, help="per launch (at least 2x --concurrency)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--modes", default="off,k0,k0-fetch", help=f"of {', '.join(MODES)}; off first")
    parser.add_argument("--profile", action="store_true", help="py-spy record the engine core (20 s)")
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--out", type=Path, help="also write the rates and ratios here (JSON)")
    args = parser.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        sys.exit("--profile needs py-spy on the PATH (pip install py-spy)")
    OUT.mkdir(parents=True, exist_ok=True)
    base = PolicySettings(
        target=args.target.resolve(),
        draft=args.draft.resolve(),
        served_name="demo-moe",
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=max(4, args.concurrency),
        cache_root=RAW / "vllm-cache",
        is_eager=True,
    )
    prompts = load_prompts("code", args.requests)
    modes = args.modes.split(",")
    if modes[0] != "off" or not set(modes) <= set(MODES):
        parser.error(f"--modes: off first, then any of {', '.join(MODES[1:])}; got {args.modes}")
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    started = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    for _ in range(args.launches):
        for mode in rates:
            stamp = int(time.time())
            policy = "" if mode == "off" else "off"
            record = OUT / f"record-{mode}-{stamp}.jsonl" if policy else None
            settings = dataclasses.replace(
                base, policy=policy, fetches_every_step=mode == "k0-fetch", record_path=record
            )
            num_spec = MAX_SPEC_TOKENS if mode in ("k0", "k0-fetch") else 0
            with VllmServer(
                Path(sys.executable), settings, num_spec, args.port, OUT / f"server-{mode}.log"
            ) as url:
                # warm-up: every slot once
                completions_per_second(url, prompts, args.concurrency, args.max_tokens, args.concurrency)
                profiler = None
                if args.profile:
                    found = subprocess.run(
                        ["pgrep", "-f", "VLLM::EngineCore"], capture_output=True, text=True
                    )
                    out = OUT / f"profile-{mode}-{stamp}.txt"
                    command = ["py-spy", "record", "--pid", found.stdout.split()[0], "--duration", "20"]
                    command.append("--subprocesses")  # the worker, a child of the engine core
                    profiler = subprocess.Popen(
                        [*command, "-r", "100", "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL
                    )
                rate = completions_per_second(url, prompts, args.requests, args.max_tokens, args.concurrency)
                if profiler is not None:
                    profiler.wait()
                rates[mode].append(rate)
                print(f"{mode}: {rate:.1f} tok/s", flush=True)
    summary: dict[str, list[float]] = {f"{mode}_tok_s": rates[mode] for mode in modes}
    for mode in modes[1:]:
        summary[f"{mode}_over_off"] = [r / off for off, r in zip(rates["off"], rates[mode], strict=True)]
    print(json.dumps(summary))
    if args.out is not None:
        run = {"command": " ".join(["python -m bench.vllm_k0_served", *sys.argv[1:]]), "started_utc": started}
        args.out.write_text(json.dumps({**run, **summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
