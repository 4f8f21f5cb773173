"""The one user-facing configuration model, loaded from YAML with ``--set`` overrides.

Unknown keys are rejected; every field says what it trades off. Relative paths are resolved
against the current working directory (the same rule for YAML and ``--set``). Stages never see
this model: the pipeline hands them plain values.
"""

from __future__ import annotations

import fnmatch
import glob
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

InputFormat = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"]


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


def _registered(value: str, registry: dict, what: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(sorted(registry))}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    path: str | list[str] = Field(
        description="Files, folders, globs, or a `datasets` save_to_disk directory (or a list)."
    )
    format: InputFormat = Field(
        "auto", description="Row format; `auto` detects it per source from the first rows."
    )
    split: str = Field("train", description="Split to read from a saved DatasetDict.")
    batch_rows: int = Field(
        512, ge=1, description="Rows per ingest batch: larger is faster, smaller streams finer."
    )
    partition_rows: int = Field(
        4096,
        ge=1,
        description="Rows per partition, the unit of scoring and of resume after a crash: a "
        "killed run redoes at most the partitions in flight.",
    )
    strict: bool = Field(
        False,
        description="Fail on an unreadable input file instead of reporting it and going on.",
    )


class ModelConfig(_Section):
    path: str = Field(description="Local model directory (config, weights, tokenizer).")
    max_length: int = Field(2048, ge=8, description="Longest sample in tokens, as in training.")
    chat_template: str | None = Field(
        None,
        description="For models without one: a built-in name (`chatml`) or a Jinja file path. "
        "Overrides the tokenizer's own template when set.",
    )
    overlength: Literal["truncate", "reject"] = Field(
        "truncate",
        description="Samples over max_length: `truncate` cuts the tail of the last response "
        "(as trainers do), `reject` lists them in rejects.",
    )


