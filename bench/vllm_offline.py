"""vLLM's offline `LLM` on one checkpoint, run in vLLM's own environment (bench.peers.ensure_vllm_venv).

    python -m bench.vllm_offline greedy --model DIR --out FILE      # greedy token ids of the prompt sets
    python -m bench.vllm_offline steps --model DIR --batch-sizes 1 4 16 --max-spec-tokens 4 --out FILE

`greedy`: greedy completions (32 tokens) of the first prompts of every workload; bench.regime_pair
--check-vllm compares the wide target's with the shipped target's. `steps`: the time of one forward of
K+1 new tokens per sequence over a 32-token prefix that vLLM's prefix cache already holds (`generate` of
B prompts with max_tokens=1 after the prefixes were cached), for K = 0 (the plain decode step's shape)
.. max; medians over repeats, K rotating. Only the standard library and vLLM are imported: this runs in
vLLM's environment, not the project's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

PROMPTS = Path(__file__).resolve().parent / "prompts"
WORKLOADS = ("code", "prose", "synthetic", "mixed")
PREFIX_LEN = 32  # one KV block: cached whole by vLLM's prefix cache
BLOCK_SIZE = 32  # the CPU attention backend takes multiples of 32 only


def make_llm(model: str, dtype: str, max_num_seqs: int, is_eager: bool) -> Any:
    from vllm import LLM

    return LLM(
        enforce_eager=is_eager,
        model=model,
        dtype=dtype,
        max_model_len=512,
        max_num_seqs=max_num_seqs,
        seed=0,
        enable_prefix_caching=True,
        block_size=BLOCK_SIZE,
    )


def greedy(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    prompts = [
        json.loads(line)["prompt"]
        for workload in WORKLOADS
        for line in (PROMPTS / f"{workload}.jsonl").read_text().splitlines()[: args.num_prompts]
    ]
    llm = make_llm(args.model, args.dtype, len(prompts), args.eager)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {
        "model": args.model,
        "dtype": args.dtype,
        "is_eager": args.eager,
        "prompts": prompts,
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
    }


def token_windows(llm: Any, num: int, length: int) -> list[list[int]]:
    """`num` windows of `length` real tokens from the prompt sets, one after another."""
    tokenizer = llm.get_tokenizer()
    text = "\n".join(
        json.loads(line)["prompt"]
        for workload in WORKLOADS
        for line in (PROMPTS / f"{workload}.jsonl").read_text().splitlines()
    )
    ids = tokenizer.encode(text)
    if len(ids) < num * length:
        ids = ids * (num * length // len(ids) + 1)
    return [ids[i * length : (i + 1) * length] for i in range(num)]


def steps(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams, TokensPrompt

    max_batch = max(args.batch_sizes)
    llm = make_llm(args.model, args.dtype, max_batch, args.eager)
    one = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
    systems = list(range(args.max_spec_tokens + 1))
    windows = token_windows(llm, max_batch, PREFIX_LEN + len(systems))
    rows = []
    for batch_size in args.batch_sizes:
        batch = windows[:batch_size]

        def run(num_new: int, batch: list[list[int]] = batch) -> float:
            prompts = [TokensPrompt(prompt_token_ids=w[: PREFIX_LEN + num_new]) for w in batch]
            start = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            return time.perf_counter() - start

        run(1)  # caches the prefixes (and warms up this batch size)
        times: dict[int, list[float]] = {k: [] for k in systems}
        for repeat in range(args.repeats):
            shift = repeat % len(systems)
            for k in systems[shift:] + systems[:shift]:
                times[k].append(run(k + 1))
        plain = statistics.median(times[0])
        for k in systems:
            rows.append(
                {
                    "system": "vllm",
                    "batch_size": batch_size,
                    "num_spec_tokens": k,
                    "num_tokens": batch_size * (k + 1),
                    "step_ms": 1e3 * statistics.median(times[k]),
                    "ratio_to_plain": statistics.median(times[k]) / plain,
                    "fastest_ratio_to_plain": min(times[k]) / min(times[0]),
                    "experts_per_layer": None,  # vLLM does not report it
                    "draft_step_ms": None,
                    "times_s": times[k],
                }
            )
        print(f"[vllm steps] {args.model} B={batch_size}: plain {1e3 * plain:.1f} ms", flush=True)
    return {"model": args.model, "dtype": args.dtype, "is_eager": args.eager, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("greedy", "steps"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num-prompts", type=int, default=4, help="greedy: per workload")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy: tokens per completion")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-spec-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="no torch.compile: starts in half the time")
    args = parser.parse_args()
    result = greedy(args) if args.command == "greedy" else steps(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[vllm] wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
