"""Scoring: per-token log-prob of the ground truth and full-vocabulary entropy.

Backends share one interface (``ScoringBackend``) and are looked up by name in ``BACKENDS``
(lazy ``"module:Class"`` strings, so choosing one never imports the other's dependencies).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

BACKENDS: dict[str, str] = {
    "vllm": "qtune.stages.score.vllm_backend:VllmBackend",
    "torch": "qtune.stages.score.torch_backend:TorchBackend",
}


class ScoringSetupError(RuntimeError):
    """The model cannot be scored with the chosen backend (raised before or at engine start)."""


@dataclass(frozen=True)
class ScoringOptions:
    """Plain values a backend needs (taken from the user config by the pipeline)."""

    model_path: str
    max_length: int
    dtype: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_gib: int = 1
    enforce_eager: bool = True
    tokens_per_forward: int = 16384
    num_threads: int | None = None
    tensor_parallel_size: int = 1


class ScoringBackend(Protocol):
    def score(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """Token id arrays -> one ``[T, 2]`` float32 array each: column 0 is log p(token i |
        tokens < i), column 1 the entropy of that prediction; row 0 is zero."""
        ...

    def close(self) -> None: ...


def create_backend(name: str, options: ScoringOptions) -> ScoringBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown scoring backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(options)
