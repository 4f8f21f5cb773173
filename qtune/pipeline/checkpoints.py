"""Checkpoints to re-score with between epochs: detect, check complete, merge LoRA, check tokenizer.

Three layouts are accepted, as trainers write them:

- ``model``: a full model directory (``config.json`` plus ``model.safetensors``, or shards listed
  in ``model.safetensors.index.json``; ``pytorch_model*.bin`` works the same way);
- ``trainer``: a ``transformers`` Trainer ``checkpoint-<step>`` directory, i.e. a model directory
  plus ``trainer_state.json`` (written last), optimizer, scheduler and RNG state;
- ``lora``: a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``), on its
  own or inside a PEFT Trainer ``checkpoint-<step>``. It is merged onto its base model without
  ``peft``: W' = W + scaling · B @ A per targeted module, computed in float32 and cast back to the
  base's dtype, written shard by shard with the base's shard names into
  ``<cache_dir>/<fingerprint>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtune.pipeline.publish import model_fingerprint

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.json"
#: Written into a merged directory, outside what ``model_fingerprint`` reads (leading underscore).
MERGE_INFO = "_qtune_merge.json"

_TRAINER_DIR = re.compile(r"^checkpoint-\d+$")
_TRAINER_FILES = frozenset(
    {TRAINER_STATE, "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
)
# Single-file weights, and (index, shard pattern) for sharded ones, in order of preference.
_SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARDED_WEIGHTS = (
    ("model.safetensors.index.json", re.compile(r"^model-\d+-of-\d+\.safetensors$")),
    ("pytorch_model.bin.index.json", re.compile(r"^pytorch_model-\d+-of-\d+\.bin$")),
)
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf"})
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "spiece.model",
    }
)
# LoRA factor keys as PEFT saves them: "base_model.model.<module>.lora_A.weight" (the adapter name
# is stripped on save; an unstripped "lora_A.default.weight" is accepted too).
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
# modules_to_save copies, from PEFT versions that kept the wrapper in the key.
_SAVED_MODULE_KEY = re.compile(r"^(?P<module>.+)\.modules_to_save(?:\.[^.]+)?\.(?P<param>[^.]+)$")
# init_lora_weights schemes that change the base weights: the adapter only fits the modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_PROBE_TEXT = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n"
    "def f(x):\n    return x ** 2  # tabs\tand  spaces\n"
    "Größe, café, 東京, emoji 🙂, 12345.678"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint and the model directory to load it from.

    ``fingerprint`` identifies the checkpoint as given: ``publish.model_fingerprint`` of the
    directory for ``model`` and ``trainer``; for ``lora`` a sha256 over the adapter's weights and
    config (without ``base_model_name_or_path``, which the base's fingerprint replaces) and the
    base model's fingerprint. For ``lora``, ``model_dir`` is the merged copy in the cache.
    """

    path: Path
    kind: str
    model_dir: Path
    fingerprint: str


# ---------------------------------------------------------------------------------------------
# Detection and completeness


def checkpoint_kind(path: Path) -> str | None:
    """``"model"`` / ``"trainer"`` / ``"lora"``, or None when it is not a checkpoint at all.

    Adapter files make it ``lora`` (even inside a ``checkpoint-<step>`` directory). A directory
    named ``checkpoint-<step>`` or holding Trainer state files is ``trainer``, even while still
    empty or half-written (:func:`is_complete` tells when it is done); any other directory with
    ``config.json`` or model weights is ``model``. Files and missing paths are None.
    """
    path = Path(path)
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if ADAPTER_CONFIG in names or ADAPTER_WEIGHTS in names:
        return "lora"
    if _TRAINER_DIR.match(path.name) or names & _TRAINER_FILES:
        return "trainer"
    if "config.json" in names or _weight_names(names):
        return "model"
    return None


def is_complete(path: Path) -> bool:
    """True when the trainer has finished writing the checkpoint; never for a half-written one.

    Model and Trainer checkpoints need a parseable ``config.json`` and complete weights: a
    safetensors file whose size matches its header (a file still being written is shorter), a
    non-empty ``.bin``, and for sharded weights an index whose every listed shard is complete.
    Trainer checkpoints also need ``trainer_state.json`` (the Trainer writes it last). LoRA needs
    ``adapter_config.json`` and a complete ``adapter_model.safetensors``, plus
    ``trainer_state.json`` when it sits in a Trainer checkpoint.
    """
    return not _incomplete_reasons(Path(path))


