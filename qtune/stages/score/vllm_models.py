"""vLLM pooling models that return, per prompt token, (target log-prob, full-vocabulary entropy).

Imported only inside vLLM engine processes (through the lazy registration in ``vllm_plugin``).
Each scorer subclasses the architecture's own vLLM causal-LM class, so weights load exactly as
for generation, and swaps generation for a pooler that runs the model's own ``compute_logits``
(LM head, logit scaling, soft-capping, tensor-parallel gather) in row chunks. Output per request
is a ``[T, 2]`` float32 tensor aligned with the prompt: row ``i`` describes the prediction of
token ``i`` from tokens ``< i``; row 0 has nothing to predict it and is zero. That is 8 bytes per
token leaving the engine instead of a Python dict per vocabulary entry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Set

import torch
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.tasks import PoolingTask
from vllm.v1.pool.metadata import PoolingMetadata

from qtune.stages.score.logits import chunk_rows_for, token_logprob_entropy
from qtune.stages.score.vllm_plugin import SCORER_PREFIX, SUPPORTED_ARCHITECTURES


class TokenScorePooler(Pooler):
    """Pooler for the ``token_classify`` task returning (log-prob, entropy) per token."""

    def __init__(self, compute_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int):
        super().__init__()
        # A plain attribute (not a submodule): the model owns the LM head.
        self._compute_logits = compute_logits
        self.chunk_rows = chunk_rows_for(vocab_size)

    def get_supported_tasks(self) -> Set[PoolingTask]:
        return {"token_classify"}

    def get_pooling_updates(self, task: PoolingTask) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(
        self, hidden_states: torch.Tensor, pooling_metadata: PoolingMetadata
    ) -> list[torch.Tensor]:
        cursor = pooling_metadata.get_pooling_cursor()
        if cursor.is_partial_prefill():
            raise RuntimeError(
                "qtune scorer got a partial prefill; the engine must run with chunked prefill "
                "off and max_num_batched_tokens >= max_model_len"
            )
        per_request = torch.split(hidden_states, cursor.num_scheduled_tokens_cpu.tolist())
        outputs = []
        # Only the CPU copy of the prompt ids is populated by every model runner.
        for hidden, token_ids in zip(
            per_request, pooling_metadata.get_prompt_token_ids_cpu(), strict=True
        ):
            token_ids = token_ids.to(hidden.device, non_blocking=True)
            scores = torch.zeros((hidden.shape[0], 2), dtype=torch.float32, device=hidden.device)
            if hidden.shape[0] > 1:
                scores[1:] = token_logprob_entropy(
                    hidden[:-1], token_ids[1:], self._compute_logits, self.chunk_rows
                )
            outputs.append(scores)
        return outputs


def _make_scorer(hf_architecture: str) -> type:
    module_name, class_name = SUPPORTED_ARCHITECTURES[hf_architecture].split(":")
    base = getattr(importlib.import_module(module_name), class_name)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: N807
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        vocab_size = vllm_config.model_config.hf_config.vocab_size
        self.pooler = TokenScorePooler(self.compute_logits, vocab_size)

    return type(
        f"{SCORER_PREFIX}{hf_architecture}",
        (base,),
        {
            "__init__": __init__,
            "__module__": __name__,
            "is_pooling_model": True,
            "default_tok_pooling_type": "ALL",
        },
    )


def __getattr__(name: str) -> type:
    # PEP 562: vLLM resolves "qtune.stages.score.vllm_models:QTuneScorer<Arch>" lazily.
    if name.startswith(SCORER_PREFIX) and name[len(SCORER_PREFIX) :] in SUPPORTED_ARCHITECTURES:
        cls = _make_scorer(name[len(SCORER_PREFIX) :])
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
