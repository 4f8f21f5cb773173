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
  ``<cache_dir>/<fingerprint>/``. Tensors in ``modules_to_save`` (and trained biases) replace the
  base's; when they train one side of tied word embeddings, the merge unties them as peft's
  ``merge_and_unload`` does. Anything else — an ``adapter_config.json`` key or init that changes
  the merge (DoRA, PiSSA, LoRA-GA, ...), or a key this module does not know — is refused by name,
  pointing to peft's own merge.
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
# Version of what a merge writes, recorded in MERGE_INFO; a cached merge of another format is
# redone. 2: tied embeddings trained through modules_to_save are untied, as peft does.
_MERGE_FORMAT = 2

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
# adapter_config.json keys, by what the merge does with them. They are peft's LoraConfig fields
# (as of peft 0.21; a test fails when the installed peft has a field not listed here). A key not
# listed is refused unless it is off (see _is_off): it may turn on a variant whose merge differs.
#
# Any value merges right: bookkeeping; which modules are adapted (the saved tensors say that);
# training-only settings; the merge parameters implemented below; the settings of an init, read
# only when init_lora_weights names it (which is checked: peft's conversion of a PiSSA / CorDA /
# LoRA-GA adapter to plain LoRA sets init_lora_weights to true and keeps them); and
# ensure_weight_tying (the trained copies it ties are both saved, and _plan_merge keeps a tie
# only where they are equal).
_LORA_KEYS_ANY_VALUE = frozenset(
    {
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "runtime_config",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "lora_dropout",
        "megatron_core",
        "qalora_group_size",
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "fan_in_fan_out",
        "modules_to_save",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "loftq_config",
        "ensure_weight_tying",
    }
)
# Checked by value in _check_lora_config.
_LORA_KEYS_BY_VALUE = frozenset({"peft_type", "bias", "init_lora_weights"})
# Merged right only while off: each turns on something the merge W + scaling * B @ A onto the
# saved base does not implement. Value: what it does, for the error message.
_LORA_KEYS_OFF_ONLY: dict[str, str] = {
    "use_dora": "DoRA rescales each merged weight by a trained magnitude",
    "lora_bias": "the LoRA branch has its own bias",
    "layer_replication": "layers are duplicated before the adapters apply",
    "target_parameters": "LoRA on bare parameters (e.g. MoE experts)",
    "trainable_token_indices": "trained embedding rows are stored apart from the embedding",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "megatron_config": "Megatron-parallel LoRA layers",
    "velora_config": "VeLoRA saves projections beside the factors",
    "monteclora_config": "MonteCLoRA samples perturbations of the factors",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between several adapters per token",
    "kasa_config": "KaSA truncates the base's singular values and scales the factors",
}
#: Every adapter_config.json key this module knows by name.
KNOWN_LORA_CONFIG_KEYS = _LORA_KEYS_ANY_VALUE | _LORA_KEYS_BY_VALUE | frozenset(_LORA_KEYS_OFF_ONLY)
# init_lora_weights strings that leave the base untouched (besides True and False): the adapter
# then fits the saved base (orthogonal and MiCA start with B @ A = 0 too).
# PiSSA, OLoRA, CorDA, LoRA-GA subtract their initial B @ A from the base and LoftQ replaces it, so
# their adapters fit only that modified base; any other (newer) init is refused as unknown.
_BASE_KEEPING_INITS = ("gaussian", "orthogonal", "eva", "mica")
_BASE_CHANGING_INIT_PREFIXES = ("pissa", "olora", "corda", "lora_ga")
_BIAS_VALUES = ("none", "all", "lora_only")  # a trained bias is saved and replaces the base's
# The embedding tie of nearly every causal LM (transformers' ``_tied_weights_keys``, output ->
# input), for model classes that do not name theirs.
_USUAL_TIE = {"lm_head.weight": "model.embed_tokens.weight"}
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.]+$")
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
    base model's fingerprint. For ``lora``, ``model_dir`` is the merged copy in the cache and
    ``base`` the model it was merged onto (None for the other kinds).

    ``warnings`` are things the caller should record with the scores (manifest and run summary),
    each a full sentence, already logged at WARNING: today, that a LoRA adapter was merged onto
    its own ``base_model_name_or_path``, which is not the configured base model.
    """

    path: Path
    kind: str
    model_dir: Path
    fingerprint: str
    base: Path | None = None
    warnings: tuple[str, ...] = ()


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
    tensor keeps the base's dtype (its config says ``tie_word_embeddings: false`` where the merge
    untied them). A cached merge written by an older merge format is redone. When the adapter's
    own base is not ``base_model``, the merge uses the adapter's base and says so in a warning,
    logged and returned in ``Checkpoint.warnings``. Raises :class:`CheckpointError` for a missing
    path, an incomplete checkpoint, an unknown layout, a LoRA whose base cannot be found,
    unsupported or unknown LoRA settings (DoRA, base-changing inits, embedding or conv LoRA,
    LoRA on a tied embedding, ...) and adapter shapes that don't match the base.
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
    base, warnings = _find_base(config, base_model, path)
    base_fp = model_fingerprint(base)
    fingerprint = _adapter_fingerprint(path, config, base_fp)
    target = cache_dir.absolute() / fingerprint
    stale = False
    if target.is_dir() and is_complete(target):
        found = _merge_format(target)
        if found == _MERGE_FORMAT:
            logger.info("LoRA %s: reusing merged model %s", path, target)
            return Checkpoint(path, "lora", target, fingerprint, base, warnings)
        # Format 1 kept the tie of tied embeddings when modules_to_save trained one of them.
        logger.warning(
            "LoRA %s: merged model %s was written by an older qtune (merge format %d, now %d); "
            "merging again",
            path,
            target,
            found,
            _MERGE_FORMAT,
        )
        stale = True
    elif target.exists():
        raise CheckpointError(
            f"{target} exists but is not a complete model directory; remove it to re-merge {path}"
        )
    from safetensors.torch import load_file

    adapter = load_file(path / ADAPTER_WEIGHTS)
    plan = _plan_merge(adapter, config, _base_tensor_index(base), base, path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    staging = target.with_name(f".{target.name}.tmp-{tag}")
    aside = target.with_name(f".{target.name}.stale-{tag}")
    start = time.monotonic()
    try:
        staging.mkdir()
        _write_merged(base, staging, plan)
        info = {
            "format": _MERGE_FORMAT,
            "adapter": str(path),
            "base": str(base),
            "base_fingerprint": base_fp,
            "fingerprint": fingerprint,
            "merged_modules": len(plan.deltas),
            "replaced_tensors": len(plan.replacements),
            "untied_embeddings": sorted(plan.untied),
        }
        (staging / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            if stale:
                os.rename(target, aside)
            os.rename(staging, target)
        except OSError:
            done = target.is_dir() and is_complete(target) and _merge_format(target)
            if done != _MERGE_FORMAT:
                raise
            # Another process merged the same adapter first; its copy is identical.
            logger.info("LoRA %s: merged concurrently into %s; using that", path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
    logger.info(
        "LoRA %s merged onto %s (%d modules, %d replaced tensors%s) in %.1f s -> %s",
        path,
        base,
        len(plan.deltas),
        len(plan.replacements),
        f", untied {', '.join(sorted(plan.untied))}" if plan.untied else "",
        time.monotonic() - start,
        target,
    )
    return Checkpoint(path, "lora", target, fingerprint, base, warnings)


def _merge_format(merged: Path) -> int:
    """The merge format recorded in a merged directory; 1 for those written before formats."""
    try:
        found = json.loads((merged / MERGE_INFO).read_text()).get("format", 1)
    except (OSError, json.JSONDecodeError, AttributeError):
        return 1
    return found if isinstance(found, int) else 1


def _check_lora_config(config: dict[str, Any], path: Path) -> None:
    """Refuse adapter settings whose merge this module does not implement, naming each key."""
    where = path / ADAPTER_CONFIG
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(
            f"{where}: peft_type {peft_type} is not supported; only LORA adapters can be merged "
            f"(merge it with peft's merge_and_unload and pass the merged model directory instead)"
        )
    unsupported = []
    init = config.get("init_lora_weights", True)
    # True / False (peft's default init, or random A and B) never touch the base.
    if not isinstance(init, bool) and init not in _BASE_KEEPING_INITS:
        name = init.lower() if isinstance(init, str) else ""
        if name.startswith("loftq"):
            why = "LoftQ trains against a quantised replacement of the base weights"
        elif name.startswith(_BASE_CHANGING_INIT_PREFIXES):
            why = (
                "it subtracts the initial adapter from the base weights before training, so the "
                "adapter only fits that modified base; peft can save it as a plain LoRA with "
                "save_pretrained(path_initial_model_for_weight_conversion=...)"
            )
        else:
            why = "qtune does not know whether it leaves the base weights unchanged"
        unsupported.append(f"init_lora_weights={init!r} ({why})")
    bias = config.get("bias", "none")
    if bias not in _BIAS_VALUES:
        unsupported.append(f"bias={bias!r} (expected one of {', '.join(_BIAS_VALUES)})")
    for key, value in config.items():
        if key in _LORA_KEYS_OFF_ONLY and not _is_off(value):
            unsupported.append(f"{key}={_short(value)} ({_LORA_KEYS_OFF_ONLY[key]})")
        elif key not in KNOWN_LORA_CONFIG_KEYS and not _is_off(value):
            unsupported.append(
                f"{key}={_short(value)} (a key qtune does not know, from a newer peft; it may "
                f"change the merge)"
            )
    if unsupported:
        raise CheckpointError(
            f"LoRA adapter {path}: {ADAPTER_CONFIG} sets {'; '.join(unsupported)}. qtune merges "
            f"plain LoRA only; merge this adapter with peft's merge_and_unload and pass the "
            f"merged model directory instead"
        )


def _is_off(value: Any) -> bool:
    """The value every peft LoRA option uses for "not in use": None, False or empty."""
    return value is None or value is False or (isinstance(value, dict | list) and not value)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _find_base(
    config: dict[str, Any], base_model: Path, path: Path
) -> tuple[Path, tuple[str, ...]]:
    """The base to merge onto, and warnings for the caller to record (see Checkpoint)."""
    named = config.get("base_model_name_or_path")
    warnings: list[str] = []
    if named and Path(named).is_dir():
        # The adapter's own base: what it was trained on, even when it is not base_model.
        base = Path(named).absolute()
        differs = _differs(base, base_model.absolute())
        if differs:
            warnings.append(
                f"LoRA adapter {path} was merged onto its base_model_name_or_path {base}, not "
                f"onto the configured base model {base_model.absolute()} ({differs}); the "
                f"corpus was first scored with the configured one. If the adapter was trained on "
                f"{base_model.absolute()}, set base_model_name_or_path in its {ADAPTER_CONFIG}"
            )
            logger.warning("%s", warnings[-1])
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
    return base, tuple(warnings)


def _differs(base: Path, configured: Path) -> str:
    """Why ``base`` is not the configured base model; empty when it is (or is a copy of it)."""
    if base.resolve() == configured.resolve():
        return ""
    if not configured.exists():
        return "which does not exist"
    if checkpoint_kind(configured) not in ("model", "trainer"):
        return "which is not a model directory"
    ours, theirs = model_fingerprint(base), model_fingerprint(configured)
    if ours == theirs:
        return ""
    return f"other files: fingerprint {ours[:12]} vs {theirs[:12]}"


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
    # tensor key -> tensor that replaces the base's, or is added (an untied output embedding)
    replacements: dict[str, Any]
    shard_of: dict[str, str]  # tensor key -> file it is (to be) stored in
    untied: frozenset[str] = frozenset()  # output embeddings written out; the config unties


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
    tied = _tied_embeddings(base, base_tensors)
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
        # A tied output embedding is not stored in the base but may be trained all the same.
        name = name.replace(".base_layer.", ".")
        if name in base_tensors or name in tied:
            replacements[name] = tensor
        else:
            unmatched.append(key)
    for module in sorted(factors):
        # peft merges such a LoRA into the one weight both sides share; not done here.
        key = f"{module}.weight"
        partner = tied.get(key) or next((o for o, i in tied.items() if i == key), None)
        if partner:
            unsupported.append(
                f"LoRA on {module}, which is tied to {partner} (tie_word_embeddings: true)"
            )
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
        expected = base_tensors[key if key in base_tensors else tied[key]][1]
        if list(tensor.shape) != expected:
            problems.append(
                f"{key}: the adapter's copy has shape {list(tensor.shape)}, the base's "
                f"{expected} (vocabulary resized?)"
            )
    overlap = sorted(set(deltas) & set(replacements))
    problems += [f"{key}: both a LoRA target and replaced" for key in overlap]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if problems[5:] else ""
        )
        raise CheckpointError(f"LoRA adapter {path} does not match base model {base}: {shown}")
    shard_of = {key: base_tensors[key][0] for key in base_tensors}
    untied = _untie_trained_embeddings(tied, replacements, base, base_tensors, shard_of)
    return _MergePlan(deltas, replacements, shard_of, untied)


def _tied_hint(name: str) -> str:
    if "lm_head" not in name:
        return ""
    return " (the base does not store its output embedding; is it tied to the input one?)"


def _tied_embeddings(base: Path, base_tensors: dict[str, tuple[str, list[int]]]) -> dict[str, str]:
    """Output -> input embedding keys that loading ``base`` ties into one weight; {} if none.

    transformers and vLLM tie them when the config's ``tie_word_embeddings`` is true (an absent
    key means the config class's default). The names come from the model class's
    ``_tied_weights_keys``, else the usual ``lm_head.weight`` -> ``model.embed_tokens.weight``;
    only pairs whose input embedding the base stores are kept.
    """
    config = json.loads((base / "config.json").read_text())
    pairs = _USUAL_TIE
    tie = config.get("tie_word_embeddings")
    try:
        import transformers

        if tie is None:
            hf_config = transformers.AutoConfig.from_pretrained(base, local_files_only=True)
            tie = getattr(hf_config, "tie_word_embeddings", False)
        architectures = config.get("architectures") or [None]
        model_class = getattr(transformers, str(architectures[0]), None)
        keys = getattr(model_class, "_tied_weights_keys", None)
        # transformers >= 5 names full keys; older versions list outputs only (use the default).
        if (
            isinstance(keys, dict)
            and keys
            and all(_PLAIN_KEY.match(k) for k in (*keys, *keys.values()))
        ):
            pairs = dict(keys)
    except (ImportError, OSError, ValueError, KeyError) as e:
        if tie is None:
            # A loader must tie an output embedding the base does not store (or leave it random).
            tie = not any(out in base_tensors for out in pairs)
            logger.info("%s: cannot load its config with transformers (%s); tie=%s", base, e, tie)
    if not tie:
        return {}
    return {out: source for out, source in pairs.items() if source in base_tensors}


def _untie_trained_embeddings(
    tied: dict[str, str],
    replacements: dict[str, Any],
    base: Path,
    base_tensors: dict[str, tuple[str, list[int]]],
    shard_of: dict[str, str],
) -> frozenset[str]:
    """Make ``replacements`` give peft's merge of tied embeddings; returns the outputs untied.

    With ``modules_to_save`` on one side of a tie, peft trains a copy of that side and the other
    keeps the original weight, so its merge unties them (``tie_word_embeddings: false``, both
    written). With ``ensure_weight_tying`` one trained copy serves both sides and is saved under
    both names: the sides stay equal and the merge stays tied. The tie is one config flag, so
    untying writes every tied output out. Replacements are cast to the base's dtype here.
    """
    if not any(out in replacements or src in replacements for out, src in tied.items()):
        return frozenset()
    from safetensors import safe_open

    originals = {}
    for source in sorted(set(tied.values())):
        with safe_open(base / base_tensors[source][0], framework="pt") as f:
            originals[source] = f.get_tensor(source)
    sides = {}
    for out, source in tied.items():
        dtype = originals[source].dtype
        out_side = replacements.get(out, originals[source]).to(dtype)
        in_side = replacements.get(source, originals[source]).to(dtype)
        sides[out] = (out_side, in_side)
    if all(out_side.equal(in_side) for out_side, in_side in sides.values()):
        for out in tied:
            if out not in base_tensors:
                replacements.pop(out, None)  # the tie supplies it
        return frozenset()
    for out, source in tied.items():
        replacements[out] = sides[out][0]
        shard_of.setdefault(out, base_tensors[source][0])
    return frozenset(tied)


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
        for key in sorted(plan.replacements):
            if key not in tensors and plan.shard_of[key] == shard:
                tensors[key] = plan.replacements[key].contiguous()  # an untied output embedding
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
    if plan.untied:
        _write_untied_config(out, plan)


def _write_untied_config(out: Path, plan: _MergePlan) -> None:
    """``tie_word_embeddings: false`` in the merged config; the added tensors in the index."""
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["tie_word_embeddings"] = False
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and "tie_word_embeddings" in text_config:
        text_config["tie_word_embeddings"] = False
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index_path = out / "model.safetensors.index.json"
    if not index_path.is_file():
        return
    index = json.loads(index_path.read_text())
    weight_map = index.setdefault("weight_map", {})
    metadata = index.setdefault("metadata", {})
    for key in sorted(plan.untied - set(weight_map)):
        weight_map[key] = plan.shard_of[key]
        tensor = plan.replacements[key]
        if "total_size" in metadata:
            metadata["total_size"] += tensor.numel() * tensor.element_size()
        if "total_parameters" in metadata:
            metadata["total_parameters"] += tensor.numel()
    index["weight_map"] = dict(sorted(weight_map.items()))
    index_path.write_text(json.dumps(index, indent=2) + "\n")


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
