"""Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded) into our model.

Tensors are mapped by their names in the files (never from an in-memory state_dict): routed experts may be
stored one per expert (`experts.N.w1` / `gate_proj`, the hub layout) or fused (`experts.gate_up_proj`).
Every parameter must be filled exactly; a missing, unexpected or mis-shaped tensor is a ValueError naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from workers.config import ModelConfig
from workers.experts import MoEBlock
from workers.model import Transformer

_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_MIXTRAL_PART = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PARTS = ("gate_proj", "up_proj", "down_proj")
_FUSED_SUFFIXES = ("experts.gate_up_proj", "experts.down_proj")
_ExpertPart = tuple[str, int, str]  # (experts prefix, row in the stacked weights, one of _PARTS)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    hf = json.loads((Path(path) / "config.json").read_text())
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r} in {path}/config.json; supported: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_positions: int | None = None,
    expert_ids: Sequence[int] | None = None,
) -> Transformer:
    """Build the model for the checkpoint at `path` and fill its weights (only `expert_ids` if given)."""
    config = ModelConfig.from_dir(path)
    dtype = dtype or checkpoint_dtype(path)
    with torch.device("meta"), _skip_init():
        model = Transformer(config, max_positions, expert_ids)
    model = model.to_empty(device="cpu").to(dtype)
    model.rotary.reset_tables()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _fill(model, path)
    return model.eval()


@contextmanager
def _skip_init() -> Iterator[None]:
    """No random init while building on `meta`: every weight is overwritten by the checkpoint, and random
    ops on meta tensors import torch._dynamo (seconds in every new process)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _fill(model: Transformer, path: str | Path) -> None:
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    missing = set(params) - {"lm_head.weight"} if tied else set(params)
    missing -= {n for n in missing if n.endswith(_FUSED_SUFFIXES)}  # tracked per expert row, below
    expert_rows = _expert_rows(model)
    missing_experts = {
        (prefix, row, part)
        for prefix, rows in expert_rows.items()
        for row in rows.values()
        for part in _PARTS
    }
    for name, tensor in _tensors(Path(path)):
        name = _canonical(name)
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and tied):
            continue
        per_expert = _PER_EXPERT.match(name)
        if per_expert:
            missing_experts -= _fill_per_expert(params, expert_rows, per_expert, tensor, model, path)
        elif name.endswith(_FUSED_SUFFIXES) and name in params:
            missing_experts -= _fill_fused(params, expert_rows, name, tensor)
        elif name not in params:
            raise ValueError(f"unexpected tensor {name!r} in checkpoint {path}")
        else:
            _copy(params[name], tensor, name)
            missing.discard(name)
    _raise_if_missing(path, missing, missing_experts)


def _fill_per_expert(
    params: dict[str, nn.Parameter],
    expert_rows: dict[str, dict[int, int]],
    match: re.Match[str],
    tensor: torch.Tensor,
    model: Transformer,
    path: str | Path,
) -> set[_ExpertPart]:
    """Hub layout (`experts.N.gate_proj.weight`): one expert's part into its row of the stacked weights."""
    prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
    if prefix not in expert_rows or expert >= model.config.num_experts:
        raise ValueError(f"unexpected tensor {match.group(0)!r} in checkpoint {path}")
    row = expert_rows[prefix].get(expert)
    if row is None:  # this expert lives on another rank
        return set()
    _copy(_expert_slice(params, prefix, row, part), tensor, match.group(0))
    return {(prefix, row, part)}


def _fill_fused(
    params: dict[str, nn.Parameter], expert_rows: dict[str, dict[int, int]], name: str, tensor: torch.Tensor
) -> set[_ExpertPart]:
    """Fused layout (`experts.gate_up_proj` [E, 2*I, H], `experts.down_proj`): this rank's rows of all experts."""
    prefix = name.rsplit(".", 1)[0]
    rows = expert_rows[prefix]
    _copy_fused(params[name], tensor, name, rows)
    parts = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
    return {(prefix, row, part) for row in rows.values() for part in parts}


def _raise_if_missing(path: str | Path, missing: set[str], missing_experts: set[_ExpertPart]) -> None:
    if missing or missing_experts:
        names = sorted(missing) + sorted(f"{p}.{e}.{part}.weight" for p, e, part in missing_experts)
        raise ValueError(
            f"checkpoint {path} is missing tensors: {', '.join(names[:8])}"
            + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        )


def _expert_rows(model: Transformer) -> dict[str, dict[int, int]]:
    """For each MoE layer's experts prefix: global expert id -> row in the stacked weights."""
    rows: dict[str, dict[int, int]] = {}
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoEBlock):
            rows[f"model.layers.{i}.mlp.experts"] = {e: r for r, e in enumerate(layer.mlp.expert_ids)}
    return rows


def _canonical(name: str) -> str:
    """Map each family's tensor names onto ours (Mixtral's block_sparse_moe and w1/w2/w3)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = re.match(r"^(model\.layers\.\d+\.mlp\.experts\.\d+)\.(w[123])\.weight$", name)
    if m:
        name = f"{m.group(1)}.{_MIXTRAL_PART[m.group(2)]}.weight"
    return name


def _expert_slice(params: dict[str, torch.nn.Parameter], prefix: str, row: int, part: str) -> torch.Tensor:
    if part == "down_proj":
        return params[f"{prefix}.down_proj"].data[row]
    gate_up = params[f"{prefix}.gate_up_proj"].data[row]  # [2*I, H]: gate rows first, then up
    half = gate_up.shape[0] // 2
    return gate_up[:half] if part == "gate_proj" else gate_up[half:]


def _copy(dest: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")
    with torch.no_grad():
        dest.copy_(src.to(dest.dtype))


def _copy_fused(dest: torch.Tensor, src: torch.Tensor, name: str, rows: dict[int, int]) -> None:
    expected = (len(rows) and max(rows) + 1, *dest.shape[1:])
    if src.dim() != dest.dim() or tuple(src.shape[1:]) != tuple(dest.shape[1:]):
        raise ValueError(f"tensor {name!r} has shape {tuple(src.shape)}, expected {expected}")
    for expert, row in rows.items():
        _copy(dest.data[row], src[expert], f"{name}[{expert}]")


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)