class ScoringConfig(_Section):
    backend: str = Field(
        "vllm", description="`vllm` (default, exact, fast) or `torch` (reference)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype for scoring; `auto`: float32 on CPU, checkpoint's on GPU."
    )
    num_workers: int | None = Field(
        None, ge=1, description="Scoring actors; default one per GPU (one on a CPU-only node)."
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM: GPUs per scoring actor (tensor parallel); one actor per this many "
        "GPUs. 1 for models that fit one GPU (an 8B model in bf16 does).",
    )
    cpus_per_worker: int = Field(
        1, ge=1, description="CPU cores Ray reserves per scoring actor (tokenisation gets the rest)"
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch backend on CPU: threads of a scoring actor's forward (default: "
        "cpus_per_worker; vLLM on CPU always uses the actor's reserved cores). "
        "More threads than reserved cores measured 1.05x end to end on an idle 2-core machine, "
        "but slower where other work shares the cores (tokenisation, other jobs).",
    )
    max_restarts: int = Field(
        2, ge=0, description="Times a dead scoring actor is restarted before the job fails."
    )
    batch_size: int = Field(
        256, ge=1, description="Samples handed to one scoring call; larger amortises overhead."
    )
    max_num_seqs: int = Field(256, ge=1, description="vLLM: sequences per engine step.")
    max_num_batched_tokens: int | None = Field(
        None,
        description="vLLM: tokens per engine step; must be >= model.max_length (chunked prefill "
        "is off so every sample is scored in one step). Default: max(max_length, 16384).",
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vLLM on GPU.")
    cpu_kvcache_gib: int = Field(
        1, ge=1, description="vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)."
    )
    enforce_eager: bool = Field(
        True, description="vLLM: skip graph capture (faster start; capture pays off on GPU)."
    )
    tokens_per_forward: int = Field(
        16384, ge=16, description="torch backend: padded tokens per forward pass."
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from qtune.stages.score import BACKENDS

        return _registered(value, BACKENDS, "backend")


#: Default of ``qtuning.min_prunable_tokens``; README "Pruning guards" gives the measurement.
MIN_PRUNABLE_TOKENS = 4


class QTuningConfig(_Section):
    policy: str = Field(
        "qtuning",
        description="Sample policy: `qtuning` (EU-plane corners) or a baseline for ablations: "
        "`random`, `ppl`, `entropy`, `longest`, `shortest`.",
    )
    token_policy: Literal["qtuning", "random", "none"] = Field(
        "qtuning",
        description="Token pruning inside pruned samples: `qtuning` (lowest neighbour-smoothed "
        "PPL kept), `random` (seeded), `none` (keep every response token).",
    )
    sample_ratio: float = Field(
        0.25, gt=0, le=1, description="r_s: share of samples kept (K = floor(r_s * |S|), >= 1)."
    )
    token_ratio: float = Field(
        0.5, gt=0, le=1, description="r_t: share of response tokens kept in pruned samples."
    )
    lam: float = Field(
        0.5, ge=0, le=1, description="lambda: weight of the two neighbours in the token score."
    )
    keep_end_of_turn: bool = Field(
        True,
        description="Guard (not in the paper): token pruning never masks a turn's end-of-turn "
        "token and leaves it out of the budget; masking it teaches the model not to stop.",
    )
    min_prunable_tokens: int = Field(
        MIN_PRUNABLE_TOKENS,
        ge=0,
        description="Guard (not in the paper): responses with fewer prunable tokens (response "
        "tokens other than end-of-turn tokens) keep all of them even in Q2; 0 turns it off.",
    )
    scope: Literal["global", "batch", "group"] = Field(
        "global",
        description='Where quantiles are taken: the whole epoch (`global`; README "Mixed '
        'corpora" gives the measurements behind this default), each group of `group_by`, by '
        "default each input file (`group`: every part of a mixed corpus keeps its share), or "
        "seeded pseudo mini-batches of `batch_size` (`batch`, as in the paper).",
    )
    batch_size: int = Field(8, ge=1, description="Pseudo mini-batch size for scope `batch`.")
    group_by: str | None = Field(
        None,
        description="Groups for scope `group` and for the coverage check: `file` (the source "
        "file of each row) or a top-level field of the input rows (e.g. `task`, `category`). "
        "Unset: by file.",
    )
    group_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="Scope `group`: a group's own sample ratio (others use sample_ratio).",
    )
    min_group_size: int = Field(
        8,
        ge=1,
        description="Scope `group`: smaller groups are not triaged; they keep floor(r * n) by "
        "the support score |P - E|.",
    )
    coverage_min_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Warn about a group whose share of the kept samples is below this fraction "
        "of its share of the input.",
    )
    seed: int = Field(0, description="Seed for batch shuffling and the random policies.")
    normalize: Literal["minmax", "rank"] = Field(
        "minmax", description="Normalisation of PPL and entropy for the fill-up support score."
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from qtune.stages.triage import POLICIES

        return _registered(value, POLICIES, "policy")

    @field_validator("group_ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {g: r for g, r in value.items() if not 0 < r <= 1}
        if bad:
            raise ValueError(f"group ratios must be in (0, 1]; got {bad}")
        return value


class OutputConfig(_Section):
    dir: str = Field(
        description="Output directory (scores, rejects, data versions): a local path or a "
        "filesystem URI (`s3://bucket/run`, `gs://…`, any pyarrow/fsspec filesystem)."
    )
    work_dir: str | None = Field(
        None,
        description="For a remote output.dir: this machine's working copy (lock, resume state, "
        "scored cache); default `$QTUNE_CACHE_DIR/outputs/<name>-<hash>` "
        "(`~/.cache/qtune` when unset).",
    )
    num_shards: int = Field(
        8,
        ge=1,
        description="Parquet files per version (use a multiple of GPUs x dataloader workers); "
        "fewer when there are fewer kept samples than shards.",
    )
    row_group_rows: int = Field(1024, ge=1, description="Rows per Parquet row group in the shards.")
    report: bool = Field(
        True,
        description="Write the version's report (EU plane, quadrants, examples) after `run` "
        "and `rescore`; `qtune report` writes it on demand.",
    )

    @field_validator("dir", "work_dir")
    @classmethod
    def _names_a_directory(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(
                "empty: name a directory of its own for qtune's output (e.g. out/run1)"
            )
        return value


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Ray cluster address (`auto`, `ray://host:10001`); unset: embedded Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="Embedded Ray: CPUs to use.")
    object_store_gib: float | None = Field(
        None, gt=0, description="Embedded Ray: object store size (default: Ray's own)."
    )


class QTuneConfig(_Section):
    input: InputConfig
    model: ModelConfig
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    qtuning: QTuningConfig = Field(default_factory=QTuningConfig)
    output: OutputConfig
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _batched_tokens_cover_max_length(self) -> QTuneConfig:
        mnbt = self.scoring.max_num_batched_tokens
        if mnbt is not None and mnbt < self.model.max_length:
            raise ValueError(
                f"scoring.max_num_batched_tokens ({mnbt}) must be >= model.max_length "
                f"({self.model.max_length}): each sample is scored in one engine step"
            )
        return self

    def to_json(self) -> str:
        """Resolved configuration, for manifests and fingerprints."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"section.key=value"`` -> (["section", "key"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from e
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            section = _section_model(item["loc"][:-1])
            valid = ", ".join(section.model_fields) if section else ""
            lines.append(
                f"  {key}: unknown key" + (f" (valid keys here: {valid})" if valid else "")
            )
        elif item["type"] == "missing":
            lines.append(f"  {key}: required but not set")
        else:
            lines.append(f"  {key}: {item['msg'].removeprefix('Value error, ')}")
    if len(lines) == 2:  # one problem: one line
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def _section_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = QTuneConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return None
        if not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> QTuneConfig:
    """Read YAML (or start empty), apply ``--set`` overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    source = "--set overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at "
                f"offset {e.start}; save it as UTF-8"
            ) from e
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded or {}
    data = apply_overrides(data, overrides or [])
    try:
        return QTuneConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


# --- where qtune may write --------------------------------------------------------------------


def check_output_location(cfg: QTuneConfig, out: str | None = None) -> None:
    """Refuse an output location qtune must not write into, before anything is written there.

    Checks ``out`` (``triage --out``) or else ``output.dir``, and a remote output's configured
    ``output.work_dir``: each must be a directory of its own — not empty, not the working
    directory, the home directory or ``/``, not a file nor under one — and must not be, contain
    or lie inside any input (``input.path`` entries, a glob's base directory and its matches;
    ``model.path``), compared after resolving symlinks (URIs: normalised). Raises
    :class:`ConfigError` naming both paths. Looks at the local filesystem only (never a
    remote one).
    """
    from qtune import storage

    name, location = ("--out", out) if out is not None else ("output.dir", cfg.output.dir)
    targets = [(name, location)]
    if storage.is_remote(location) and out is None and cfg.output.work_dir is not None:
        targets.append(("output.work_dir", cfg.output.work_dir))
    specs = [cfg.input.path] if isinstance(cfg.input.path, str) else list(cfg.input.path)
    inputs = [("input.path", spec) for spec in specs] + [("model.path", cfg.model.path)]
    for target_name, target in targets:
        if not storage.is_remote(target):
            _check_own_directory(target_name, target)
        for input_name, spec in inputs:
            overlap = _overlapping_input(target, spec)
            if overlap is not None:
                raise ConfigError(
                    f"{target_name} {_shown(target)} overlaps {input_name} {_shown(overlap)} "
                    f"({_relation(target, overlap)}): qtune writes, replaces and on --restart "
                    f"deletes files in {target_name}; choose a directory outside every input"
                )


def _shown(location: str) -> str:
    """A location as the user wrote it, and what it resolves to when that differs."""
    from qtune import storage

    shown = storage.without_query(location)
    resolved = storage.normalize(location)
    return shown if resolved.rstrip("/") == shown.rstrip("/") else f"{shown} (= {resolved})"


def _check_own_directory(name: str, location: str) -> None:
    """A local output location: a directory of its own, or a path where one can be made."""
    if not location.strip():
        raise ConfigError(f"{name} is empty: name a directory of its own (e.g. out/run1)")
    path = Path(location.removeprefix("file://"))
    resolved = path.resolve()
    special = {Path("/"): "the filesystem root", Path.cwd().resolve(): "the current directory"}
    try:
        special.setdefault(Path.home().resolve(), "the home directory")
    except RuntimeError:
        pass  # no home directory known
    if resolved in special:
        raise ConfigError(
            f"{name} {location!r} is {special[resolved]} ({resolved}): qtune writes its versions, "
            "scored cache and dataset card there; name a directory of its own (e.g. out/run1)"
        )
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"{name} {location} is a file, not a directory; name a directory")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{name} {location} lies under {parent}, which is a file, not a directory"
                )
            break


