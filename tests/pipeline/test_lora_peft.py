"""The LoRA merge of ``checkpoints`` against peft's own ``merge_and_unload`` (peft: tests only).

Adapters are made by peft itself (``get_peft_model`` + ``save_pretrained``) with every trainable
tensor moved off its initial value (peft starts lora_B at zero, which would hide a wrong merge),
merged by peft in memory and by qtune on disk, and compared on the log-probs of the two models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qtune.demo.model import save_tiny_model, tiny_config
from qtune.pipeline import checkpoints
from qtune.pipeline.checkpoints import CheckpointError, resolve_checkpoint

peft = pytest.importorskip("peft")
LoraConfig = peft.LoraConfig
LORA_FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}
ATOL = 1e-5  # float32 log-probs: two merges of the same weights differ by rounding only


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny llama whose lm_head is tied to embed_tokens (only the embedding is stored)."""
    config = tiny_config("llama", len(tokenizer), tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = save_tiny_model(
        tmp_path_factory.mktemp("tied") / "model", "llama", tokenizer, model=model
    )
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    return out


@pytest.fixture(scope="module")
def tied_sharded_dir(tied_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tied-sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tied_dir / name, out / name)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert (
        len(set(index["weight_map"].values())) >= 2 and "lm_head.weight" not in index["weight_map"]
    )
    return out


def _peft_adapter(base: Path, out: Path, *, seed: int = 0, **lora: object):
    """Save a peft LoRA adapter of ``base`` into ``out``; returns the live PeftModel.

    Every trainable tensor (lora_A/B, modules_to_save copies) gets seeded noise added, as training
    would, so that both factors and the saved modules differ from their initial values.
    """
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = peft.get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(out)
    return peft_model


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.eval()(ids).logits.double(), dim=-1)


def _ids(vocab: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def _assert_matches_peft(peft_model, adapter: Path, base: Path, cache: Path) -> tuple[Path, object]:
    """qtune's merge of ``adapter`` gives peft's log-probs; returns (qtune's merged directory,
    peft's merged model)."""
    ckpt = resolve_checkpoint(adapter, base_model=base, cache_dir=cache)
    ours = AutoModelForCausalLM.from_pretrained(ckpt.model_dir, dtype=torch.float32)
    reference = peft_model.merge_and_unload()
    ids = _ids(reference.config.vocab_size)
    expected, got = _logprobs(reference, ids), _logprobs(ours, ids)
    base_lp = _logprobs(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), ids)
    assert (expected - base_lp).abs().max() > 1e-2  # the adapter changes the model
    max_diff = (got - expected).abs().max().item()
    assert max_diff < ATOL, f"max |Δ log-prob| against peft's merge: {max_diff:.3g}"
    return ckpt.model_dir, reference


# ---------------------------------------------------------------------------------------------
# Tied embeddings