def _weight_names(names: Iterable[str]) -> list[str]:
    names = set(names)
    found = [n for n in _SINGLE_WEIGHTS if n in names]
    for index, shard in _SHARDED_WEIGHTS:
        found += sorted(n for n in names if n == index or shard.match(n))
    return found


def _is_trainer_dir(path: Path, names: set[str]) -> bool:
    return bool(_TRAINER_DIR.match(path.name) or names & _TRAINER_FILES)


def _incomplete_reasons(path: Path) -> list[str]:
    """What is missing or unfinished; empty when complete."""
    kind = checkpoint_kind(path)
    if kind is None:
        return ["not a checkpoint directory"]
    names = {p.name for p in path.iterdir()}
    reasons: list[str] = []
    if kind == "lora":
        reasons += _json_reasons(path / ADAPTER_CONFIG)
        if ADAPTER_WEIGHTS not in names and "adapter_model.bin" in names:
            reasons.append(
                "adapter_model.bin is not supported; re-save the adapter with "
                "save_pretrained(safe_serialization=True)"
            )
        else:
            reasons += _weights_file_reasons(path / ADAPTER_WEIGHTS)
    else:
        reasons += _json_reasons(path / "config.json")
        reasons += _model_weights_reasons(path, names)
    if _is_trainer_dir(path, names):
        reasons += _json_reasons(path / TRAINER_STATE)
    return reasons


def _json_reasons(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path.name} is missing"]
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{path.name} is not readable JSON ({e})"]
    return []


def _model_weights_reasons(path: Path, names: set[str]) -> list[str]:
    # Safetensors first, as transformers and vLLM prefer them when both formats are present.
    for (index, _), single in zip(_SHARDED_WEIGHTS, _SINGLE_WEIGHTS, strict=True):
        if index in names:
            return _sharded_reasons(path / index)
        if single in names:
            return _weights_file_reasons(path / single)
    if any(shard.match(n) for _, shard in _SHARDED_WEIGHTS for n in names):
        return ["weight shards present but no model.safetensors.index.json yet"]
    return ["no model weights (model.safetensors or a sharded index)"]


def _sharded_reasons(index: Path) -> list[str]:
    reasons = _json_reasons(index)
    if reasons:
        return reasons
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        return [f"{index.name} has no weight_map"]
    for shard in sorted(set(weight_map.values())):
        reasons += _weights_file_reasons(index.parent / shard)
    return reasons


def _weights_file_reasons(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path.name} is missing"]
    size = path.stat().st_size
    if size == 0:
        return [f"{path.name} is empty"]
    if path.suffix == ".safetensors":
        expected = _safetensors_size(path)
        if expected is None:
            return [f"{path.name} has no readable safetensors header"]
        if size != expected:
            return [f"{path.name} has {size} bytes; its header describes {expected}"]
    return []


def _safetensors_size(path: Path) -> int | None:
    """The file size a safetensors header describes (8 + header + data), or None if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return None
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > 100_000_000:
                return None
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


# ---------------------------------------------------------------------------------------------
# Resolution


def resolve_checkpoint(
    path: str | Path, *, base_model: str | Path, cache_dir: str | Path
) -> Checkpoint:
    """Validate a checkpoint and return a model directory that vLLM / transformers can load.

    Model and Trainer checkpoints are used in place. A LoRA adapter is merged onto its base —
    ``base_model_name_or_path`` of its ``adapter_config.json`` when that is an existing local
    directory, else ``base_model`` — into ``cache_dir/<fingerprint>/``: built in a temporary
    sibling directory, renamed into place in one step, and reused as it is when already there.
    The merged directory gets the base's config, generation config and tokenizer files, and each
    tensor keeps the base's dtype. Raises :class:`CheckpointError` for a missing path, an
    incomplete checkpoint, an unknown layout, a LoRA whose base cannot be found, unsupported LoRA
    features (DoRA, embedding or conv LoRA, ...) and adapter shapes that don't match the base.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a file; expected a checkpoint directory")
    kind = checkpoint_kind(path)
    if kind is None:
        found = sorted(p.name for p in path.iterdir())
        shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") or "nothing"
        raise CheckpointError(
            f"unknown checkpoint layout at {path}: found {shown}; expected config.json + "
            f"model.safetensors (or a sharded index), a Trainer checkpoint-<step> directory, or "
            f"{ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
        )
    reasons = _incomplete_reasons(path)
    if reasons:
        raise CheckpointError(
            f"{kind} checkpoint {path} is incomplete: {'; '.join(reasons)}. The trainer may still "
            f"be writing it; wait for it to finish (or pick an earlier checkpoint)"
        )
    if kind != "lora":
        return Checkpoint(path, kind, path, model_fingerprint(path))
    return _resolve_lora(path, Path(base_model), Path(cache_dir))


