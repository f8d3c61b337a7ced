"""Model configuration read from a Hugging Face `config.json`, for every architecture we run.

One frozen dataclass covers dense drafts and MoE targets; `from_hf_dict` maps each family's field names
onto ours and rejects what we do not support with a ValueError that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MOE_ARCHITECTURES = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
)
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError(f"rope theta and factor must be positive, got {self.theta}, {self.factor}")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (layers that are not MoE)
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2 families, attention_bias elsewhere)
    o_bias: bool = False  # bias on the output projection (attention_bias outside the Qwen2 families)
    qk_norm: str = "none"  # "none" | "per_head" (Qwen3) | "full" (OLMoE: over all heads at once)
    clip_qkv: float | None = None  # OLMoE
    sliding_window: int | None = None  # Mixtral; applied to every layer when set
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    top_k: int = 0  # experts per token (num_experts_per_tok)
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE shared expert (with a sigmoid gate)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.qk_norm not in ("none", "per_head", "full"):
            raise ValueError(f"qk_norm must be none, per_head or full, got {self.qk_norm!r}")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Which decoder layers route to experts (Qwen-MoE's decoder_sparse_step / mlp_only_layers)."""
        return (
            self.is_moe
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise ValueError(f"no config.json in checkpoint directory {path}")
        return cls.from_hf_dict(json.loads(config_path.read_text()))

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        architectures = hf.get("architectures") or []
        if len(architectures) != 1:
            raise ValueError(f"config.json must name exactly one architecture, got {architectures!r}")
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _require(hf, arch, name)
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        moe = _moe_fields(arch, hf)
        if arch.startswith("Qwen2") and hf.get("use_sliding_window"):
            raise ValueError(f"{arch}: use_sliding_window=true is not supported")
        if hf.get("mlp_bias"):
            raise ValueError(f"{arch}: mlp_bias=true is not supported")
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            intermediate_size=int(hf.get("intermediate_size") or 0),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=_qkv_bias(arch, hf),
            o_bias=not arch.startswith("Qwen2") and bool(hf.get("attention_bias", False)),
            qk_norm={"Qwen3ForCausalLM": "per_head", "Qwen3MoeForCausalLM": "per_head"}.get(
                arch, "full" if arch == "OlmoeForCausalLM" else "none"
            ),
            clip_qkv=hf.get("clip_qkv"),
            sliding_window=hf.get("sliding_window") if arch == "MixtralForCausalLM" else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_int_tuple(hf.get("eos_token_id")),
            **moe,
        )


def _moe_fields(arch: str, hf: dict[str, Any]) -> dict[str, Any]:
    if arch in DENSE_ARCHITECTURES:
        return {}
    if arch == "MixtralForCausalLM":
        return {
            "num_experts": int(_require(hf, arch, "num_local_experts")),
            "top_k": int(hf["num_experts_per_tok"]),
            "moe_intermediate_size": int(hf["intermediate_size"]),
            "norm_topk_prob": True,  # Mixtral always renormalises the top-k weights
        }
    fields: dict[str, Any] = {
        "num_experts": int(_require(hf, arch, "num_experts", "num_local_experts")),
        "top_k": int(hf["num_experts_per_tok"]),
        "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
    }
    if arch == "OlmoeForCausalLM":
        fields["moe_intermediate_size"] = int(hf["intermediate_size"])
        return fields
    fields["moe_intermediate_size"] = int(hf["moe_intermediate_size"])
    fields["decoder_sparse_step"] = int(hf.get("decoder_sparse_step") or 1)
    fields["mlp_only_layers"] = tuple(int(i) for i in hf.get("mlp_only_layers") or ())
    if arch == "Qwen2MoeForCausalLM":
        fields["shared_expert_intermediate_size"] = int(hf.get("shared_expert_intermediate_size") or 0)
    return fields


def _require(hf: dict[str, Any], arch: str, *names: str) -> Any:
    """The first of `names` present in config.json; a ValueError naming them if none is."""
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    raise ValueError(f"{arch} config.json lacks {' or '.join(names)}")


def _qkv_bias(arch: str, hf: dict[str, Any]) -> bool:
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "Qwen2MoeForCausalLM":
        return bool(hf.get("qkv_bias", True))
    return bool(hf.get("attention_bias", False))


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older checkpoints have rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor other than 1.0 is not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _int_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return (int(value),)
