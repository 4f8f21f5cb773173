"""The scoring job: corpus -> normalised rows -> tokens -> scores -> scored cache + rejects.

Wires the stages into one streaming Ray Data pipeline (embedded Ray unless ``ray.address`` is
set): reading and tokenisation run as CPU tasks, scoring as an actor pool with one engine per GPU
(per CPU worker without GPUs), and a writer task routes every batch. Output is written to a
staging directory and moved into ``scores/epoch_NNN`` and ``rejects/epoch_NNN`` only when
complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from qtune import schema
from qtune.pipeline.config import QTuneConfig
from qtune.pipeline.layout import SCORE_CONFIG, SCORE_SUMMARY, OutputLayout, publish_dir
from qtune.pipeline.publish import model_fingerprint
from qtune.stages import ingest
from qtune.stages.score import ScoringOptions
from qtune.stages.score.stage import ReadScoredCache, Score
from qtune.stages.score.vllm_backend import check_vllm_can_serve
from qtune.stages.tokenize import Tokenize, check_tokenizer_serves, resolve_chat_template
from qtune.stages.write import STATS_SCHEMA, WriteScores

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)


# Rows per scored-cache part: few enough files for a million samples, small enough to stream.
WRITE_BATCH_ROWS = 4096


class PipelineError(RuntimeError):
    """The job could not run or produced nothing usable; the message says why."""


@dataclass
class ScoreSummary:
    output_dir: str
    scores_dir: str
    rejects_dir: str
    sources: int
    rows: int = 0
    scored: int = 0
    rejected: int = 0
    truncated: int = 0
    tokens: int = 0
    response_tokens: int = 0
    mean_nll: float = float("nan")
    mean_entropy: float = float("nan")
    mean_token_entropy: float = float("nan")
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    backend: str = ""
    model_path: str = ""
    model_fingerprint: str = ""
    extra: dict = field(default_factory=dict)  # e.g. the checkpoint a re-score used

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> str:
        return json.dumps(
            {**asdict(self), "tokens_per_second": self.tokens_per_second}, indent=2, sort_keys=True
        )


def scoring_options(cfg: QTuneConfig, model_path: str | Path | None = None) -> ScoringOptions:
    s = cfg.scoring
    return ScoringOptions(
        model_path=str(Path(model_path or cfg.model.path).absolute()),
        max_length=cfg.model.max_length,
        dtype=s.dtype,
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        gpu_memory_utilization=s.gpu_memory_utilization,
        cpu_kvcache_gib=s.cpu_kvcache_gib,
        enforce_eager=s.enforce_eager,
        tokens_per_forward=s.tokens_per_forward,
        num_threads=s.cpus_per_worker,
    )


def _resolve_sources(cfg: QTuneConfig) -> list[tuple[ingest.Source, str]]:
    sources = ingest.discover_sources(cfg.input.path)
    resolved = []
    for source in sources:
        fmt = cfg.input.format
        if fmt == "auto":
            fmt = ingest.detect_source_format(source, cfg.input.split) or "auto"
        resolved.append((source, fmt))
    return resolved


def preflight(cfg: QTuneConfig) -> list[tuple[ingest.Source, str]]:
    """Every check that can fail before any work starts."""
    model_path = Path(cfg.model.path)
    if not model_path.is_dir():
        raise PipelineError(f"model.path {cfg.model.path!r} is not a directory")
    sources = _resolve_sources(cfg)
    check_tokenizer_serves(
        str(model_path.absolute()),
        resolve_chat_template(cfg.model.chat_template),
        {fmt for _, fmt in sources if fmt != "auto"},
    )
    return sources


def init_ray(cfg: QTuneConfig) -> bool:
    """Connect to the configured cluster or start embedded Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
        return True
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_gib:
        kwargs["object_store_memory"] = int(cfg.ray.object_store_gib * 2**30)
    ray.init(**kwargs)
    return True


def _scoring_resources(cfg: QTuneConfig) -> dict:
    import ray
    import ray.data

    gpus = int(ray.cluster_resources().get("GPU", 0))
    # An explicit restart budget also keeps Ray from fusing tokenisation into the scoring actors.
    common = {"max_restarts": cfg.scoring.max_restarts}
    if gpus:
        size = cfg.scoring.num_workers or gpus
        return {"compute": ray.data.ActorPoolStrategy(size=size), "num_gpus": 1, **common}
    size = cfg.scoring.num_workers or 1
    return {
        "compute": ray.data.ActorPoolStrategy(size=size),
        "num_cpus": cfg.scoring.cpus_per_worker,
        **common,
    }


