"""Greedy acceptance of the demo draft against the demo target, per workload, and the target's expert usage.

    python -m training.acceptance [--target models/demo-moe] [--draft models/demo-draft]

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
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training.prompts import read_prompt_set

WORKLOADS = ("code", "prose", "synthetic", "mixed")
MAX_NUM_SPEC_TOKENS = 4


@dataclass(frozen=True)
class PromptResult:
    workload: str
    num_prompt_tokens: int
    matches: list[bool]  # per continuation position: draft argmax == target argmax
    is_greedy: list[bool]  # per position: the batched generation's token == the unbatched target argmax
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
def greedy_continuations(
    target: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int
) -> list[list[int]]:
    """The target's greedy continuation of each prompt (through EOS), generated as one left-padded batch."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # [B, width]
    attention_mask = (torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long()
    out = target.generate(  # type: ignore[operator]
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad_id, eos_token_id=eos_id,
    )  # fmt: skip
    continuations = []
    for row in out[:, width:].tolist():
        continuations.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return continuations


@torch.no_grad()
def measure_prompt(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompt_ids: list[int],
    continuation: list[int],
    workload: str,
) -> PromptResult:
    """Teacher-forced over prompt + continuation, one sequence at a time (no padding)."""
    sequence = torch.tensor([prompt_ids + continuation])  # [1, P + N]
    positions = slice(
        len(prompt_ids) - 1, sequence.shape[1] - 1
    )  # the N positions that predict the continuation
    out = target(input_ids=sequence, output_router_logits=True)
    target_argmax = out.logits[0, positions].argmax(-1)  # [N]
    draft_argmax = draft(input_ids=sequence).logits[0, positions].argmax(-1)  # [N]
    top_k, num_experts = target.config.num_experts_per_tok, target.config.num_local_experts
    usage = [
        torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=num_experts).tolist()
        for logits in out.router_logits  # per MoE layer: [P + N, num_experts]
    ]
    is_greedy = (target_argmax == torch.tensor(continuation)).tolist()
    return PromptResult(workload, len(prompt_ids), (draft_argmax == target_argmax).tolist(), is_greedy, usage)


def summarize(results: list[PromptResult]) -> dict[str, float]:
    matches = [m for r in results for m in r.matches]
    row = {"prompts": len(results), "positions": len(matches), "alpha": sum(matches) / max(1, len(matches))}
    is_greedy = [g for r in results for g in r.is_greedy]
    row["greedy_consistency"] = sum(is_greedy) / max(1, len(is_greedy))
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
    ks = range(1, MAX_NUM_SPEC_TOKENS + 1)
    print(
        "| workload  | prompts | positions | alpha | "
        + " | ".join(f"ETR K={k}" for k in ks)
        + " | greedy check |"
    )
    print("|-----------|---------|-----------|-------|" + "---------|" * len(ks) + "--------------|")
    for workload, row in rows.items():
        etrs = " | ".join(f"{row[f'etr_k{k}']:7.2f}" for k in ks)
        counts = f"{int(row['prompts']):7d} | {int(row['positions']):9d}"
        print(
            f"| {workload:<9} | {counts} | {row['alpha']:.3f} | {etrs} | {row['greedy_consistency']:12.3f} |"
        )
    print("\nexpert usage of the target (share of routed token-expert pairs, %), all held-out prompts:")
    for layer, layer_shares in enumerate(shares):
        cells = " ".join(f"{100 * s:5.1f}" for s in layer_shares)
        print(
            f"  layer {layer}: {cells}   (min {100 * min(layer_shares):.1f}, max {100 * max(layer_shares):.1f})"
        )
    print(f"\ntokenizer round-trip failures on the held-out prompts: {num_bad}")


def measure_workloads(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
) -> dict[str, list[PromptResult]]:
    cache: dict[str, PromptResult] = {}  # by prompt text: mixed.jsonl reuses the other sets' prompts
    by_workload: dict[str, list[PromptResult]] = {}
    for workload in WORKLOADS:
        prompts = read_prompt_set(args.prompts / f"{workload}.jsonl")[: args.max_prompts]
        todo = list(dict.fromkeys(p for p in prompts if p.prompt not in cache))
        for start in tqdm(range(0, len(todo), args.batch_size), desc=workload, mininterval=10):
            batch = todo[start : start + args.batch_size]
            ids = [tokenizer(p.prompt)["input_ids"] for p in batch]
            continuations = greedy_continuations(
                target, ids, args.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
            for p, prompt_ids, continuation in zip(batch, ids, continuations, strict=True):
                cache[p.prompt] = measure_prompt(target, draft, prompt_ids, continuation, p.workload)
        by_workload[workload] = [cache[p.prompt] for p in prompts]
    return by_workload


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=Path("models/demo-moe"))
    parser.add_argument("--draft", type=Path, default=Path("models/demo-draft"))
    parser.add_argument("--prompts", type=Path, default=Path("bench/prompts"))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompts", type=int, default=None, help="per workload; default: all")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batched greedy generation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the table and shares here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(args.draft).get_vocab():
        raise ValueError(f"{args.draft} and {args.target} do not share a tokenizer")

    by_workload = measure_workloads(target, draft, tokenizer, args)
    rows = {workload: summarize(results) for workload, results in by_workload.items()}
    all_results = {id(r): r for results in by_workload.values() for r in results}.values()
    shares = expert_shares(list(all_results))
    prompts = [p.prompt for w in WORKLOADS for p in read_prompt_set(args.prompts / f"{w}.jsonl")]
    print_report(rows, shares, check_round_trip(tokenizer, prompts))
    if args.json:
        report = {"rows": rows, "expert_shares": shares, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
