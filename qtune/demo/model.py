"""Tiny causal LMs and byte-level BPE tokenizers built at run time, for the demo and the tests.

Nothing here downloads anything: the tokenizer is trained on the given texts with the
``tokenizers`` library, the model is a randomly initialised (seeded) Llama / Qwen2 / Qwen3 /
Mistral of about a million parameters, and :func:`train_tiny_model` teaches it a corpus in a few
minutes on a CPU. A directory written by :func:`save_tiny_model` loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and with vLLM (head_dim 64, float32, safetensors).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Special tokens, in id order: they get ids 0..4 in every tokenizer built here.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)

#: ChatML with a leading BOS: ``<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n…``.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Renders exactly like :data:`CHATML_TEMPLATE`; the assistant content and its ``<|im_end|>`` are
#: wrapped in ``{% generation %}``, so ``apply_chat_template(...,
#: return_assistant_tokens_mask=True)`` marks the tokens a trainer computes loss on.
CHATML_GENERATION_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}
# Head sizes vLLM's CPU attention supports (DESIGN.md section 5); 16 is not one of them.
_VLLM_CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512})
_MODEL_MAX_LENGTH = 1_000_000
_WARMUP_STEPS = 20
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX (GPT-4 style, digits one by one).
_QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Every byte is in the alphabet, so any NFC-normalised text round-trips through encode/decode
    (input is NFC-normalised first, and digits are split one by one, as in Qwen2). The special
    tokens of :data:`SPECIAL_TOKENS` get ids 0..4 and are never split. Like Llama, BOS ``<s>`` is
    prepended by the post-processor when ``add_special_tokens=True`` (the chat templates print it
    themselves, and ``apply_chat_template`` tokenizes without special tokens, so it appears once).
    ``chat_template=None`` gives a "base model" tokenizer without a template. Equal texts give an
    equal tokenizer. ``vocab_size`` must exceed the 256 bytes plus the special tokens.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= min_size:
        raise ValueError(
            f"vocab_size must be > {min_size} (bytes + special tokens); got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    # Qwen2's normaliser and pre-tokeniser, exactly: AutoTokenizer rebuilds a ``qwen2`` checkpoint's
    # tokenizer as Qwen2Tokenizer with these (whatever tokenizer.json says), so any other choice
    # would make a saved qwen2 tokenizer encode differently from the one it was saved from.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # Saved as ``"unk_token": null``; without it Qwen2Tokenizer adds an ``<|endoftext|>`` unk
        # token on load, one id past the model's vocabulary. Byte-level BPE never needs an unk.
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=_MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(
    arch: str,
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    bos_token_id: int = 1,
    eos_token_id: int | list[int] = 2,
    pad_token_id: int = 0,
) -> PretrainedConfig:
    """Config of a tiny float32 ``arch`` model; head_dim = hidden_size / num_heads (64 by default).

    The default token ids match :func:`build_bpe_tokenizer`. No sliding window, so every layer
    attends to the whole sequence in HF and vLLM alike.
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"need num_heads | hidden_size and num_kv_heads | num_heads; got hidden_size="
            f"{hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    head_dim = hidden_size // num_heads
    if head_dim not in _VLLM_CPU_HEAD_SIZES:
        raise ValueError(
            f"head_dim {head_dim} (hidden_size/num_heads) is not supported by vLLM's CPU attention;"
            f" valid: {sorted(_VLLM_CPU_HEAD_SIZES)}"
        )
    kwargs: dict = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype="float32",
    )
    if arch != "qwen2":  # Qwen2Config derives head_dim; the others take it explicitly
        kwargs["head_dim"] = head_dim
    if arch in ("qwen2", "qwen3"):
        kwargs["use_sliding_window"] = False
    if arch == "mistral":
        kwargs["sliding_window"] = None
    return _CONFIG_CLASSES[arch](**kwargs)


