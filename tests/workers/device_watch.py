"""A torch function mode that finds tensors our runtime creates without naming their device."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import workers.runner

RUNTIME_DIR = Path(workers.runner.__file__).parent


class RequireDevice(TorchFunctionMode):
    """Records every call of a factory function from our runtime's code that does not pass `device=`."""

    FACTORIES = frozenset(
        {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange}
        | {torch.rand, torch.randn, torch.randint}
    )

    def __init__(self) -> None:
        super().__init__()
        self.missing: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            outer = traceback.extract_stack()[-2::-1]  # callers of this method, innermost first
            caller = next(f for f in outer if f"{os.sep}torch{os.sep}" not in f.filename)
            if Path(caller.filename).parent == RUNTIME_DIR:
                self.missing.append(f"{Path(caller.filename).name}:{caller.lineno} {caller.line}")
        return func(*args, **kwargs)
