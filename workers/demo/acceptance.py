"""Greedy acceptance of the demo draft against the demo target, per workload, and the target's expert usage.

    python -m workers.demo.acceptance [--target models/demo-moe] [--draft models/demo-draft]

Measured with `transformers` (until our own speculative engine reports it): for each held-out prompt the
target generates its greedy continuation (up to --max-new-tokens, stopping at EOS); one draft forward over
prompt + continuation gives the draft's argmax at every continuation position. alpha is the fraction of
positions where it equals the target's token: the per-token acceptance rate of greedy speculative decoding.
ETR(K) replays greedy speculative decoding on those matches (accepted run, capped at K, + 1 target token).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from workers.demo.prompts import read_prompt_set

WORKLOADS = ("code", "prose", "synthetic", "mixed")
MAX_NUM_SPEC_TOKENS = 4


@dataclass(frozen=True)
class PromptResult:
    workload: str
    num_prompt_tokens: int
    matches: list[bool]  # per continuation position: draft argmax == target's greedy token
    tokens_per_expert: list[list[int]]  # [num_moe_layers][num_experts] over prompt + continuation


def replay_etr(matches: list[bool], num_spec_tokens: int) -> tuple[int, int]:
    """(committed tokens, iterations) of greedy speculative decoding with K = num_spec_tokens."""
    position = num_iterations = 0
    while position < len(matches):
        accepted = 0
        while (
            accepted < num_spec_tokens and position + accepted < len(matches) and matches[position + accepted]
        ):
            accepted += 1
        position += accepted + 1  # the accepted drafts + one token from the target
        num_iterations += 1
    return len(matches), num_iterations


@torch.no_grad()
def measure_prompt(
    target: PreTrainedModel, draft: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, workload: str
) -> PromptResult:
    prompt = torch.tensor([prompt_ids])
    sequence = target.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
    continuation = sequence[0, len(prompt_ids) :]  # sequence: [1, P + N]
    draft_argmax = draft(input_ids=sequence[:, :-1]).logits[0, len(prompt_ids) - 1 :].argmax(-1)  # [N]
    router_logits = target(input_ids=sequence, output_router_logits=True).router_logits  # layers x [P+N, E]
    num_experts = target.config.num_local_experts
    top_k = target.config.num_experts_per_tok
    usage = [
        torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts).tolist()
        for logits in router_logits
    ]
    matches = (draft_argmax == continuation).tolist()
    return PromptResult(workload, len(prompt_ids), matches, usage)


def summarize(results: list[PromptResult]) -> dict[str, float]:
    matches = [m for r in results for m in r.matches]
    row = {"prompts": len(results), "positions": len(matches), "alpha": sum(matches) / max(1, len(matches))}
    for k in range(1, MAX_NUM_SPEC_TOKENS + 1):
        committed, iterations = map(sum, zip(*(replay_etr(r.matches, k) for r in results), strict=True))
        row[f"etr_k{k}"] = committed / max(1, iterations)
    return row


def expert_shares(results: list[PromptResult]) -> list[list[float]]:
    """Per MoE layer, each expert's share of the routed (token, expert) pairs."""
    totals = torch.tensor([r.tokens_per_expert for r in results]).sum(0).double()  # [layers, experts]
    return (totals / totals.sum(-1, keepdim=True)).tolist()


def check_round_trip(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> int:
    """Number of prompts that do not survive encode -> decode unchanged."""
    return sum(tokenizer.decode(tokenizer.encode(p, add_special_tokens=False)) != p for p in prompts)


def print_report(rows: dict[str, dict[str, float]], shares: list[list[float]], num_bad: int) -> None:
    etr_header = "".join(f" ETR(K={k})" for k in range(1, MAX_NUM_SPEC_TOKENS + 1))
    print(f"| workload  | prompts | positions | alpha |{etr_header} |")
    for workload, row in rows.items():
        etrs = "".join(f" {row[f'etr_k{k}']:8.2f}" for k in range(1, MAX_NUM_SPEC_TOKENS + 1))
        print(f"| {workload:<9} | {row['prompts']:7d} | {row['positions']:9d} | {row['alpha']:.3f} |{etrs} |")
    print("\nexpert usage of the target (share of routed token-expert pairs, %), all held-out prompts:")
    for layer, layer_shares in enumerate(shares):
        cells = " ".join(f"{100 * s:5.1f}" for s in layer_shares)
        print(
            f"  layer {layer}: {cells}   (min {100 * min(layer_shares):.1f}, max {100 * max(layer_shares):.1f})"
        )
    print(f"\ntokenizer round-trip failures on the held-out prompts: {num_bad}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=Path("models/demo-moe"))
    parser.add_argument("--draft", type=Path, default=Path("models/demo-draft"))
    parser.add_argument("--prompts", type=Path, default=Path("bench/prompts"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompts", type=int, default=None, help="per workload; default: all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the table and shares here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(args.draft).get_vocab():
        raise ValueError(f"{args.draft} and {args.target} do not share a tokenizer")

    cache: dict[str, PromptResult] = {}  # by prompt text: mixed.jsonl reuses the other sets' prompts
    by_workload: dict[str, list[PromptResult]] = {}
    all_prompts = []
    for workload in WORKLOADS:
        prompts = read_prompt_set(args.prompts / f"{workload}.jsonl")[: args.max_prompts]
        for p in prompts:
            if p.prompt not in cache:
                ids = tokenizer(p.prompt)["input_ids"]
                cache[p.prompt] = measure_prompt(target, draft, ids, args.max_new_tokens, p.workload)
                all_prompts.append(p.prompt)
        by_workload[workload] = [cache[p.prompt] for p in prompts]
        print(f"[{workload}] {summarize(by_workload[workload])}", flush=True)
    rows = {workload: summarize(results) for workload, results in by_workload.items()}
    shares = expert_shares(list(cache.values()))
    num_bad = check_round_trip(tokenizer, all_prompts)
    print_report(rows, shares, num_bad)
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "expert_shares": shares, "args": str(vars(args))}, indent=2)
        )


if __name__ == "__main__":
    main()
