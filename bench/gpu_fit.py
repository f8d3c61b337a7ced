"""The policy's GPU figures, fitted to a `bench.gpu_step --graphs` run (no GPU needed):

    python -m bench.gpu_fit [bench/results/gpu_step.json]

- `fit_prior`: the four `cluster.choosers.Hardware` figures whose `analytic_prior` best explains the run's
  target and draft steps (`cluster.choosers.GPU_HARDWARE` holds them, rounded);
- `fit_cost_params`: each target's steps in the cost model's own form (`policy.presets`' H200-measured
  presets hold them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.gpu_step import CONFIGS, RESULTS
from policy.cost_model import CostModel, CostParams
from policy.cost_model_config import CostModelConfig
from policy.routing import RoutingConfig, expected_experts
from workers.config import ModelConfig

if TYPE_CHECKING:
    from cluster.choosers import Hardware

ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def model_config(name: str) -> ModelConfig:
    """Our `ModelConfig` of one of `CONFIGS` (what `cluster.choosers.analytic_prior` reads)."""
    values = dict(CONFIGS[name])
    values["architectures"] = [ARCHITECTURES[values.pop("model_type")]]
    values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    return ModelConfig.from_hf_dict(values)


def predicted_s(
    params: CostParams, target: ModelConfig, batch: int, num_spec_tokens: int
) -> tuple[float, float]:
    """The cost model's (`policy.cost_model.CostModel`) verify time of a batch verifying `num_spec_tokens`
    drafts in all, and its time for one draft step over the batch."""
    model = CostModel(CostModelConfig(RoutingConfig(target.num_experts, target.top_k)), params)
    _, verify_s, _ = model.phase_times(batch, 0, num_spec_tokens)
    draft_s, _, _ = model.phase_times(batch, 1, batch)
    return float(verify_s), float(draft_s)


def fit_prior(results: dict[str, Any]) -> tuple[Hardware, dict[str, float]]:
    """The `cluster.choosers.Hardware` figures (bandwidth, FLOP/s, per-layer and per-sequence overheads) whose
    `analytic_prior` best explains a `--graphs` run: the targets' steps (verify terms: fixed + per sequence +
    per expert * N(t) + per token * t) and the draft's (draft_fixed + draft_per_token * B), by least squares on
    log errors; and the fit's errors."""
    from scipy.optimize import least_squares

    from cluster.choosers import Hardware, analytic_prior  # here: the GPU machine has no Ray, pydantic, ...

    draft = model_config(results["draft"]["name"])
    targets = {name: model_config(name) for name in results["models"]}

    def hardware(x: Any) -> Hardware:
        bandwidth, flops, layer, sequence = np.exp(x)
        return Hardware(
            bandwidth_bytes_s=bandwidth, flops=flops, layer_overhead_s=layer, sequence_overhead_s=sequence
        )

    def residuals(x: Any) -> list[float]:
        errors = []
        priors = {name: analytic_prior(target, draft, 2, hardware(x)) for name, target in targets.items()}
        for name, target in targets.items():
            for p in results["models"][name]["points"]:
                tokens = p["num_tokens"] - p["batch_size"]
                verify_s = predicted_s(priors[name], target, p["batch_size"], tokens)[0]
                errors.append(math.log(verify_s / p["graph_s"]))
        name, target = next(iter(targets.items()))  # the draft's terms: the same in every target's prior
        for step in results["draft"]["steps"]:
            draft_s = predicted_s(priors[name], target, step["batch_size"], 0)[1]
            errors.append(math.log(draft_s / step["graph_s"]))
        return errors

    start = np.log([2e12, 3e14, 2e-5, 1e-6])
    fit = least_squares(residuals, start)
    errors = np.abs(np.array(fit.fun))
    num_steps = len(errors) - len(results["draft"]["steps"])
    return hardware(fit.x), {
        "target_rms_error": float(np.sqrt(np.mean(errors[:num_steps] ** 2))),
        "target_max_error": float(errors[:num_steps].max()),
        "draft_max_error": float(errors[num_steps:].max()),
    }


def fit_cost_params(results: dict[str, Any], name: str) -> tuple[dict[str, float], float]:
    """One target's measured step in the policy's own model form (`policy.cost_model.CostParams`): verify =
    fixed + per sequence * B + per expert * N(t) + per token * t over its replayed steps, draft = fixed + per
    sequence * B over the draft's, each by non-negative least squares on relative residuals; and the
    verify fit's largest relative error. (`policy.presets`' H200-measured presets hold the result.)"""
    from scipy.optimize import nnls

    target = model_config(name)
    points = results["models"][name]["points"]
    design = np.array([[1.0, p["batch_size"], float(expected_experts(p["num_tokens"], target.num_experts,
                        target.top_k)), p["num_tokens"]] for p in points])  # fmt: skip
    times = np.array([p["graph_s"] for p in points])
    verify, _ = nnls(design / times[:, None], np.ones(len(times)))
    steps = results["draft"]["steps"]
    draft_design = np.array([[1.0, s["batch_size"]] for s in steps])
    draft_times = np.array([s["graph_s"] for s in steps])
    draft, _ = nnls(draft_design / draft_times[:, None], np.ones(len(draft_times)))
    params = dict(zip(("fixed_s", "per_seq_s", "per_expert_s", "per_token_s"), verify.tolist(), strict=True))
    params.update(draft_fixed_s=float(draft[0]), draft_per_token_s=float(draft[1]))
    return params, float(np.max(np.abs(design @ verify / times - 1.0)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "result", type=Path, nargs="?", default=RESULTS, help="a bench.gpu_step --graphs result"
    )
    run = json.loads(parser.parse_args(argv).result.read_text())
    hardware, errors = fit_prior(run)
    print(f"{hardware}\n" + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    fits = {name: fit_cost_params(run, name) for name in run["models"]}
    for name, (params, max_error) in fits.items():
        print(f"{name} in CostParams' terms (largest error {max_error:.1%}): "
              + ", ".join(f"{k}={v:.4g}" for k, v in params.items()))  # fmt: skip
    return {"hardware": dataclasses.asdict(hardware), **errors, "cost_params": fits}


if __name__ == "__main__":
    main()