def save_tiny_model(
    out_dir: Path,
    arch: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    model: PreTrainedModel | None = None,
) -> Path:
    """Write model (safetensors, float32), tokenizer and generation config into ``out_dir``.

    Without ``model``, a tiny ``arch`` model sized for the tokenizer's vocabulary is initialised
    from ``seed`` (equal seeds give equal weights; the global torch RNG is left untouched). The
    generation config stops on ``</s>`` and, when the tokenizer has a chat template, also on
    ``<|im_end|>``. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    ids = _special_ids(tokenizer)
    if model is None:
        config = tiny_config(arch, len(tokenizer), **ids)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    elif model.config.model_type != arch:
        raise ValueError(f"model is a {model.config.model_type!r} model, arch says {arch!r}")
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"model vocab_size {model.config.vocab_size} < tokenizer size {len(tokenizer)}"
        )
    model = model.to(torch.float32)
    model.config.dtype = torch.float32
    eos_ids = [ids["eos_token_id"]]
    if tokenizer.chat_template is not None:
        eos_ids.append(tokenizer.convert_tokens_to_ids(IM_END))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=ids["pad_token_id"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def train_tiny_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    conversations: Sequence[list[dict]],
    *,
    max_seconds: float = 150.0,
    max_steps: int = 2000,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict:
    """Train ``model`` in place with causal-LM loss on each conversation's chat-template text.

    Loss is over every token of the rendered text (BOS excluded, padding masked), not only the
    assistant's. Each epoch visits the conversations in a new random order, in batches of similar
    length, from a generator seeded with ``seed`` (``torch.manual_seed(seed)`` is also called).
    AdamW at ``lr`` after a 20-step linear warmup (no decay: on the demo corpus a cosine decay over
    the budget did not lower the held-out loss), gradients clipped to norm 1. Stops after
    ``max_steps`` steps or once ``max_seconds`` have passed (checked before each step after the
    first), whichever comes first, and leaves the model in eval mode. Sequences longer than
    ``max_position_embeddings`` are cut.

    Returns ``steps``, ``first_loss`` (the first batch's loss), ``final_loss`` (mean loss of the
    last ten steps, or of all if fewer) and ``seconds``.
    """
    if tokenizer.chat_template is None:
        raise ValueError("tokenizer has no chat_template; train_tiny_model renders conversations")
    if not conversations:
        raise ValueError("no conversations to train on")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1; got {max_steps}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    max_len = model.config.max_position_embeddings
    texts = [tokenizer.apply_chat_template(conv, tokenize=False) for conv in conversations]
    encoded = [
        torch.tensor(ids[:max_len], dtype=torch.long)
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]
    ]
    pad_id = tokenizer.pad_token_id
    batch_size = min(batch_size, len(encoded))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    model.train()
    losses: list[float] = []
    lengths = torch.tensor([len(e) for e in encoded])
    batches: list[list[int]] = []
    start = time.monotonic()
    last_log = start
    try:
        # The first step always runs, so first_loss exists even with max_seconds=0.
        while len(losses) < max_steps and (not losses or time.monotonic() - start < max_seconds):
            for group in optimizer.param_groups:  # linear warmup, then constant
                group["lr"] = lr * min(1.0, (len(losses) + 1) / _WARMUP_STEPS)
            if not batches:
                batches = _epoch_batches(lengths, batch_size, generator)
            rows = [encoded[i] for i in batches.pop()]
            input_ids, attention_mask, labels = _pad_batch(rows, pad_id)
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {len(losses) + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            now = time.monotonic()
            if now - last_log >= 10.0:
                last_log = now
                logger.info(
                    "train step %d: loss %.4f (%.1f s, %.2f steps/s)",
                    len(losses),
                    losses[-1],
                    now - start,
                    len(losses) / (now - start),
                )
    finally:
        model.eval()
    seconds = time.monotonic() - start
    tail = losses[-10:]
    result = {
        "steps": len(losses),
        "first_loss": losses[0],
        "final_loss": math.fsum(tail) / len(tail),
        "seconds": seconds,
    }
    logger.info(
        "trained %d steps in %.1f s: loss %.4f -> %.4f",
        result["steps"],
        seconds,
        result["first_loss"],
        result["final_loss"],
    )
    return result


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer lacks {', '.join(missing)}; build it with build_bpe_tokenizer")
    return ids


def _epoch_batches(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch of full batches of similar length, in random order.

    Rows are shuffled, sorted by length within windows of 16 batches (so a batch pads to little
    more than its own rows' length; training on length-mixed chat data runs ~2x faster), cut into
    batches, and the batches shuffled. The last partial batch of the epoch is dropped.
    """
    order = torch.randperm(len(lengths), generator=generator)
    window = 16 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _pad_batch(
    rows: list[torch.Tensor], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad ``rows``; labels are the inputs with padding set to -100 (ignored by the loss)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels
