"""Checkpoints: layouts, completeness, LoRA merge (PEFT on-disk format), tokenizer check."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtune.demo.model import CHATML_GENERATION_TEMPLATE, IM_END, build_bpe_tokenizer
from qtune.pipeline.checkpoints import (
    Checkpoint,
    CheckpointError,
    check_same_tokenizer,
    checkpoint_kind,
    is_complete,
    resolve_checkpoint,
)
from qtune.pipeline.publish import model_fingerprint

TRAINER_EXTRAS = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
PEFT = "base_model.model."


def _trainer_checkpoint(model_dir: Path, root: Path, step: int = 10, *, state: bool = True) -> Path:
    """A Trainer checkpoint-<step>: the model's files, fake optimizer/RNG state, trainer_state."""
    ckpt = root / f"checkpoint-{step}"
    shutil.copytree(model_dir, ckpt)
    for name in TRAINER_EXTRAS:
        (ckpt / name).write_bytes(b"\x00fake trainer state\x00")
    if state:
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ckpt


def _base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def _write_adapter(
    out: Path,
    base: Path | str,
    *,
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    extra_config: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    ranks: dict[str, int] | None = None,
    fan_in_fan_out: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a LoRA adapter in PEFT's on-disk format; returns base weight key -> (A, B).

    A is [r, in_features] and B [out_features, r] (in and out swapped with fan_in_fan_out); both
    random, so the delta is not zero. ``ranks`` gives per-module ranks (as a rank_pattern would).
    """
    shapes = {k: list(v.shape) for k, v in _base_weights(Path(base)).items()}
    gen = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module.rsplit(".", 1)[-1] not in targets:
            continue
        rank = (ranks or {}).get(module, r)
        out_f, in_f = reversed(shape) if fan_in_fan_out else shape
        a = torch.randn(rank, in_f, generator=gen) * 0.2
        b = torch.randn(out_f, rank, generator=gen) * 0.2
        tensors[f"{PEFT}{module}.lora_A.weight"] = a
        tensors[f"{PEFT}{module}.lora_B.weight"] = b
        factors[key] = (a, b)
    tensors.update(extra_tensors or {})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    config.update(extra_config or {})
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return factors


@pytest.fixture
def sharded_dir(llama_dir, tmp_path) -> Path:
    """The llama test model re-saved in about three shards with a model.safetensors.index.json."""
    out = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(llama_dir / name, out / name)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    return out


# ---------------------------------------------------------------------------------------------
# Detection and completeness


def test_checkpoint_kind_detects_each_layout(llama_dir, tmp_path):
    trainer = _trainer_checkpoint(llama_dir, tmp_path)
    lora = tmp_path / "adapter"
    _write_adapter(lora, llama_dir)
    peft_ckpt = tmp_path / "peft-run" / "checkpoint-5"
    _write_adapter(peft_ckpt, llama_dir)
    (peft_ckpt / "trainer_state.json").write_text("{}")
    random_dir = tmp_path / "random"
    random_dir.mkdir()
    (random_dir / "notes.txt").write_text("not a model")
    (tmp_path / "file.safetensors").write_bytes(b"x")

    assert checkpoint_kind(llama_dir) == "model"
    assert checkpoint_kind(trainer) == "trainer"
    assert checkpoint_kind(lora) == "lora"
    assert checkpoint_kind(peft_ckpt) == "lora"
    assert checkpoint_kind(random_dir) is None
    assert checkpoint_kind(tmp_path / "missing") is None
    assert checkpoint_kind(tmp_path / "file.safetensors") is None


def test_trainer_checkpoint_is_complete_only_once_trainer_state_is_written(llama_dir, tmp_path):
    ckpt = _trainer_checkpoint(llama_dir, tmp_path, state=False)
    assert checkpoint_kind(ckpt) == "trainer"
    assert not is_complete(ckpt)
    with pytest.raises(CheckpointError, match=r"incomplete: trainer_state\.json is missing"):
        resolve_checkpoint(ckpt, base_model=llama_dir, cache_dir=tmp_path / "cache")
    (ckpt / "trainer_state.json").write_text('{"global_step": 1')  # still being written
    assert not is_complete(ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_step": 10}')
    assert is_complete(ckpt)


def test_sharded_model_is_incomplete_while_a_listed_shard_is_missing(sharded_dir, tmp_path):
    assert checkpoint_kind(sharded_dir) == "model" and is_complete(sharded_dir)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = sharded_dir / sorted(set(index["weight_map"].values()))[-1]
    aside = tmp_path / "aside.safetensors"
    shutil.move(shard, aside)
    assert not is_complete(sharded_dir)
    with pytest.raises(CheckpointError, match=shard.name):
        resolve_checkpoint(sharded_dir, base_model=sharded_dir, cache_dir=tmp_path / "cache")
    shutil.move(aside, shard)
    assert is_complete(sharded_dir)
    # Shards written but the index (saved after them) not yet: incomplete.
    (sharded_dir / "model.safetensors.index.json").unlink()
    assert checkpoint_kind(sharded_dir) == "model" and not is_complete(sharded_dir)


def test_empty_or_truncated_weights_are_incomplete(llama_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"")
    assert checkpoint_kind(model) == "model" and not is_complete(model)
    weights.write_bytes(data[:-100])  # a writer still flushing the tail
    assert not is_complete(model)
    weights.write_bytes(data)
    assert is_complete(model)
    (model / "config.json").unlink()
    assert not is_complete(model)


def test_resolves_model_and_trainer_checkpoints_in_place(llama_dir, tmp_path):
    ckpt = resolve_checkpoint(str(llama_dir), base_model=llama_dir, cache_dir=tmp_path / "cache")
    assert ckpt == Checkpoint(llama_dir, "model", llama_dir, model_fingerprint(llama_dir))
    assert (ckpt.base, ckpt.warnings) == (None, ())
    trainer = _trainer_checkpoint(llama_dir, tmp_path)
    resolved = resolve_checkpoint(trainer, base_model=llama_dir, cache_dir=tmp_path / "cache")
    assert (resolved.kind, resolved.model_dir) == ("trainer", trainer)
    assert resolved.fingerprint == model_fingerprint(trainer) != ckpt.fingerprint
    assert not (tmp_path / "cache").exists()


def test_resolve_refuses_missing_and_unknown_paths(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path / "nope", base_model=llama_dir, cache_dir=tmp_path / "c")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout .* found weights\.npz"):
        resolve_checkpoint(tmp_path / "odd", base_model=llama_dir, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# LoRA merge


def _lora_logits(base: Path, factors: dict, scaling: float, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the unmerged model: the base plus scaling * x A^T B^T added by forward hooks."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    for key, (a, b) in factors.items():
        module = modules[key.removesuffix(".weight")]
        module.register_forward_hook(
            lambda _m, inputs, out, a=a, b=b: out + scaling * (inputs[0] @ a.T @ b.T)
        )
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("use_rslora", "scaling"), [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_lora_merge_equals_base_plus_scaled_delta(llama_dir, tmp_path, use_rslora, scaling):
    adapter = tmp_path / "adapter"
    factors = _write_adapter(adapter, llama_dir, extra_config={"use_rslora": use_rslora})
    assert len(factors) == 4  # q_proj and v_proj of two layers
    cache = tmp_path / "cache"

    ckpt = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=cache)

    assert ckpt.kind == "lora" and ckpt.path == adapter
    assert ckpt.model_dir == cache / ckpt.fingerprint and is_complete(ckpt.model_dir)
    base, merged = _base_weights(llama_dir), _base_weights(ckpt.model_dir)
    assert merged.keys() == base.keys()
    for key, weight in base.items():
        assert merged[key].dtype == torch.float32
        if key in factors:
            a, b = factors[key]
            expected = weight.double() + scaling * (b.double() @ a.double())
            torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-5)
            assert not torch.equal(merged[key], weight)
        else:
            assert torch.equal(merged[key], weight), key

    tokenizer = AutoTokenizer.from_pretrained(ckpt.model_dir)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(llama_dir).get_vocab()
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(ckpt.model_dir).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        logits = model(ids).logits
    reference = _lora_logits(llama_dir, factors, scaling, ids)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(llama_dir)(ids).logits
    assert (logits - base_logits).abs().max() > 1e-2  # the adapter changes the model


def test_merged_model_is_cached_and_reused(llama_dir, tmp_path):
    adapter = tmp_path / "adapter"
    _write_adapter(adapter, llama_dir)
    cache = tmp_path / "cache"
    first = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=cache)
    weights = first.model_dir / "model.safetensors"
    stamp = (weights.stat().st_mtime_ns, first.model_dir.stat().st_mtime_ns)

    second = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=cache)

    assert second == first
    assert (weights.stat().st_mtime_ns, first.model_dir.stat().st_mtime_ns) == stamp
    assert [p.name for p in cache.iterdir()] == [first.fingerprint]  # no staging leftovers
    assert json.loads((first.model_dir / "_qtune_merge.json").read_text())["merged_modules"] == 4
    # A different adapter is a different merged model.
    other = tmp_path / "other"
    _write_adapter(other, llama_dir, seed=1)
    third = resolve_checkpoint(other, base_model=llama_dir, cache_dir=cache)
    assert third.fingerprint != first.fingerprint
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.fingerprint, third.fingerprint])


def test_a_merge_cached_by_an_older_merge_format_is_redone(llama_dir, tmp_path, caplog):
    adapter = tmp_path / "adapter"
    _write_adapter(adapter, llama_dir)
    cache = tmp_path / "cache"
    first = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=cache)
    info_path = first.model_dir / "_qtune_merge.json"
    info = json.loads(info_path.read_text())
    assert info["format"] == 2
    good = (first.model_dir / "model.safetensors").read_bytes()
    # What an older qtune left: no format in the merge info (and, say, other weights).
    del info["format"]
    info_path.write_text(json.dumps(info))
    weights = load_file(first.model_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, first.model_dir / "model.safetensors", metadata={"format": "pt"})

    with caplog.at_level(logging.WARNING, logger="qtune.pipeline.checkpoints"):
        again = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=cache)

    assert again == first
    assert "older qtune (merge format 1, now 2); merging again" in caplog.text
    assert json.loads(info_path.read_text())["format"] == 2
    assert (first.model_dir / "model.safetensors").read_bytes() == good
    assert [p.name for p in cache.iterdir()] == [first.fingerprint]  # nothing left aside


def test_a_concurrent_merge_of_the_same_adapter_is_used(llama_dir, tmp_path, monkeypatch):
    from qtune.pipeline import checkpoints

    adapter = tmp_path / "adapter"
    _write_adapter(adapter, llama_dir)
    done = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "first")
    cache = tmp_path / "cache"
    write_merged = checkpoints._write_merged

    def racing_write(base: Path, out: Path, plan) -> None:
        # Another process finishes the same merge while this one is still writing.
        shutil.copytree(done.model_dir, cache / done.fingerprint)
        write_merged(base, out, plan)

    monkeypatch.setattr(checkpoints, "_write_merged", racing_write)
    ckpt = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=cache)
    assert ckpt.model_dir == cache / done.fingerprint and is_complete(ckpt.model_dir)
    assert [p.name for p in cache.iterdir()] == [done.fingerprint]  # our staging copy is gone


def test_rank_and_alpha_patterns_and_fan_in_fan_out(llama_dir, tmp_path):
    adapter = tmp_path / "adapter"
    layer0_q = "model.layers.0.self_attn.q_proj"
    factors = _write_adapter(
        adapter,
        llama_dir,
        ranks={f"model.layers.{i}.self_attn.v_proj": 2 for i in range(2)},
        extra_config={
            "rank_pattern": {"v_proj": 2},
            "alpha_pattern": {"layers.0.self_attn.q_proj": 16},
        },
        fan_in_fan_out=True,
    )
    ckpt = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "cache")
    base, merged = _base_weights(llama_dir), _base_weights(ckpt.model_dir)
    expected_scaling = {
        f"{layer0_q}.weight": 16 / 4,
        "model.layers.1.self_attn.q_proj.weight": 8 / 4,
        "model.layers.0.self_attn.v_proj.weight": 8 / 2,
        "model.layers.1.self_attn.v_proj.weight": 8 / 2,
    }
    assert factors.keys() == expected_scaling.keys()
    for key, (a, b) in factors.items():
        delta = (b.double() @ a.double()).T  # fan_in_fan_out: weights stored [in, out]
        expected = base[key].double() + expected_scaling[key] * delta
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-5)


def test_modules_to_save_and_trained_biases_replace_base_tensors(llama_dir, tmp_path):
    base = _base_weights(llama_dir)
    new_head = torch.randn_like(base["lm_head.weight"])
    new_norm = torch.randn_like(base["model.norm.weight"])
    adapter = tmp_path / "adapter"
    factors = _write_adapter(
        adapter,
        llama_dir,
        targets=("o_proj",),
        extra_config={"modules_to_save": ["lm_head", "norm"]},
        extra_tensors={
            f"{PEFT}lm_head.weight": new_head,  # PEFT >= 0.14 layout
            f"{PEFT}model.norm.modules_to_save.default.weight": new_norm,  # older layout
        },
    )
    ckpt = resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "cache")
    merged = _base_weights(ckpt.model_dir)
    assert torch.equal(merged["lm_head.weight"], new_head)
    assert torch.equal(merged["model.norm.weight"], new_norm)
    assert set(factors) == {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)}
    for key in factors:
        assert not torch.equal(merged[key], base[key])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_lora_onto_a_sharded_base_keeps_its_shards(sharded_dir, tmp_path):
    adapter = tmp_path / "adapter"
    factors = _write_adapter(adapter, sharded_dir, targets=("q_proj", "down_proj"))
    ckpt = resolve_checkpoint(adapter, base_model=sharded_dir, cache_dir=tmp_path / "cache")
    shards = sorted(p.name for p in sharded_dir.glob("model-*.safetensors"))
    assert sorted(p.name for p in ckpt.model_dir.glob("model-*.safetensors")) == shards
    index = json.loads((ckpt.model_dir / "model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        with safe_open(ckpt.model_dir / shard, framework="pt") as f:
            assert key in f.keys()
    base, merged = _base_weights(sharded_dir), _base_weights(ckpt.model_dir)
    for key, (a, b) in factors.items():
        torch.testing.assert_close(merged[key], base[key] + 2.0 * (b @ a), rtol=0, atol=1e-5)
    AutoModelForCausalLM.from_pretrained(ckpt.model_dir)  # loads without missing keys errors


def test_lora_base_comes_from_adapter_config_else_base_model(llama_dir, model_dirs, tmp_path):
    qwen = model_dirs["qwen2"]  # another model with the same shapes
    adapter = tmp_path / "adapter"
    _write_adapter(adapter, llama_dir)
    ckpt = resolve_checkpoint(adapter, base_model=tmp_path / "absent", cache_dir=tmp_path / "c")
    assert json.loads((ckpt.model_dir / "_qtune_merge.json").read_text())["base"] == str(llama_dir)
    assert ckpt.base == llama_dir
    assert ckpt.warnings == (
        f"LoRA adapter {adapter} was merged onto its base_model_name_or_path {llama_dir}, not onto "
        f"the configured base model {tmp_path / 'absent'} (which does not exist); the corpus was "
        f"first scored with the configured one. If the adapter was trained on "
        f"{tmp_path / 'absent'}, set base_model_name_or_path in its adapter_config.json",
    )

    hub_named = tmp_path / "hub-named"
    _write_adapter(hub_named, llama_dir, extra_config={"base_model_name_or_path": "org/model"})
    ckpt = resolve_checkpoint(hub_named, base_model=qwen, cache_dir=tmp_path / "c")
    merge_info = json.loads((ckpt.model_dir / "_qtune_merge.json").read_text())
    assert merge_info["base"] == str(qwen)
    assert merge_info["base_fingerprint"] == model_fingerprint(qwen)
    assert (ckpt.base, ckpt.warnings) == (qwen, ())  # no local base named: the configured one
    with pytest.raises(CheckpointError, match=r"cannot find the base model .*'org/model'"):
        resolve_checkpoint(hub_named, base_model=tmp_path / "absent", cache_dir=tmp_path / "c")


def test_peft_trainer_checkpoint_needs_trainer_state(llama_dir, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-20"
    _write_adapter(ckpt, llama_dir)
    (ckpt / "optimizer.pt").write_bytes(b"x")
    assert checkpoint_kind(ckpt) == "lora" and not is_complete(ckpt)
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        resolve_checkpoint(ckpt, base_model=llama_dir, cache_dir=tmp_path / "cache")
    (ckpt / "trainer_state.json").write_text("{}")
    assert is_complete(ckpt)
    assert (
        resolve_checkpoint(ckpt, base_model=llama_dir, cache_dir=tmp_path / "cache").kind == "lora"
    )


@pytest.mark.parametrize(
    ("extra_config", "extra_tensors", "message"),
    [
        ({"use_dora": True}, {}, r"use_dora=true \(DoRA .*merge_and_unload"),
        (
            {},
            {f"{PEFT}model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)},
            r"embedding LoRA",
        ),
        ({"peft_type": "IA3"}, {}, r"peft_type IA3 is not supported"),
        ({"init_lora_weights": "pissa"}, {}, r"init_lora_weights='pissa'"),
        ({"r": 8}, {}, r"q_proj: lora_A \[4, 128\] and lora_B \[128, 4\] do not fit .* r=8"),
        (
            {},
            {f"{PEFT}model.layers.0.mlp.gate_proj.lora_A.weight": torch.zeros(4, 64)},
            r"gate_proj: lora_B is missing",
        ),
        ({}, {f"{PEFT}model.vision_tower.weight": torch.zeros(3)}, r"match nothing in base"),
    ],
)
def test_lora_refusals_name_the_problem(llama_dir, tmp_path, extra_config, extra_tensors, message):
    adapter = tmp_path / "adapter"
    _write_adapter(adapter, llama_dir, extra_config=extra_config, extra_tensors=extra_tensors)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_lora_shapes_from_another_model_are_refused(llama_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    shapes = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 96)}
    save_file(shapes, small / "model.safetensors", metadata={"format": "pt"})
    (small / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    _write_adapter(
        adapter, small, targets=("q_proj",), extra_config={"base_model_name_or_path": "org/x"}
    )
    with pytest.raises(CheckpointError, match=r"lora_A \[4, 96\] .* do not fit base weight"):
        resolve_checkpoint(adapter, base_model=llama_dir, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _with_tokenizer(model_dir: Path, out: Path, tokenizer) -> Path:
    shutil.copytree(model_dir, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(out)
    return out


def test_same_tokenizer_passes(llama_dir, tmp_path, tokenizer):
    check_same_tokenizer(llama_dir, llama_dir)
    copy = _with_tokenizer(llama_dir, tmp_path / "copy", tokenizer)
    check_same_tokenizer(llama_dir, copy)


def test_checkpoint_without_tokenizer_files_is_checked_by_vocab_size(llama_dir, tmp_path, caplog):
    bare = tmp_path / "checkpoint-3"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(llama_dir / name, bare / name)
    with caplog.at_level(logging.WARNING, logger="qtune.pipeline.checkpoints"):
        check_same_tokenizer(llama_dir, bare)
    assert "assuming the reference tokenizer" in caplog.text
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "vocab_size": 640}))
    with pytest.raises(CheckpointError, match=r"no tokenizer files and its vocab_size 640 differs"):
        check_same_tokenizer(llama_dir, bare)


def test_tokenizer_trained_on_other_text_is_refused(llama_dir, tmp_path, tokenizer):
    texts = [f"{word} {i} " * 3 for i in range(300) for word in ("lorem", "ipsum", "dolor")]
    texts += [text[::-1] for text in tokenizer.get_vocab()]
    other = build_bpe_tokenizer(texts, vocab_size=512)
    candidate = _with_tokenizer(llama_dir, tmp_path / "other", other)
    with pytest.raises(CheckpointError, match=r"token ids differ: \d+ tokens missing") as info:
        check_same_tokenizer(llama_dir, candidate)
    assert str(candidate) in str(info.value)


def test_changed_chat_template_is_refused(llama_dir, tmp_path):
    changed = AutoTokenizer.from_pretrained(llama_dir)
    changed.chat_template = CHATML_GENERATION_TEMPLATE
    candidate = _with_tokenizer(llama_dir, tmp_path / "template", changed)
    with pytest.raises(CheckpointError, match=r"chat template differs \(reference \d+ chars") as e:
        check_same_tokenizer(llama_dir, candidate)
    assert "token ids differ" not in str(e.value) and "vocabulary" not in str(e.value)


def test_changed_special_tokens_are_refused(llama_dir, tmp_path):
    changed = AutoTokenizer.from_pretrained(llama_dir)
    changed.eos_token = IM_END
    candidate = _with_tokenizer(llama_dir, tmp_path / "eos", changed)
    with pytest.raises(
        CheckpointError, match=r"special tokens differ: eos_token '</s>' vs '<\|im_end"
    ):
        check_same_tokenizer(llama_dir, candidate)
