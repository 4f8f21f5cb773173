"""Scoring: per-token log-prob of the ground truth and full-vocabulary entropy.

Backends share one interface (``ScoringBackend``) and are looked up by name in ``BACKENDS``
(lazy ``"module:Class"`` strings, so choosing one never imports the other's dependencies).
"""

from __future__ import annotations

import importlib
import os
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
    # torch backend: CPU threads of the forward; None: every core this process may run on. Set
    # explicitly, since Ray sets an actor's OMP_NUM_THREADS to the CPUs it reserves (1 by
    # default). vLLM on CPU keeps the process's count (see VllmBackend).
    num_threads: int | None = None
    tensor_parallel_size: int = 1


class ScoringBackend(Protocol):
    def score(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """Token id arrays -> one ``[T, 2]`` float32 array each: column 0 is log p(token i |
        tokens < i), column 1 the entropy of that prediction; row 0 is zero."""
        ...

    def close(self) -> None: ...


def cpu_threads(num_threads: int | None) -> int:
    """Threads for a CPU forward: ``num_threads``, or every core this process may run on."""
    if num_threads:
        return num_threads
    # The affinity mask, not os.cpu_count(): a container or taskset may allow fewer cores.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_cpu_threads(num_threads: int | None) -> int:
    """Run torch's CPU kernels on ``cpu_threads(num_threads)`` threads; returns that count."""
    import torch

    threads = cpu_threads(num_threads)
    # Only on a change: once a vLLM engine has started in this process, torch.set_num_threads is
    # vLLM's stub that logs a warning instead.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def create_backend(name: str, options: ScoringOptions) -> ScoringBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown scoring backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(options)
