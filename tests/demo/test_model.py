"""Tests for qtune.demo.model: tokenizer, chat templates, tiny models of each arch, training."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtune.demo.model import (
    ARCHITECTURES,
    CHATML_GENERATION_TEMPLATE,
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    build_bpe_tokenizer,
    save_tiny_model,
    tiny_config,
    train_tiny_model,
)

NON_ASCII = "Grüße aus Köln, naïve café — 東京タワー ☃ 🙂 ½"


def _conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Short single-turn additions, with a system prompt on every third conversation."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        conv = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        if i % 3 == 0:
            conv.insert(0, {"role": "system", "content": "You add numbers."})
        convs.append(conv)
    return convs


def _corpus() -> list[str]:
    texts = [m["content"] for conv in _conversations(200) for m in conv]
    return texts + ["user assistant system"] * 5 + [NON_ASCII] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(_corpus(), vocab_size=400)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]
RENDERED = (
    "<s><|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    "<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n"
)


# --- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_sized(tokenizer):
    again = build_bpe_tokenizer(_corpus(), vocab_size=400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert 256 + len(SPECIAL_TOKENS) < len(tokenizer) <= 400
    assert tokenizer.is_fast


@pytest.mark.parametrize(
    "text",
    [
        "What is 12 + 30? 12 + 30 = 42.",
        "  leading spaces,\ttabs\nand\r\nnewlines  ",
        NON_ASCII,
        "never seen: ЖЩЫ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # the corpus taught merges, so seen text is shorter than its bytes
    if text == NON_ASCII:
        assert len(ids) < len(text.encode())


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == SPECIAL_TOKENS[:3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.unk_token is None
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [i]
        ids = tokenizer(f"ab{token}cd", add_special_tokens=False)["input_ids"]
        assert ids.count(i) == 1
        assert tokenizer.decode(ids) == f"ab{token}cd"


def test_bos_added_exactly_once(tokenizer):
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    with_bos = tokenizer("hello world")["input_ids"]
    assert with_bos == [tokenizer.bos_token_id, *plain]
    assert tokenizer.bos_token_id not in plain
    assert tokenizer.eos_token_id not in with_bos
    chat_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True)["input_ids"]
    assert chat_ids.count(tokenizer.bos_token_id) == 1 and chat_ids[0] == tokenizer.bos_token_id
    assert chat_ids == tokenizer(RENDERED, add_special_tokens=False)["input_ids"]


def test_chat_template_renders(tokenizer):
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == RENDERED
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == RENDERED.split("2 + 3 = 5.")[0]
    assert "{% generation %}" not in CHATML_TEMPLATE


def test_generation_template_masks_assistant_content(tokenizer):
    rendered = tokenizer.apply_chat_template(
        MESSAGES, tokenize=False, chat_template=CHATML_GENERATION_TEMPLATE
    )
    assert rendered == RENDERED
    out = tokenizer.apply_chat_template(
        MESSAGES,
        chat_template=CHATML_GENERATION_TEMPLATE,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(masked) == "2 + 3 = 5.<|im_end|>"
    # the mask is one contiguous run ending just before the final newline
    first = mask.index(1)
    assert mask == [0] * first + [1] * len(masked) + [0]


def test_base_tokenizer_without_template():
    tok = build_bpe_tokenizer(_corpus(), vocab_size=300, chat_template=None)
    assert tok.chat_template is None
    assert tok("2 + 3")["input_ids"][0] == tok.bos_token_id


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be > 261"):
        build_bpe_tokenizer(["abc"], vocab_size=200)


# --- configs and saved models --------------------------------------------------------------------


def test_tiny_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown arch 'gpt2'; valid: llama, qwen2"):
        tiny_config("gpt2", 300)
    with pytest.raises(ValueError, match="head_dim 16"):
        tiny_config("llama", 300, hidden_size=64, num_heads=4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saved_model_reloads(tmp_path, tokenizer, arch):
    out = save_tiny_model(tmp_path / arch, arch, tokenizer, seed=1)
    assert (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config

    assert cfg.model_type == arch
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert getattr(cfg, "head_dim", 64) == 64
    assert cfg.vocab_size == len(tokenizer) == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.generation_config.eos_token_id == [2, 4]

    assert tok.is_fast and tok.chat_template == CHATML_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    # AutoTokenizer may pick an arch-specific class (Qwen2Tokenizer): encoding must not change
    for text in (RENDERED, NON_ASCII, "x  1234\n\n y"):
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]

    ids = tok.apply_chat_template(MESSAGES, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_save_is_seeded_and_leaves_global_rng(tmp_path, tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    save_tiny_model(tmp_path / "a", "llama", tokenizer, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    save_tiny_model(tmp_path / "b", "llama", tokenizer, seed=5)
    save_tiny_model(tmp_path / "c", "llama", tokenizer, seed=6)
    a, b, c = (load_file(tmp_path / d / "model.safetensors") for d in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


# --- training ------------------------------------------------------------------------------------


def test_training_lowers_loss_and_saves(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer)))
    result = train_tiny_model(
        model, tokenizer, _conversations(50, seed=1), max_steps=40, batch_size=16, seed=0
    )
    assert set(result) == {"steps", "first_loss", "final_loss", "seconds"}
    assert result["steps"] == 40
    # a random model starts near ln(vocab); 40 steps on one narrow task must cut that clearly
    assert result["first_loss"] == pytest.approx(math.log(len(tokenizer)), abs=1)
    assert result["final_loss"] < 0.7 * result["first_loss"]
    assert not model.training

    out = save_tiny_model(tmp_path / "trained", "llama", tokenizer, model=model)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer.apply_chat_template(MESSAGES)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_training_respects_time_limit(tokenizer):
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", len(tokenizer)))
    result = train_tiny_model(model, tokenizer, _conversations(8), max_seconds=0.0, max_steps=5)
    assert result["steps"] == 1  # the first step always runs; the limit is checked before each next
