"""What prompts cost per token by the size of the chunk they are prefilled in, from our scheduler's step records.

`vllm bench serve` runs each cell as a closed loop of `concurrency` clients whose requests all generate the
same number of tokens (`--ignore-eos`). Without speculation the batch decodes in lock step: its requests end
in the same step, and the next wave's prompts arrive together and are prefilled in one large chunk. Drafting
(ours or vLLM's static K) commits a different number of tokens per request per step, so the requests drift
apart, and their successors' prompts are prefilled a few at a time, each chunk riding on a decode step. On
the regime pair (CPU build) a prompt token costs more in a small chunk than in a large one, and that alone
can cost a prose cell several percent against vLLM without speculation, whatever the policy drafts.

For each record: the prefill steps that drafted nothing (no draft step, no catch-up, no verified draft) at
batch `--min-batch` or more, each one's time beyond a plain decode step of its batch-size bucket (the median
plain step of the record) per prompt token, for chunks under `--large` tokens and at or above it, and over
all of them.

    python -m bench.prefill_chunks bench/results/raw/vllm_policy/record-auto-*.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from policy.cost_model import batch_bucket


def _is_plain(step: dict[str, Any]) -> bool:
    """A step that neither drafted nor verified drafts nor caught the drafter up."""
    return (
        not step["num_draft_steps"]
        and not (step.get("draft_prefill_tokens") or 0)
        and not any(step["num_drafts"].values())
    )


def prefill_costs(steps: list[dict[str, Any]], min_batch: int, large: int) -> dict[str, tuple[int, float]]:
    """(steps, ms per prompt token) for "small" and "large" chunks (their medians) and "all" (total extra time
    over total prompt tokens); a group without steps is left out."""
    plain: dict[int, list[float]] = defaultdict(list)
    for step in steps:
        if _is_plain(step) and not step["num_prefill_tokens"]:
            plain[batch_bucket(step["num_scheduled"])].append(step["step_time_s"])
    plain_s = {bucket: statistics.median(times) for bucket, times in plain.items()}
    per_token: dict[str, list[float]] = {"small": [], "large": []}
    extra_s = num_tokens = 0.0
    for step in steps:
        tokens, bucket = step["num_prefill_tokens"], batch_bucket(step["num_scheduled"])
        if not tokens or not _is_plain(step) or step["num_scheduled"] < min_batch or bucket not in plain_s:
            continue
        extra = step["step_time_s"] - plain_s[bucket]
        per_token["large" if tokens >= large else "small"].append(1000.0 * extra / tokens)
        extra_s, num_tokens = extra_s + extra, num_tokens + tokens
    costs = {name: (len(v), statistics.median(v)) for name, v in per_token.items() if v}
    if num_tokens:
        costs["all"] = (len(per_token["small"]) + len(per_token["large"]), 1000.0 * extra_s / num_tokens)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("records", nargs="+", type=Path, help="step records (record-*.jsonl)")
    parser.add_argument("--min-batch", type=int, default=12, help="the least batch a step is counted at")
    parser.add_argument("--large", type=int, default=256, help="prompt tokens from which a chunk is large")
    args = parser.parse_args()
    for path in args.records:
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        costs = prefill_costs(steps, args.min_batch, args.large)
        parts = [f"{name} {n} steps {ms:.2f} ms/token" for name, (n, ms) in costs.items()]
        print(f"{path.name}: " + (" | ".join(parts) or "no prefill steps without drafting"))


if __name__ == "__main__":
    main()
