"""Does the draft's agreement with the target on a prompt predict its acceptance on what the target generates?

    python -m bench.prompt_agreement [--prompts-per-workload 96] [--max-tokens 64]

Why: a new request starts from the traffic's acceptance (`BatchAwareChooser`'s population estimate) and is
tested before its own estimate takes over. On the mixed workload, whose requests accept 0.55 (prose) to 0.87
(synthetic) on the demo pair, that start is wrong for most requests, and with 64-token requests the first
steps are a large share of each one. Both models read every prompt anyway (the target's prefill, the
drafter's catch-up), so their greedy agreement there is a per-request signal available before the first draft.

What: per prompt of the code, prose and synthetic sets, the target (transformers, greedy) generates
`--max-tokens` tokens; one forward of each model over prompt + generation gives each position's argmax. Prompt
agreement: the share of prompt positions where the draft's argmax equals the target's. Generation acceptance:
the same share over the generated positions, which is greedy speculation's per-token acceptance (the draft
proposes its argmax given the target's tokens). Printed: the means per workload, the correlation of the two
within each workload and over all, and how far the generation's acceptance is from three predictions (root
mean square): the population mean (what a new request starts from now), the prompt's workload mean (an oracle:
the workload label is not in a request), and a line fitted on prompt agreement. Writes
bench/results/prompt_agreement.json (or --out). CPU, a few minutes on the demo pair.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("code", "prose", "synthetic")
RESULTS = REPO / "bench" / "results" / "prompt_agreement.json"


def agreement(target: Any, draft: Any, prompt_ids: torch.Tensor, max_tokens: int) -> tuple[float, float]:
    """(prompt agreement, generation acceptance) of one prompt ([1, L] token ids)."""
    with torch.inference_mode():
        sequence = target.generate(prompt_ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        same = target(sequence).logits[0, :-1].argmax(-1) == draft(sequence).logits[0, :-1].argmax(-1)
    length = prompt_ids.shape[
        1
    ]  # position i predicts token i + 1: the last prompt position predicts the first
    return float(same[: length - 1].float().mean()), float(same[length - 1 :].float().mean())


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    prompt = np.array([r["prompt_agreement"] for r in rows])
    generated = np.array([r["generation_acceptance"] for r in rows])
    labels = np.array([r["workload"] for r in rows])
    summary: dict[str, Any] = {"workloads": {}}
    for workload in WORKLOADS:
        mask = labels == workload
        summary["workloads"][workload] = {
            "prompt_agreement": float(prompt[mask].mean()),
            "generation_acceptance": float(generated[mask].mean()),
            "correlation": float(np.corrcoef(prompt[mask], generated[mask])[0, 1]),
        }
    workload_mean = np.array([generated[labels == w].mean() for w in labels])
    line = np.poly1d(np.polyfit(prompt, generated, 1))
    summary.update(
        correlation=float(np.corrcoef(prompt, generated)[0, 1]),
        rms_error_population_mean=float(np.sqrt(np.mean((generated - generated.mean()) ** 2))),
        rms_error_workload_mean=float(np.sqrt(np.mean((generated - workload_mean) ** 2))),
        rms_error_prompt_line=float(np.sqrt(np.mean((generated - line(prompt)) ** 2))),
        prompt_line=[float(c) for c in line.coefficients],
    )
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=REPO / "models" / "demo-moe")
    parser.add_argument("--draft", type=Path, default=REPO / "models" / "demo-draft")
    parser.add_argument("--prompts", type=Path, default=REPO / "bench" / "prompts")
    parser.add_argument("--prompts-per-workload", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    rows, started = [], time.perf_counter()
    for workload in WORKLOADS:
        lines = (args.prompts / f"{workload}.jsonl").read_text().splitlines()
        for line in lines[: args.prompts_per_workload]:
            prompt_ids = tokenizer(json.loads(line)["prompt"], return_tensors="pt").input_ids
            prompt, generated = agreement(target, draft, prompt_ids, args.max_tokens)
            rows.append(
                {"workload": workload, "prompt_agreement": prompt, "generation_acceptance": generated}
            )
        print(f"{workload}: {len(rows)} prompts done, {time.perf_counter() - started:.0f} s", flush=True)
    summary = summarize(rows)
    for workload, figures in summary["workloads"].items():
        print(f"{workload}: prompt agreement {figures['prompt_agreement']:.3f}, generation acceptance "
              f"{figures['generation_acceptance']:.3f}, correlation within {figures['correlation']:.2f}")  # fmt: skip
    print(
        f"all: correlation {summary['correlation']:.2f}; rms error of the generation's acceptance from the "
        f"population mean {summary['rms_error_population_mean']:.3f}, the workload's mean (oracle) "
        f"{summary['rms_error_workload_mean']:.3f}, a line in prompt agreement {summary['rms_error_prompt_line']:.3f}"
    )
    recorded = {k: str(v) for k, v in vars(args).items() if k != "out"}
    for key in ("target", "draft", "prompts"):  # relative to the repository: no machine paths in results
        recorded[key] = str(Path(recorded[key]).resolve().relative_to(REPO))
    result = {"args": recorded, "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