@pytest.mark.parametrize(
    ("modules_to_save", "extra", "tied_after"),
    [
        # peft trains a copy of the embedding; lm_head keeps the original: the merge unties.
        (["embed_tokens"], {}, False),
        (["lm_head"], {}, False),
        (["embed_tokens", "lm_head"], {}, False),
        # ensure_weight_tying: one trained copy serves both, so the merge stays tied.
        (["embed_tokens"], {"ensure_weight_tying": True}, True),
    ],
    ids=["embed_tokens", "lm_head", "both", "ensure_weight_tying"],
)
def test_tied_embeddings_in_modules_to_save_merge_like_peft(
    tied_dir, tmp_path, modules_to_save, extra, tied_after
):
    if set(extra) - LORA_FIELDS:
        pytest.skip(f"peft {peft.__version__} has no {sorted(set(extra) - LORA_FIELDS)}")
    adapter = tmp_path / "adapter"
    peft_model = _peft_adapter(tied_dir, adapter, modules_to_save=modules_to_save, **extra)
    merged, reference = _assert_matches_peft(peft_model, adapter, tied_dir, tmp_path / "cache")
    peft_model_dir = tmp_path / "peft-merged"
    reference.save_pretrained(peft_model_dir)  # peft's merged model as peft users save it
    peft_config = json.loads((peft_model_dir / "config.json").read_text())
    config = json.loads((merged / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied_after is peft_config["tie_word_embeddings"]
    info = json.loads((merged / checkpoints.MERGE_INFO).read_text())
    assert info["untied_embeddings"] == ([] if tied_after else ["lm_head.weight"])


def test_tied_embedding_merge_onto_a_sharded_base(tied_sharded_dir, tmp_path):
    adapter = tmp_path / "adapter"
    peft_model = _peft_adapter(tied_sharded_dir, adapter, modules_to_save=["embed_tokens"])
    merged, _ = _assert_matches_peft(peft_model, adapter, tied_sharded_dir, tmp_path / "cache")
    base_index = json.loads((tied_sharded_dir / "model.safetensors.index.json").read_text())
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    # The untied lm_head is written beside the embedding it was tied to, and indexed there.
    embed_shard = base_index["weight_map"]["model.embed_tokens.weight"]
    assert index["weight_map"] == {**base_index["weight_map"], "lm_head.weight": embed_shard}
    shapes = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(merged / shard, framework="pt") as f:
            shapes.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    assert shapes["lm_head.weight"] == shapes["model.embed_tokens.weight"]
    added = 4 * shapes["lm_head.weight"][0] * shapes["lm_head.weight"][1]  # float32
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"] + added


def test_lora_on_a_tied_output_embedding_is_refused(tied_dir, tmp_path):
    adapter = tmp_path / "adapter"
    _peft_adapter(tied_dir, adapter, target_modules=["q_proj", "lm_head"])
    with pytest.raises(CheckpointError, match=r"lm_head.* tied .*merge_and_unload"):
        resolve_checkpoint(adapter, base_model=tied_dir, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# init_lora_weights and other adapter-config keys


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva", "mica"])
def test_inits_that_leave_the_base_unchanged_merge_like_peft(llama_dir, tmp_path, init):
    adapter = tmp_path / "adapter"
    try:
        peft_model = _peft_adapter(
            llama_dir, adapter, init_lora_weights=init, target_modules=["q_proj", "down_proj"]
        )
    except ValueError as e:  # an older peft without this init
        pytest.skip(f"peft {peft.__version__}: {e}")
    _assert_matches_peft(peft_model, adapter, llama_dir, tmp_path / "cache")


@pytest.mark.parametrize(
    "init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "future_init"]
)
def test_inits_that_change_the_base_are_refused(llama_dir, tmp_path, init):
    adapter = tmp_path / "adapter"
    _peft_adapter(llama_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["init_lora_weights"] = init
    if init == "lora_ga":  # as peft saves a LoRA-GA adapter
        config["lora_ga_config"] = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"init_lora_weights='{init}'.*merge_and_unload"):
        resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_adapters_converted_by_peft_merge_like_peft(llama_dir, tmp_path, init):
    # peft's documented way out: save the initial adapter, train, save the trained one converted
    # against it. The converted adapter (rank 2r, init_lora_weights: true) fits the saved base.
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=init
    )
    peft_model = peft.get_peft_model(model, config)
    peft_model.peft_config["default"].init_lora_weights = True  # peft's recipe for the initial
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = init
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(peft_model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "raw")
    with pytest.raises(CheckpointError, match=rf"init_lora_weights='{init}'.*weight_conversion"):
        resolve_checkpoint(tmp_path / "raw", base_model=llama_dir, cache_dir=tmp_path / "cache")
    converted = tmp_path / "converted"
    peft_model.save_pretrained(
        converted, path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    assert json.loads((converted / "adapter_config.json").read_text())["init_lora_weights"] is True
    # peft's merge of the trained model (on its modified base) is the truth.
    _assert_matches_peft(peft_model, converted, llama_dir, tmp_path / "cache")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("use_qalora", True),
        ("kasa_config", {"beta": 1e-4}),
        ("velora_config", {"rank": 2}),
        ("monteclora_config", {"mc_samples": 4}),
        ("use_bdlora", {"block_diagonal": True}),
        ("arrow_config", {"top_k": 2}),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("use_future_variant", True),  # a key this qtune does not know (a newer peft)
        ("future_variant_config", {"x": 1}),
    ],
)
def test_config_keys_that_change_the_merge_are_refused_by_name(llama_dir, tmp_path, key, value):
    adapter = tmp_path / "adapter"
    _peft_adapter(llama_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError, match=rf"\b{key}\b.*merge_and_unload") as info:
        resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "cache")
    assert str(adapter) in str(info.value)


def test_unknown_keys_that_are_off_are_allowed(llama_dir, tmp_path):
    adapter = tmp_path / "adapter"
    peft_model = _peft_adapter(llama_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    off = {"use_future_variant": False, "future_config": None, "future_patterns": {}}
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **off}))
    _assert_matches_peft(peft_model, adapter, llama_dir, tmp_path / "cache")


def test_every_lora_config_key_of_the_installed_peft_is_classified():
    # A newer peft adds keys: decide for each whether the merge implements it, then list it.
    unknown = LORA_FIELDS - checkpoints.KNOWN_LORA_CONFIG_KEYS
    assert not unknown, f"peft {peft.__version__} LoraConfig keys qtune does not know: {unknown}"


# ---------------------------------------------------------------------------------------------
# Which base


def test_adapter_base_other_than_model_path_warns_and_is_reported(
    llama_dir, model_dirs, tmp_path, caplog
):
    adapter = tmp_path / "adapter"
    peft_model = _peft_adapter(llama_dir, adapter)  # base_model_name_or_path: llama_dir
    qwen = model_dirs["qwen2"]
    with caplog.at_level(logging.WARNING, logger="qtune.pipeline.checkpoints"):
        ckpt = resolve_checkpoint(adapter, base_model=qwen, cache_dir=tmp_path / "cache")
    assert ckpt.base == llama_dir
    assert len(ckpt.warnings) == 1 and str(llama_dir) in ckpt.warnings[0]
    assert str(qwen) in ckpt.warnings[0]
    assert [r.levelno for r in caplog.records if r.message == ckpt.warnings[0]] == [logging.WARNING]
    # Merged onto the adapter's own base, which is what peft does.
    _assert_matches_peft(peft_model, adapter, qwen, tmp_path / "cache")
    # Reusing the cached merge reports it again.
    again = resolve_checkpoint(adapter, base_model=qwen, cache_dir=tmp_path / "cache")
    assert again.warnings == ckpt.warnings and again.model_dir == ckpt.model_dir


def test_adapter_base_equal_to_model_path_does_not_warn(llama_dir, tmp_path, caplog):
    adapter = tmp_path / "adapter"
    _peft_adapter(llama_dir, adapter)
    copy = shutil.copytree(llama_dir, tmp_path / "same-model-elsewhere")
    with caplog.at_level(logging.WARNING, logger="qtune.pipeline.checkpoints"):
        for base_model in (llama_dir, copy):
            ckpt = resolve_checkpoint(adapter, base_model=base_model, cache_dir=tmp_path / "c")
            assert ckpt.warnings == () and ckpt.base == llama_dir
    assert not caplog.records
