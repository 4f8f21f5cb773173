"""vLLM plugin entry point: registers qtune's token-scoring pooling models.

vLLM calls ``register`` in the driver and in every engine process it spawns (entry point group
``vllm.general_plugins``), so registration lives here rather than in the code that builds the
engine. Models are registered as lazy ``"module:Class"`` strings: importing this module does not
import the model code (or torch) and calling ``register`` twice is harmless.
"""

from __future__ import annotations

# HF architecture name (config.json "architectures") -> vLLM causal-LM class it is served with,
# as "vllm module:class". Each entry gets a scorer subclass in ``vllm_models``.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "vllm.model_executor.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3:Qwen3ForCausalLM",
}

SCORER_PREFIX = "QTuneScorer"


def scorer_architecture(hf_architecture: str) -> str:
    """Name under which the scorer for ``hf_architecture`` is registered in vLLM."""
    return f"{SCORER_PREFIX}{hf_architecture}"


def register() -> None:
    """Register one pooling model per supported architecture (idempotent)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for hf_arch in SUPPORTED_ARCHITECTURES:
        name = scorer_architecture(hf_arch)
        if name not in known:
            ModelRegistry.register_model(name, f"qtune.stages.score.vllm_models:{name}")
