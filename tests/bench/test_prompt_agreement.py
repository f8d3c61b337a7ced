"""The prompt-agreement study on the demo pair, two prompts per workload: greedy agreement on the prompt and
acceptance on the generation per prompt, summarized against the three predictions."""

from __future__ import annotations

import json
from pathlib import Path

from bench.prompt_agreement import main


def test_the_study_writes_each_prompts_agreement_and_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "agreement.json"
    result = main(["--prompts-per-workload", "2", "--max-tokens", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = result["rows"]
    assert [r["workload"] for r in rows] == ["code", "code", "prose", "prose", "synthetic", "synthetic"]
    for row in rows:
        assert 0.0 <= row["prompt_agreement"] <= 1.0 and 0.0 <= row["generation_acceptance"] <= 1.0
    summary = result["summary"]
    # A line fitted on the data does at least as well as the data's own mean (least squares), and the
    # workload means, fitted per group, too.
    assert summary["rms_error_prompt_line"] <= summary["rms_error_population_mean"] + 1e-12
    assert summary["rms_error_workload_mean"] <= summary["rms_error_population_mean"] + 1e-12
    assert result["args"]["target"] == "models/demo-moe"