def _resolve_lora(path: Path, base_model: Path, cache_dir: Path) -> Checkpoint:
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    _check_lora_config(config, path)
    base = _find_base(config, base_model, path)
    base_fp = model_fingerprint(base)
    fingerprint = _adapter_fingerprint(path, config, base_fp)
    target = cache_dir.absolute() / fingerprint
    if target.is_dir() and is_complete(target):
        logger.info("LoRA %s: reusing merged model %s", path, target)
        return Checkpoint(path, "lora", target, fingerprint)
    if target.exists():
        raise CheckpointError(
            f"{target} exists but is not a complete model directory; remove it to re-merge {path}"
        )
    from safetensors.torch import load_file

    adapter = load_file(path / ADAPTER_WEIGHTS)
    plan = _plan_merge(adapter, config, _base_tensor_index(base), base, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    start = time.monotonic()
    try:
        staging.mkdir()
        _write_merged(base, staging, plan)
        info = {
            "adapter": str(path),
            "base": str(base),
            "base_fingerprint": base_fp,
            "fingerprint": fingerprint,
            "merged_modules": len(plan.deltas),
            "replaced_tensors": len(plan.replacements),
        }
        (staging / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(staging, target)
        except OSError:
            if not (target.is_dir() and is_complete(target)):
                raise
            # Another process merged the same adapter first; its copy is identical.
            logger.info("LoRA %s: merged concurrently into %s; using that", path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "LoRA %s merged onto %s (%d modules, %d replaced tensors) in %.1f s -> %s",
        path,
        base,
        len(plan.deltas),
        len(plan.replacements),
        time.monotonic() - start,
        target,
    )
    return Checkpoint(path, "lora", target, fingerprint)


def _check_lora_config(config: dict[str, Any], path: Path) -> None:
    """Refuse adapter settings whose merge this module does not implement."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path / ADAPTER_CONFIG}: peft_type {peft_type} is not supported; only LORA adapters "
            f"can be merged (merge it with peft and pass the merged model directory instead)"
        )
    unsupported = []
    if config.get("use_dora"):
        unsupported.append("DoRA (use_dora: true)")
    if config.get("lora_bias"):
        unsupported.append("lora_bias: true")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if config.get(key):
            unsupported.append(f"{key}")
    if config.get("alora_invocation_tokens"):
        unsupported.append("activated LoRA (alora_invocation_tokens), which cannot be merged")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        unsupported.append(
            f"init_lora_weights={init!r} (it changes the base weights; save the adapter with "
            f"path_initial_model_for_weight_conversion to get a plain LoRA)"
        )
    if unsupported:
        raise CheckpointError(
            f"LoRA adapter {path} uses unsupported features: {', '.join(unsupported)}; merge it "
            f"with peft (merge_and_unload) and pass the merged model directory instead"
        )


def _find_base(config: dict[str, Any], base_model: Path, path: Path) -> Path:
    named = config.get("base_model_name_or_path")
    if named and Path(named).is_dir():
        base = Path(named).absolute()
    else:
        base = base_model.absolute()
        if not base.is_dir():
            raise CheckpointError(
                f"cannot find the base model of LoRA adapter {path}: its base_model_name_or_path "
                f"{named!r} is not a local directory and base_model {str(base_model)!r} does not "
                f"exist; set base_model to the local directory of the model the adapter was "
                f"trained on"
            )
        if named:
            logger.info(
                "LoRA %s: base_model_name_or_path %r is not a local directory; using %s",
                path,
                named,
                base,
            )
    if checkpoint_kind(base) not in ("model", "trainer"):
        raise CheckpointError(
            f"base model {base} of LoRA adapter {path} is not a model directory "
            f"(expected config.json + model weights)"
        )
    reasons = _incomplete_reasons(base)
    if reasons:
        raise CheckpointError(f"base model {base} is incomplete: {'; '.join(reasons)}")
    return base


def _adapter_fingerprint(path: Path, config: dict[str, Any], base_fingerprint: str) -> str:
    digest = hashlib.sha256(b"qtune-lora-v1\0")
    # Where the base lives is not content: the base's own fingerprint stands for it.
    content = {k: v for k, v in config.items() if k != "base_model_name_or_path"}
    digest.update(json.dumps(content, sort_keys=True).encode())
    with open(path / ADAPTER_WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    digest.update(base_fingerprint.encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# LoRA merge


@dataclass(frozen=True)
class _Delta:
    a: Any  # torch.Tensor [r, in]
    b: Any  # torch.Tensor [out, r]
    scaling: float
    transpose: bool  # fan_in_fan_out: the base weight is stored [in, out]


@dataclass(frozen=True)
class _MergePlan:
    deltas: dict[str, _Delta]  # base weight key -> delta to add
    replacements: dict[str, Any]  # base tensor key -> tensor that replaces it
    shard_of: dict[str, str]  # base tensor key -> file it is stored in


def _base_tensor_index(base: Path) -> dict[str, tuple[str, list[int]]]:
    """Base tensor key -> (safetensors file name, shape), read from headers only."""
    from safetensors import safe_open

    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(
            f"base model {base} has no safetensors weights; the LoRA merge reads safetensors only "
            f"(re-save the base with save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, tuple[str, list[int]]] = {}
    for name in files:
        with safe_open(base / name, framework="pt") as f:
            for key in f.keys():
                tensors[key] = (name, list(f.get_slice(key).get_shape()))
    return tensors


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of the module."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _plan_merge(
    adapter: dict[str, Any],
    config: dict[str, Any],
    base_tensors: dict[str, tuple[str, list[int]]],
    base: Path,
    path: Path,
) -> _MergePlan:
    """Pair the adapter's tensors with base tensors and check every shape before writing."""
    factors: dict[str, dict[str, Any]] = {}
    replacements: dict[str, Any] = {}
    unsupported: list[str] = []
    unmatched: list[str] = []
    for key, tensor in adapter.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if "lora_embedding_" in name:
            unsupported.append(f"embedding LoRA ({key})")
            continue
        if "lora_magnitude_vector" in name:
            unsupported.append(f"DoRA magnitude ({key})")
            continue
        match = _LORA_KEY.match(name)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
            continue
        if ".lora_" in name:
            unsupported.append(f"LoRA tensor {key}")
            continue
        saved = _SAVED_MODULE_KEY.match(name)
        if saved:
            name = f"{saved['module']}.{saved['param']}"
        # A trained base parameter (modules_to_save, bias="all"): it replaces the base's copy.
        name = name.replace(".base_layer.", ".")
        if name in base_tensors:
            replacements[name] = tensor
        else:
            unmatched.append(key)
    if unsupported:
        raise CheckpointError(
            f"LoRA adapter {path} uses unsupported features: {', '.join(unsupported[:5])}"
            f"{' ...' if len(unsupported) > 5 else ''}; merge it with peft (merge_and_unload) and "
            f"pass the merged model directory instead"
        )
    if unmatched:
        raise CheckpointError(
            f"LoRA adapter {path} has tensors that match nothing in base model {base}: "
            f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}"
            f"{_tied_hint(' '.join(unmatched))} — was it trained on another model?"
        )
    if not factors and not replacements:
        raise CheckpointError(f"LoRA adapter {path} has no LoRA tensors in {ADAPTER_WEIGHTS}")

    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    use_rslora = bool(config.get("use_rslora", False))
    deltas: dict[str, _Delta] = {}
    problems: list[str] = []
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            problems.append(f"{module}: lora_{'B' if 'A' in pair else 'A'} is missing")
            continue
        a, b = pair["A"], pair["B"]
        weight_key = f"{module}.weight"
        if weight_key not in base_tensors:
            problems.append(f"{module}: the base has no tensor {weight_key}{_tied_hint(module)}")
            continue
        if a.dim() != 2 or b.dim() != 2:
            problems.append(
                f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not matrices "
                f"(conv LoRA is not supported)"
            )
            continue
        r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r", a.shape[0])))
        alpha = float(
            _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        )
        w_shape = base_tensors[weight_key][1]
        out_f, in_f = (w_shape[1], w_shape[0]) if fan_in_fan_out else (w_shape[0], w_shape[1])
        if list(a.shape) != [r, in_f] or list(b.shape) != [out_f, r]:
            problems.append(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit base "
                f"weight {w_shape} with r={r} (expected lora_A [{r}, {in_f}], "
                f"lora_B [{out_f}, {r}])"
            )
            continue
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        deltas[weight_key] = _Delta(a, b, scaling, fan_in_fan_out)
    for key, tensor in replacements.items():
        if list(tensor.shape) != base_tensors[key][1]:
            problems.append(
                f"{key}: the adapter's copy has shape {list(tensor.shape)}, the base's "
                f"{base_tensors[key][1]} (vocabulary resized?)"
            )
    overlap = sorted(set(deltas) & set(replacements))
    problems += [f"{key}: both a LoRA target and replaced" for key in overlap]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if problems[5:] else ""
        )
        raise CheckpointError(f"LoRA adapter {path} does not match base model {base}: {shown}")
    shard_of = {key: base_tensors[key][0] for key in base_tensors}
    return _MergePlan(deltas, replacements, shard_of)


