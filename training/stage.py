"""One resumable training stage (AdamW, warmup-stable-decay schedule) and the demo pair's two losses.

A stage checkpoints its model, optimizer, step and history to `<work_dir>/<name>.pt` every
`checkpoint_every` steps; a checkpoint whose step equals the stage's length marks the stage as finished.
Batches depend only on (seed, stage, step) (see data.py), so resuming reproduces the uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from training.data import sample_batch

# (model, batch of shape (B, T + 1)) -> (loss to minimise, floats to log)
LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class StageResult:
    history: list[dict[str, float]]  # per step, the loss function's logged floats
    elapsed_s: float  # wall time of the whole stage, across resumes


@dataclass(frozen=True)
class StageConfig:
    name: str  # "target" or "draft": the checkpoint's file name and the progress bar's label
    stage_id: int  # mixed into the batch seed so that stages see different batches
    num_steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    batch_size: int
    seq_len: int
    mix: tuple[float, float, float]  # sampling weights of code, prose, synthetic windows
    seed: int
    checkpoint_every: int = 50
    log_every: int = 50


def lr_at(step: int, stage: StageConfig) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to a tenth over the last 20%.

    Until the decay starts, the schedule does not depend on `num_steps`, so a run can be resumed with a
    different length and still equal a run that had that length from the start.
    """
    decay_start = int(0.8 * stage.num_steps)
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    if step < decay_start:
        return stage.lr
    return stage.lr * (1.0 - 0.9 * (step - decay_start + 1) / (stage.num_steps - decay_start))


def run_stage(
    stage: StageConfig,
    model: torch.nn.Module,
    loss_fn: LossFn,
    streams: dict[str, np.ndarray],
    work_dir: Path,
    resume: bool,
) -> StageResult:
    """Train `model` in place (or load the finished stage's checkpoint) and return its history."""
    checkpoint_path = work_dir / f"{stage.name}.pt"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay)
    history: list[dict[str, float]] = []
    start, elapsed = 0, 0.0
    if resume and checkpoint_path.exists():
        start, history, elapsed = _load_checkpoint(checkpoint_path, model, optimizer, stage)
    model.train()
    began = time.perf_counter() - elapsed
    bar = tqdm(
        range(start, stage.num_steps), initial=start, total=stage.num_steps, desc=stage.name, mininterval=5
    )
    for step in bar:
        rng = np.random.default_rng([stage.seed, stage.stage_id, step])
        batch = sample_batch(streams, stage.mix, stage.batch_size, stage.seq_len, rng)
        metrics = _train_step(model, optimizer, loss_fn, batch, lr_at(step, stage))
        history.append(metrics)
        bar.set_postfix({key: f"{value:.3f}" for key, value in metrics.items()})
        done = step + 1
        if done % stage.log_every == 0:
            tqdm.write(f"[{stage.name}] step {done}: " + _mean_line(history[-stage.log_every :]))
        if done % stage.checkpoint_every == 0 or done == stage.num_steps:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done}
            state |= {"history": history, "elapsed_s": time.perf_counter() - began}
            _atomic_save(state, checkpoint_path)
    model.eval()
    return StageResult(history, time.perf_counter() - began)


def _train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: torch.Tensor, lr: float
) -> dict[str, float]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, metrics = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics


def _load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: StageConfig
) -> tuple[int, list[dict[str, float]], float]:
    """Restore model and optimizer; returns (step, history, elapsed seconds)."""
    state = torch.load(path, weights_only=False)
    if state["step"] > stage.num_steps:
        raise ValueError(f"{path} is at step {state['step']}, past this stage's {stage.num_steps} steps")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    tqdm.write(f"[{stage.name}] resumed at step {state['step']}/{stage.num_steps}")
    return state["step"], state["history"], state["elapsed_s"]


def _mean_line(history: list[dict[str, float]]) -> str:
    return " ".join(f"{key}={np.mean([m[key] for m in history]):.3f}" for key in history[0])


def _atomic_save(state: dict[str, object], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def target_loss(coef: float) -> LossFn:
    """Next-token cross-entropy plus `coef` times the load-balancing loss averaged over the MoE layers.

    Per layer, not Mixtral's single loss over all layers' routing pooled together: the pooled loss is
    satisfied when experts are balanced across layers and still lets single layers collapse (seen here).
    """

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        config: Any = model.config
        num_experts, top_k = config.num_local_experts, config.num_experts_per_tok
        per_layer: list[Any] = [
            load_balancing_loss_func((logits,), num_experts, top_k) for logits in out.router_logits
        ]
        aux = torch.stack([torch.as_tensor(x) for x in per_layer]).mean()
        return ce + coef * aux, {"ce": ce.item(), "aux": aux.item()}

    return loss_fn


def distill_loss(target: torch.nn.Module) -> LossFn:
    """KL(target || draft) per token, averaged; logs the draft's data cross-entropy and argmax agreement."""

    def loss_fn(draft: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = batch[:, :-1]
        with torch.no_grad():
            target_logp = F.log_softmax(target(input_ids=inputs, use_cache=False).logits, dim=-1)
        draft_logits = draft(input_ids=inputs, use_cache=False).logits
        draft_logp = F.log_softmax(draft_logits, dim=-1)
        kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1).mean()
        with torch.no_grad():
            ce = F.nll_loss(draft_logp.flatten(0, 1), batch[:, 1:].flatten())
            agree = (draft_logits.argmax(-1) == target_logp.argmax(-1)).float().mean()
        return kl, {"kl": kl.item(), "ce": ce.item(), "agree": agree.item()}

    return loss_fn