def build_score_dataset(
    cfg: QTuneConfig,
    sources: list[tuple[ingest.Source, str]],
    scores_dir: Path,
    rejects_dir: Path,
) -> ray.data.Dataset:
    """The streaming Ray Data plan: read -> tokenize (tasks) -> score (actors) -> write (tasks)."""
    import ray.data

    chat_template = resolve_chat_template(cfg.model.chat_template)
    model_path = str(Path(cfg.model.path).absolute())
    items = [
        {"path": str(Path(s.path).absolute()), "kind": s.kind, "format": f} for s, f in sources
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ingest.ReadSources(cfg.input.batch_rows, cfg.input.split),
        batch_size=1,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(
        Tokenize(model_path, cfg.model.max_length, chat_template, cfg.model.overlength),
        batch_size=cfg.input.batch_rows,
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )
    return score_and_write(ds, cfg, model_path, scores_dir, rejects_dir)


def build_rescore_dataset(
    cfg: QTuneConfig,
    cache_files: list[Path],
    model_path: str,
    scores_dir: Path,
    rejects_dir: Path,
) -> ray.data.Dataset:
    """Re-score a scored cache's token ids with another model: read -> score -> write."""
    import ray.data

    files = [{"path": str(f)} for f in cache_files]
    ds = ray.data.from_items(files, override_num_blocks=len(files))
    ds = ds.map_batches(ReadScoredCache(), batch_size=1, batch_format="pyarrow")
    return score_and_write(ds, cfg, model_path, scores_dir, rejects_dir)


def score_and_write(
    ds: ray.data.Dataset, cfg: QTuneConfig, model_path: str, scores_dir: Path, rejects_dir: Path
) -> ray.data.Dataset:
    """The scoring actor pool and the writer, shared by scoring and re-scoring."""
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray warns about every extra remote arg.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(
            Score,
            fn_constructor_args=(cfg.scoring.backend, scoring_options(cfg, model_path)),
            batch_size=cfg.scoring.batch_size,
            batch_format="pyarrow",
            udf_modifying_row_count=False,
            **_scoring_resources(cfg),
        )
    return ds.map_batches(
        WriteScores(str(scores_dir), str(rejects_dir)),
        batch_size=WRITE_BATCH_ROWS,
        batch_format="pyarrow",
    )


def run_score(cfg: QTuneConfig, epoch: int = 0) -> ScoreSummary:
    """Score the configured corpus into ``scores/epoch_NNN`` (+ ``rejects/epoch_NNN``)."""
    sources = preflight(cfg)
    model_path = str(Path(cfg.model.path).absolute())
    summary = execute_scoring(
        cfg,
        epoch,
        model_path,
        lambda scores, rejects: build_score_dataset(cfg, sources, scores, rejects),
        n_sources=len(sources),
    )
    if summary.rows == 0:
        raise PipelineError(f"input {cfg.input.path!r} has no rows")
    return summary


def execute_scoring(
    cfg: QTuneConfig,
    epoch: int,
    model_path: str,
    build: Callable[[Path, Path], ray.data.Dataset],
    *,
    n_sources: int,
    carried_rejects: Path | None = None,
    extra: dict | None = None,
) -> ScoreSummary:
    """Run a scoring plan into staging, then publish ``scores/`` and ``rejects/`` of ``epoch``.

    ``carried_rejects``: a previous epoch's rejects, copied in (re-scoring never sees those rows,
    yet every version must account for every input row).
    """
    import ray
    import ray.data

    started = time.perf_counter()
    layout = OutputLayout(Path(cfg.output.dir))
    staging = layout.new_staging_dir(f"score-{epoch:03d}")
    staged_scores, staged_rejects = staging / "scores", staging / "rejects"
    staged_scores.mkdir()
    staged_rejects.mkdir()
    we_started_ray = init_ray(cfg)
    try:
        if cfg.scoring.backend == "vllm":
            on_cpu = not ray.cluster_resources().get("GPU", 0)
            check_vllm_can_serve(model_path, on_cpu)
        ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
        stats = list(
            build(staged_scores, staged_rejects).iter_batches(
                batch_size=None, batch_format="pyarrow"
            )
        )
        summary = summarise(
            pa.concat_tables(stats) if stats else STATS_SCHEMA.empty_table(),
            layout,
            epoch,
            n_sources,
        )
        carried_parts = sorted(carried_rejects.glob("*.parquet")) if carried_rejects else []
        if carried_parts:
            for part in carried_parts:
                shutil.copy2(part, staged_rejects / part.name)
            carried = pa.concat_tables(
                [pq.read_table(part, columns=[schema.REASON]) for part in carried_parts]
            )
            summary.rejected += carried.num_rows
            summary.rows += carried.num_rows
            for reason in carried.column(schema.REASON).to_pylist():
                summary.reasons[reason] = summary.reasons.get(reason, 0) + 1
    except BaseException:
        layout.remove_staging_dir(staging)
        raise
    finally:
        if we_started_ray:
            ray.shutdown()
    summary.seconds = time.perf_counter() - started
    summary.backend = cfg.scoring.backend
    summary.model_path = model_path
    summary.model_fingerprint = model_fingerprint(model_path)
    summary.extra = extra or {}
    (staged_scores / SCORE_CONFIG).write_text(cfg.to_json())
    (staged_scores / SCORE_SUMMARY).write_text(summary.to_json())
    publish_dir(staged_scores, layout.scores_dir(epoch))
    publish_dir(staged_rejects, layout.rejects_dir(epoch))
    layout.remove_staging_dir(staging)
    return summary


def summarise(stats: pa.Table, layout: OutputLayout, epoch: int, n_sources: int) -> ScoreSummary:
    totals = {
        name: sum(stats.column(name).to_pylist())
        for name in STATS_SCHEMA.names
        if name != "reasons"
    }
    reasons: dict[str, int] = {}
    for text in stats.column("reasons").to_pylist():
        for reason, count in json.loads(text).items():
            reasons[reason] = reasons.get(reason, 0) + count
    scored = totals["scored"]
    return ScoreSummary(
        output_dir=str(layout.root),
        scores_dir=str(layout.scores_dir(epoch)),
        rejects_dir=str(layout.rejects_dir(epoch)),
        sources=n_sources,
        rows=totals["rows"],
        scored=scored,
        rejected=totals["rejected"],
        truncated=totals["truncated"],
        tokens=totals["tokens"],
        response_tokens=totals["response_tokens"],
        mean_nll=totals["sum_nll"] / scored if scored else float("nan"),
        mean_entropy=totals["sum_entropy"] / scored if scored else float("nan"),
        mean_token_entropy=(
            totals["token_sum_entropy"] / totals["response_tokens"]
            if totals["response_tokens"]
            else float("nan")
        ),
        reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    )