def _tied_hint(name: str) -> str:
    if "lm_head" not in name:
        return ""
    return (
        " (with tie_word_embeddings the output embedding is not stored; training it is unsupported)"
    )


def _write_merged(base: Path, out: Path, plan: _MergePlan) -> None:
    """Base files with the merged tensors: one output file per base shard, same names."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    for source in sorted(p for p in base.iterdir() if p.is_file()):
        name = source.name
        skip = name in _TRAINER_FILES or name == "pytorch_model.bin.index.json"
        if skip or name.startswith(".") or source.suffix in _WEIGHT_SUFFIXES:
            continue
        shutil.copy2(source, out / name)
    for shard in sorted(set(plan.shard_of.values())):
        with safe_open(base / shard, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        for key, tensor in tensors.items():
            if key in plan.replacements:
                tensors[key] = plan.replacements[key].to(tensor.dtype).contiguous()
            elif key in plan.deltas:
                delta = plan.deltas[key]
                update = delta.b.to(torch.float32) @ delta.a.to(torch.float32)
                if delta.transpose:
                    update = update.T
                merged = tensor.to(torch.float32) + delta.scaling * update
                tensors[key] = merged.to(tensor.dtype).contiguous()
        metadata.setdefault("format", "pt")
        save_file(tensors, out / shard, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def check_same_tokenizer(reference_model_dir: str | Path, candidate_dir: str | Path) -> None:
    """Refuse a candidate whose tokenizer differs from the reference (the corpus's tokenizer).

    Compares, with ``AutoTokenizer``: the vocabulary (size, and tokens with other ids), the
    special tokens (named ones and the full list), the chat template, and the ids a fixed probe
    text encodes to (catches changed merges or normalisation under an equal vocabulary). Every
    difference found is named in one :class:`CheckpointError`. A candidate without tokenizer files
    passes when its ``config.json`` ``vocab_size`` equals the reference's; a warning says that the
    reference tokenizer is assumed.
    """
    reference = Path(reference_model_dir)
    candidate = Path(candidate_dir)
    if not _has_tokenizer(candidate):
        ref_vocab = _config_vocab_size(reference)
        cand_vocab = _config_vocab_size(candidate)
        if ref_vocab != cand_vocab:
            raise CheckpointError(
                f"checkpoint {candidate} has no tokenizer files and its vocab_size {cand_vocab} "
                f"differs from the reference model's {ref_vocab} ({reference}): it was not "
                f"trained with the tokenizer the corpus was tokenized with"
            )
        logger.warning(
            "checkpoint %s has no tokenizer files; assuming the reference tokenizer of %s "
            "(vocab_size %d matches)",
            candidate,
            reference,
            cand_vocab,
        )
        return
    if not _has_tokenizer(reference):
        raise CheckpointError(f"reference model {reference} has no tokenizer files to compare")
    ref_tok = _load_tokenizer(reference)
    cand_tok = _load_tokenizer(candidate)
    differences = _tokenizer_differences(ref_tok, cand_tok)
    if differences:
        raise CheckpointError(
            f"tokenizer of {candidate} differs from the reference {reference} (the one the corpus "
            f"was tokenized with): {'; '.join(differences)}. Re-tokenize the corpus with the new "
            f"tokenizer (a new run), or save the checkpoint with the reference tokenizer"
        )


def _has_tokenizer(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def _config_vocab_size(path: Path) -> int:
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read vocab_size: {config_path} is not readable") from e
    vocab = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    if not isinstance(vocab, int):
        raise CheckpointError(f"{config_path} has no vocab_size")
    return vocab


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise CheckpointError(f"cannot load the tokenizer of {path}: {e}") from e


def _tokenizer_differences(ref: Any, cand: Any) -> list[str]:
    differences = []
    ref_vocab, cand_vocab = ref.get_vocab(), cand.get_vocab()
    if len(ref_vocab) != len(cand_vocab):
        differences.append(
            f"vocabulary size differs (reference {len(ref_vocab)}, candidate {len(cand_vocab)})"
        )
    missing = sorted(set(ref_vocab) - set(cand_vocab), key=ref_vocab.__getitem__)
    added = sorted(set(cand_vocab) - set(ref_vocab), key=cand_vocab.__getitem__)
    moved = sorted(
        (t for t in set(ref_vocab) & set(cand_vocab) if ref_vocab[t] != cand_vocab[t]),
        key=ref_vocab.__getitem__,
    )
    if missing or added or moved:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tokens missing from the candidate (e.g. {missing[:3]})")
        if added:
            parts.append(f"{len(added)} tokens only in the candidate (e.g. {added[:3]})")
        if moved:
            examples = ", ".join(f"{t!r}: {ref_vocab[t]} -> {cand_vocab[t]}" for t in moved[:3])
            parts.append(f"{len(moved)} tokens have other ids (e.g. {examples})")
        differences.append("token ids differ: " + ", ".join(parts))
    special = []
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(ref, attr, None), getattr(cand, attr, None)
        if a != b:
            special.append(f"{attr} {a!r} vs {b!r}")
    ref_special = dict(zip(ref.all_special_tokens, ref.all_special_ids, strict=True))
    cand_special = dict(zip(cand.all_special_tokens, cand.all_special_ids, strict=True))
    if ref_special != cand_special:
        only_ref = sorted(set(ref_special.items()) - set(cand_special.items()))
        only_cand = sorted(set(cand_special.items()) - set(ref_special.items()))
        special.append(f"only in reference {only_ref}, only in candidate {only_cand}")
    if special:
        differences.append("special tokens differ: " + ", ".join(special))
    if ref.chat_template != cand.chat_template:
        differences.append(_template_difference(ref.chat_template, cand.chat_template))
    if not differences:
        # Equal vocabularies can still split text differently (merges, normaliser, BOS handling).
        ref_ids = ref(_PROBE_TEXT)["input_ids"]
        cand_ids = cand(_PROBE_TEXT)["input_ids"]
        if ref_ids != cand_ids:
            differences.append(
                f"encoding differs: a probe text gives {len(ref_ids)} ids with the reference and "
                f"{len(cand_ids)} with the candidate (merges, normaliser or BOS handling changed)"
            )
    return differences


def _template_difference(ref: Any, cand: Any) -> str:
    if ref is None or cand is None:
        which = "reference" if ref is None else "candidate"
        return f"chat template differs: the {which} has none"
    ref_s, cand_s = str(ref), str(cand)
    at = next(
        (i for i, (x, y) in enumerate(zip(ref_s, cand_s, strict=False)) if x != y),
        min(len(ref_s), len(cand_s)),
    )
    return (
        f"chat template differs (reference {len(ref_s)} chars, candidate {len(cand_s)}; first "
        f"difference at char {at}: {ref_s[at : at + 30]!r} vs {cand_s[at : at + 30]!r})"
    )