def _overlapping_input(target: str, spec: str) -> str | None:
    """The input path (``spec``, its glob base or one of its matches) that is, contains or lies
    inside ``target``; None when they are apart."""
    from qtune import storage

    if storage.is_remote(target) != storage.is_remote(spec):
        return None
    out = storage.normalize(target)
    if not storage.has_magic(spec):
        return spec if _related(out, storage.normalize(spec)) else None
    base, pattern = storage.glob_base(spec)
    normal_base = storage.normalize(base)
    if _within(normal_base, out):  # the output is the glob's base or above it
        return base
    if _within(out, normal_base) and _reaches(_relative_parts(out, normal_base), pattern):
        return spec  # the glob can match the output, something in it, or a folder above it
    if not storage.is_remote(spec):  # a match may be a symlink into the output
        for match in glob.glob(spec.removeprefix("file://"), recursive=True):
            if _related(out, storage.normalize(match)):
                return match
    return None


def _within(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or lies under it (normalised spellings)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _related(a: str, b: str) -> bool:
    return _within(a, b) or _within(b, a)


def _relative_parts(path: str, directory: str) -> list[str]:
    return [p for p in path[len(directory.rstrip("/")) :].split("/") if p]


def _reaches(parts: list[str], pattern: list[str]) -> bool:
    """Whether a glob's segments below its base can match ``parts`` (a path below the base), a
    path inside it, or a folder above it."""
    for i, segment in enumerate(pattern):
        if "**" in segment:
            return True  # spans any depth
        if i == len(parts):
            return True  # the pattern goes on inside the path
        if not fnmatch.fnmatchcase(parts[i], segment):
            return False
    return True  # a match is the path itself or a folder above it


def _relation(target: str, overlap: str) -> str:
    from qtune import storage

    a, b = storage.normalize(target), storage.normalize(overlap)
    if a == b:
        return "the same location"
    if _within(b, a):
        return "the input lies inside the output"
    if _within(a, b):
        return "the output lies inside the input"
    return "the input pattern reaches into the output"
