"""Reference backend: a Hugging Face ``transformers`` forward with chunked float32 log-softmax.

Runs any causal LM transformers can load (the fallback for architectures the vLLM plugin does not
cover). Sequences are sorted by length and packed into padded batches of at most
``tokens_per_forward`` tokens; logits are only ever materialised for a chunk of positions.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from qtune.stages.score import ScoringOptions, ScoringSetupError, use_cpu_threads
from qtune.stages.score.logits import chunk_rows_for, token_logprob_entropy

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchBackend:
    def __init__(self, options: ScoringOptions):
        from transformers import AutoModelForCausalLM

        self.options = options
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            use_cpu_threads(options.num_threads)
        if options.dtype == "auto":
            # Same rule as the vllm backend: float32 on CPU, the checkpoint's own dtype on GPU.
            dtype = "auto" if self.device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[options.dtype]
        try:
            model = AutoModelForCausalLM.from_pretrained(options.model_path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ScoringSetupError(f"torch backend cannot load {options.model_path}: {e}") from e
        self.model = model.to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        config = self.model.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None)
        self.chunk_rows = chunk_rows_for(config.vocab_size)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(-lengths, kind="stable")
        batches, current, width = [], [], 0
        for index in order:
            width = max(width, int(lengths[index]))
            if current and width * (len(current) + 1) > self.options.tokens_per_forward:
                batches.append(np.array(current))
                current, width = [], int(lengths[index])
            current.append(index)
        if current:
            batches.append(np.array(current))
        return batches

    @torch.inference_mode()
    def score(self, sequences: list[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(sequences)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        for batch in self._batches(lengths):
            width = int(lengths[batch].max())
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : lengths[index]] = torch.from_numpy(sequences[index].astype(np.int64))
                attention[row, : lengths[index]] = 1
            ids, attention = ids.to(self.device), attention.to(self.device)
            hidden = self.decoder(input_ids=ids, attention_mask=attention).last_hidden_state
            # Position t predicts token t + 1: score hidden[:, :-1] against ids[:, 1:].
            valid = attention[:, 1:].bool()
            scores = token_logprob_entropy(
                hidden[:, :-1][valid], ids[:, 1:][valid], self._logits, self.chunk_rows
            )
            per_row = torch.split(scores.cpu(), (lengths[batch] - 1).clip(min=0).tolist())
            for index, row_scores in zip(batch, per_row, strict=True):
                out = np.zeros((lengths[index], 2), dtype=np.float32)
                out[1:] = row_scores.numpy()
                results[index] = out
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for name in ("model", "decoder", "lm_head"):  # idempotent
            self.__dict__.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
