"""Train the demo pair on this machine's Python and write it to `--out`.

    python -m training.train --out models/ [--resume]

Stages (each resumable from `--work-dir`, default `runs/demo`, which git ignores):
1. data: training corpus (corpus.py), byte-level BPE tokenizer (tokenizer.py), token streams (data.py);
2. target: MixtralForCausalLM, next-token cross-entropy + router load-balancing loss;
3. draft: LlamaForCausalLM, started from the target's embeddings and head, distilled from the target;
4. export: bf16 safetensors + config + generation config + tokenizer files into
   `<out>/demo-moe` and `<out>/demo-draft`; held-out losses and timings into `<work-dir>/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, PreTrainedModel

from training import architecture, corpus, data
from training.stage import StageConfig, StageResult, distill_loss, run_stage, target_loss
from training.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_tokenizer, train_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TrainConfig:
    shape: architecture.PairShape = field(default_factory=architecture.PairShape)
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 16
    target_steps: int = 300
    draft_steps: int = 120
    target_lr: float = 2e-3
    draft_lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    target_mix: tuple[float, float, float] = (0.5, 0.3, 0.2)  # code, prose, synthetic
    # The draft is distilled on code and synthetic text only, like a code-specialised draft: prose is
    # outside its domain, which makes prose the low-acceptance workload of the demo.
    draft_mix: tuple[float, float, float] = (0.65, 0.0, 0.35)
    num_synthetic_documents: int = 12_000
    num_heldout_synthetic_documents: int = 300
    num_eval_windows: int = 16  # per kind, for held-out losses
    num_threads: int = 2

    def __post_init__(self) -> None:
        if self.target_steps <= self.warmup_steps or self.draft_steps <= self.warmup_steps:
            raise ValueError(f"steps must exceed warmup_steps = {self.warmup_steps}")
        for mix in (self.target_mix, self.draft_mix):
            if min(mix) < 0 or sum(mix) <= 0:
                raise ValueError(f"mix {mix} must be non-negative weights with a positive sum")

    def stage(
        self, name: str, stage_id: int, num_steps: int, lr: float, mix: tuple[float, float, float]
    ) -> StageConfig:
        return StageConfig(
            name, stage_id, num_steps, lr, self.warmup_steps, self.weight_decay,
            self.batch_size, self.seq_len, mix, self.seed,
        )  # fmt: skip


def prepare_data(
    config: TrainConfig, work_dir: Path, resume: bool
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Train and held-out token streams by kind; the tokenizer lands in `<work_dir>/tokenizer`."""
    train_path, heldout_path = work_dir / "train_tokens.npz", work_dir / "heldout_tokens.npz"
    if resume and train_path.exists() and heldout_path.exists():
        return data.load_streams(train_path), data.load_streams(heldout_path)
    root = corpus.stdlib_root()
    train_docs = corpus.training_corpus(root, config.num_synthetic_documents, config.seed)
    heldout_docs = corpus.heldout_corpus(root, config.num_heldout_synthetic_documents, config.seed)
    texts = (d.text for kind in corpus.KINDS for d in train_docs[kind])
    tokenizer = train_tokenizer(texts, config.shape.vocab_size)
    save_tokenizer(tokenizer, work_dir / "tokenizer")
    train = {kind: data.encode_documents(tokenizer, docs) for kind, docs in train_docs.items()}
    heldout = {kind: data.encode_documents(tokenizer, docs) for kind, docs in heldout_docs.items()}
    data.save_streams(train_path, train)
    data.save_streams(heldout_path, heldout)
    return train, heldout


@torch.no_grad()
def heldout_metrics(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    heldout: dict[str, np.ndarray],
    config: TrainConfig,
) -> dict[str, dict[str, float]]:
    """Per kind: cross-entropy on held-out windows, and argmax agreement with `reference` if given."""
    metrics = {}
    for kind, stream in heldout.items():
        windows = data.eval_windows(stream, config.num_eval_windows, config.seq_len)
        logits = model(input_ids=windows[:, :-1], use_cache=False).logits
        result = {"ce": F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()}
        if reference is not None:
            reference_logits = reference(input_ids=windows[:, :-1], use_cache=False).logits
            result["agree"] = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
        metrics[kind] = result
    return metrics


def export(model: PreTrainedModel, directory: Path, tokenizer_dir: Path) -> None:
    """bf16 safetensors, config.json, generation_config.json and the tokenizer files."""
    model = model.bfloat16()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, directory / name)


def stage_summary(result: StageResult, stage: StageConfig) -> dict[str, Any]:
    last = result.history[-stage.log_every :]
    return {
        "steps": stage.num_steps,
        "tokens": stage.num_steps * stage.batch_size * stage.seq_len,
        "minutes": round(result.elapsed_s / 60, 1),
        "final_train": {key: round(float(np.mean([m[key] for m in last])), 4) for key in last[0]},
    }


def train(config: TrainConfig, out: Path, work_dir: Path, resume: bool) -> dict[str, Any]:
    torch.set_num_threads(config.num_threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    train_streams, heldout_streams = prepare_data(config, work_dir, resume)
    print(f"[data] tokens: { {kind: len(s) for kind, s in train_streams.items()} }", flush=True)

    torch.manual_seed(config.seed)
    target = architecture.build_target(config.shape)
    target_stage = config.stage("target", 1, config.target_steps, config.target_lr, config.target_mix)
    loss = target_loss(config.shape.router_aux_loss_coef)
    target_result = run_stage(target_stage, target, loss, train_streams, work_dir, resume)
    target.requires_grad_(False)

    torch.manual_seed(config.seed + 1)
    draft = architecture.build_draft(config.shape)
    architecture.init_draft_from_target(draft, target)
    draft_stage = config.stage("draft", 2, config.draft_steps, config.draft_lr, config.draft_mix)
    loss = distill_loss(target)
    draft_result = run_stage(draft_stage, draft, loss, train_streams, work_dir, resume)

    target_summary = stage_summary(target_result, target_stage)
    target_summary["heldout"] = heldout_metrics(target, None, heldout_streams, config)
    draft_summary = stage_summary(draft_result, draft_stage)
    draft_summary["heldout"] = heldout_metrics(draft, target, heldout_streams, config)
    parameters = {"target": architecture.num_parameters(target), "draft": architecture.num_parameters(draft)}
    summary: dict[str, Any] = {"config": asdict(config), "parameters": parameters}
    summary |= {"target": target_summary, "draft": draft_summary}
    export(target, out / "demo-moe", work_dir / "tokenizer")
    export(draft, out / "demo-draft", work_dir / "tokenizer")
    summary["total_minutes"] = round((time.perf_counter() - began) / 60, 1)
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("models"), help="writes <out>/demo-moe, <out>/demo-draft"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("runs/demo"), help="checkpoints and token caches"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work-dir")
    parser.add_argument("--target-steps", type=int, default=TrainConfig.target_steps)
    parser.add_argument("--draft-steps", type=int, default=TrainConfig.draft_steps)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args()
    config = TrainConfig(seed=args.seed, target_steps=args.target_steps, draft_steps=args.draft_steps)
    summary = train(config, args.out, args.work_dir, args.resume)
    print(
        json.dumps(
            {key: summary[key] for key in ("parameters", "target", "draft", "total_minutes")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
