"""The scoring job: corpus -> normalised rows -> tokens -> scores -> scored cache + rejects.

Wires the stages into one streaming Ray Data pipeline (embedded Ray unless ``ray.address`` is
set): reading and tokenisation run as CPU tasks, one per input partition; scoring runs as an
actor pool with one engine per GPU (per CPU worker without GPUs); a writer task routes every
batch. The driver completes partitions as their rows arrive (``ScoringState``): a killed run,
re-run with the same command, scores only the partitions that had not finished. Output is
published into ``scores/epoch_NNN`` and ``rejects/epoch_NNN`` only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from qtune import schema, storage
from qtune.faults import fault_point
from qtune.pipeline.config import QTuneConfig, check_output_location
from qtune.pipeline.errors import PipelineError, one_line
from qtune.pipeline.layout import SCORE_SUMMARY, OutputLayout
from qtune.pipeline.lock import OutputLock
from qtune.pipeline.progress import StageTimings, StepProgress
from qtune.pipeline.publish import input_fingerprint, model_fingerprint
from qtune.pipeline.remote_sync import check_writable, output_layout, pull_remote, push
from qtune.pipeline.scoring_state import (
    RawTextReader,
    ScoringPlan,
    ScoringState,
    changed_parts,
)
from qtune.stages import ingest
from qtune.stages.score import ScoringOptions
from qtune.stages.score.stage import ReadScoredCache, Score
from qtune.stages.score.vllm_backend import check_vllm_can_serve
from qtune.stages.tokenize import Tokenize, check_tokenizer_serves, resolve_chat_template
from qtune.stages.write import WriteScores

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

__all__ = ["PipelineError", "ScoreSummary", "run_score", "execute_scoring"]

# Bump when the scored cache's content for the same input, model and settings changes.
CACHE_FORMAT = "5"  # 5: exact loss spans for every template (chat_spans), tool calls


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
    partitions: int = 0
    resumed_partitions: int = 0  # found complete from an earlier, interrupted run
    reused: bool = False  # the whole cache was already complete: nothing was scored
    source_rows: dict[str, int] = field(default_factory=dict)  # input rows per source file
    unreadable_sources: list[dict[str, str]] = field(default_factory=list)
    # Files in the input folders that are not read, and why ({path, reason}).
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)
    fingerprint: dict[str, str] = field(default_factory=dict)
    limit: int | None = None  # --limit: only the first N input rows were read (a partial run)
    stages: list[dict] = field(default_factory=list)  # per-stage wall time and rows
    extra: dict = field(default_factory=dict)  # e.g. the checkpoint a re-score used

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> str:
        return json.dumps(
            {**asdict(self), "tokens_per_second": self.tokens_per_second}, indent=2, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str) -> ScoreSummary:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
        num_threads=s.cpu_threads or s.cpus_per_worker,
        tensor_parallel_size=s.tensor_parallel_size,
    )


def _resolve_sources(
    cfg: QTuneConfig,
) -> tuple[list[tuple[ingest.Source, str | None]], list[dict[str, str]]]:
    """The input files with their row format, and the files of the input folders skipped."""
    sources, skipped = ingest.discover_inputs(cfg.input.path)
    ingest.log_skipped(skipped)
    resolved = []
    for source in sources:
        fmt: str | None = cfg.input.format
        if fmt == "auto":
            try:
                fmt = ingest.detect_source_format(source, cfg.input.split)
            except (ingest.InputError, OSError, ValueError):
                fmt = None  # unreadable: planning reports it
            if fmt is None:
                logger.warning("%s: no row in a known format among the first rows", source.path)
        resolved.append((source, fmt))
    skipped_records = [{"path": storage.without_query(e.path), "reason": e.reason} for e in skipped]
    return resolved, skipped_records


def _gpu_visible_here() -> bool:
    """Whether this machine shows a GPU, without importing torch (~1 s of the driver's start).

    Only picks the early checks: once Ray runs, its GPU count decides, and the engine checks
    again with vLLM's own platform detection.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return (
        Path("/proc/driver/nvidia/version").exists()
        or any(Path("/dev").glob("nvidia[0-9]*"))
        or Path("/dev/kfd").exists()  # AMD ROCm
    )


def preflight(
    cfg: QTuneConfig,
) -> tuple[list[tuple[ingest.Source, str | None]], list[dict[str, str]]]:
    """Every check that can fail before any work starts. Returns the input files with their row
    format, and the files of the input folders that are skipped (with why)."""
    model_path = Path(cfg.model.path)
    if not model_path.is_dir():
        raise PipelineError(
            f"model.path {cfg.model.path!r} is not a directory; set model.path to a local model "
            "directory (config.json, weights, tokenizer)"
        )
    if cfg.scoring.backend == "vllm" and not cfg.ray.address:
        # Embedded Ray runs on this machine: whether it has a GPU is known before Ray starts.
        check_vllm_can_serve(str(model_path.absolute()), on_cpu=not _gpu_visible_here())
    sources, skipped = _resolve_sources(cfg)
    check_tokenizer_serves(
        str(model_path.absolute()),
        resolve_chat_template(cfg.model.chat_template),
        {fmt for _, fmt in sources if fmt is not None},
    )
    return sources, skipped


def scoring_fingerprint(cfg: QTuneConfig, model_path: str, input_key: str) -> dict[str, str]:
    """What a scored cache depends on, by name (a mismatch says which changed)."""
    template = resolve_chat_template(cfg.model.chat_template)
    settings = {
        "max_length": cfg.model.max_length,
        "chat_template": template,
        "overlength": cfg.model.overlength,
        "backend": cfg.scoring.backend,
        "dtype": cfg.scoring.dtype,
        "partition_rows": cfg.input.partition_rows,
        "format": cfg.input.format,
        "split": cfg.input.split,
        "cache_format": CACHE_FORMAT,
    }
    return {
        "input": input_key,
        "model": model_fingerprint(model_path),
        "settings": json.dumps(settings, sort_keys=True),
    }


def plan_input(
    cfg: QTuneConfig,
    sources: list[tuple[ingest.Source, str | None]],
    limit: int | None = None,
    skipped: list[dict[str, str]] | None = None,
) -> ScoringPlan:
    """Partition every source; an unreadable one is reported (or fatal under input.strict).

    ``limit``: plan only the first ``limit`` rows, in source order (a partial run).
    """
    partitions: list[dict[str, Any]] = []
    source_rows: dict[str, int] = {}
    unreadable: list[dict[str, str]] = []
    for source, fmt in sources:
        left = None if limit is None else limit - sum(source_rows.values())
        if left is not None and left <= 0:
            break
        try:
            planned = ingest.plan_source(
                source,
                fmt,
                len(partitions),
                cfg.input.partition_rows,
                cfg.input.split,
                max_rows=left,
            )
        except ingest.InputError as e:
            if cfg.input.strict:
                raise
            logger.error("skipping unreadable input %s (input.strict is off)", e)
            unreadable.append({"path": storage.without_query(source.path), "error": str(e)})
            continue
        # Keyed as the rows' source column is: a URI without its endpoint options.
        source_rows[storage.without_query(source.path)] = sum(p.row_count for p in planned)
        partitions += [p.to_dict() for p in planned]
    model_path = str(Path(cfg.model.path).absolute())
    input_key = input_fingerprint([s.path for s, _ in sources])
    fingerprint = scoring_fingerprint(cfg, model_path, input_key)
    if any(p["kind"] == "json" and p.get("byte_end") for p in partitions):
        # JSON arrays were one partition each before they were split by byte range: a state or
        # cache planned the old way must not be resumed or re-used under the new numbering.
        fingerprint["json arrays"] = "byte-range partitions"
    if limit is not None:
        fingerprint["limit"] = str(limit)
    return ScoringPlan(
        partitions=partitions,
        fingerprint=fingerprint,
        source_rows=source_rows,
        unreadable=unreadable,
        skipped=skipped or [],
        limit=limit,
    )


def init_ray(cfg: QTuneConfig) -> bool:
    """Connect to the configured cluster or start embedded Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
        return True
    # "local": always a new embedded instance, never a cluster that `ray start` (or a test's
    # local cluster) recorded on this machine, which a bare ray.init() would join.
    kwargs["address"] = "local"
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_gib:
        kwargs["object_store_memory"] = int(cfg.ray.object_store_gib * 2**30)
    ray.init(**kwargs)
    return True


def scoring_resources(cfg: QTuneConfig, cluster_gpus: int) -> dict:
    """Ray resources of the scoring actor pool: one actor per ``tensor_parallel_size`` GPUs
    (per CPU worker without GPUs); tokenisation tasks are scheduled separately on CPUs."""
    import ray.data

    # An explicit restart budget also keeps Ray from fusing tokenisation into the scoring actors.
    common = {"max_restarts": cfg.scoring.max_restarts}
    tp = cfg.scoring.tensor_parallel_size
    if cluster_gpus:
        if tp > cluster_gpus:
            raise PipelineError(
                f"scoring.tensor_parallel_size {tp} exceeds the cluster's {cluster_gpus} GPU(s)"
            )
        size = cfg.scoring.num_workers or cluster_gpus // tp
        return {"compute": ray.data.ActorPoolStrategy(size=size), "num_gpus": tp, **common}
    if tp > 1:
        raise PipelineError("scoring.tensor_parallel_size > 1 needs GPUs; this cluster has none")
    size = cfg.scoring.num_workers or 1
    return {
        "compute": ray.data.ActorPoolStrategy(size=size),
        "num_cpus": cfg.scoring.cpus_per_worker,
        **common,
    }


def configure_ray_data() -> None:
    """Ray Data settings the scoring pipeline relies on (the driver's context, set per run)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    # A partition travels as one block: never sliced into pieces (scores are then computed in
    # the same windows whatever the data sizes, and each partition completes in one fragment).
    context.target_max_block_size = None
    # A stage's own exception (e.g. ScoringSetupError) reaches the driver as itself.
    context.raise_original_map_exception = True


def _descriptors(partitions: list[dict[str, Any]]) -> list[dict[str, str]]:
    # One JSON string per item: Arrow would otherwise infer a different schema per block.
    return [{"partition": json.dumps(p, sort_keys=True)} for p in partitions]


def build_score_dataset(
    cfg: QTuneConfig, partitions: list[dict[str, Any]], fragments_dir: Path
) -> ray.data.Dataset:
    """The streaming Ray Data plan: read + tokenize (one task per partition) -> score (actors)
    -> write (tasks). Each partition travels as one block, in row order."""
    import ray.data

    chat_template = resolve_chat_template(cfg.model.chat_template)
    model_path = str(Path(cfg.model.path).absolute())
    ds = ray.data.from_items(_descriptors(partitions), override_num_blocks=len(partitions))
    ds = ds.map_batches(
        ingest.ReadPartitions(cfg.input.batch_rows, cfg.input.split),
        batch_size=1,
        batch_format="pyarrow",
    )
    ds = ds.map_batches(
        Tokenize(model_path, cfg.model.max_length, chat_template, cfg.model.overlength),
        batch_size=None,
        batch_format="pyarrow",
        udf_modifying_row_count=False,
    )
    return score_and_write(ds, cfg, model_path, fragments_dir)


def build_rescore_dataset(
    cfg: QTuneConfig, partitions: list[dict[str, Any]], model_path: str, fragments_dir: Path
) -> ray.data.Dataset:
    """Re-score scored-cache parts' token ids with another model: read -> score -> write."""
    import ray.data

    ds = ray.data.from_items(
        [{"path": p["path"], "index": p["index"]} for p in partitions],
        override_num_blocks=len(partitions),
    )
    ds = ds.map_batches(ReadScoredCache(), batch_size=1, batch_format="pyarrow")
    return score_and_write(ds, cfg, model_path, fragments_dir)


def score_and_write(
    ds: ray.data.Dataset, cfg: QTuneConfig, model_path: str, fragments_dir: Path
) -> ray.data.Dataset:
    """The scoring actor pool and the writer, shared by scoring and re-scoring."""
    import ray

    with warnings.catch_warnings():
        # max_restarts has no named parameter yet; Ray warns about every extra remote arg.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(
            Score,
            fn_constructor_args=(
                cfg.scoring.backend,
                scoring_options(cfg, model_path),
                cfg.scoring.batch_size,
            ),
            batch_size=None,
            batch_format="pyarrow",
            udf_modifying_row_count=False,
            **scoring_resources(cfg, int(ray.cluster_resources().get("GPU", 0))),
        )
    return ds.map_batches(WriteScores(str(fragments_dir)), batch_size=None, batch_format="pyarrow")


def _raw_text_reader(split: str) -> RawTextReader:
    def read(partition: dict[str, Any], rows: list[int]) -> dict[int, str]:
        return ingest.raw_texts(ingest.Partition.from_dict(partition), rows, split)

    return read


def check_output_dir(
    layout: OutputLayout, plan: ScoringPlan, epoch: int = 0
) -> ScoreSummary | None:
    """The complete scored cache already in the output dir for this plan, if any.

    Raises PipelineError when the directory holds another corpus's results, or this corpus
    scored with another model or settings (``--restart`` discards them).
    """
    summary_path = layout.score_summary(epoch)
    if not summary_path.is_file():
        return None
    existing = ScoreSummary.from_json(summary_path.read_text())
    old = existing.fingerprint
    if old == plan.fingerprint:
        existing.reused = True
        existing.seconds = 0.0
        return existing
    if existing.limit is not None:
        logger.warning(
            "replacing the partial results of a --limit %d run in %s", existing.limit, layout.root
        )
        discard_outputs(layout)
        return None
    if plan.limit is not None:
        raise PipelineError(
            f"output.dir {layout.name} holds complete results that a --limit run would replace; "
            "point the trial run elsewhere with --set output.dir=..."
        )
    if not old:
        raise PipelineError(
            f"output.dir {layout.name} holds results written by an older qtune (no "
            "fingerprint to compare); re-run with --restart to score again, or set output.dir "
            "to a new directory"
        )
    if old.get("input") != plan.fingerprint["input"]:
        raise PipelineError(
            f"output.dir {layout.name} holds the results of a different corpus; set output.dir "
            "to a new directory, or re-run with --restart to discard what is there"
        )
    changed = ", ".join(changed_parts(old, plan.fingerprint))
    raise PipelineError(
        f"output.dir {layout.name} holds scores of this corpus made with a different "
        f"{changed}; re-run with --restart to re-score (it discards every version there), "
        "or set output.dir to a new directory"
    )


def discard_outputs(layout: OutputLayout) -> None:
    """``--restart``: remove every file qtune wrote into the output dir, as its own records
    list them (``OutputLayout.qtune_files``); any other file stays, and the log says which."""
    owned = layout.qtune_files()
    for path in sorted(owned):
        path.unlink(missing_ok=True)
    layout.remove_empty_folders()
    if owned:
        logger.warning("discarded %d file(s) qtune wrote in %s", len(owned), layout.root)
    kept = layout.foreign_files()
    if kept:
        shown = ", ".join(str(p.relative_to(layout.root)) for p in kept[:5])
        more = f" and {len(kept) - 5} more" if len(kept) > 5 else ""
        logger.warning(
            "kept %d file(s) in %s that qtune did not write: %s%s",
            len(kept),
            layout.root,
            shown,
            more,
        )


def run_score(
    cfg: QTuneConfig, epoch: int = 0, restart: bool = False, limit: int | None = None
) -> ScoreSummary:
    """Score the configured corpus into ``scores/epoch_NNN`` (+ ``rejects/epoch_NNN``).

    Resumes an interrupted run of the same command; re-uses a complete cache for the same
    input, model and settings. ``limit``: only the first N input rows (a partial trial run).
    """
    check_output_location(cfg)
    layout = output_layout(cfg.output.dir, cfg.output.work_dir, pull=False)
    with OutputLock(layout.lock_file, "qtune score"):
        pull_remote(layout)
        check_writable(layout)
        # What this epoch's scoring (and the triage after it) replaces.
        layout.check_publishable(
            layout.scores_dir(epoch), layout.rejects_dir(epoch), layout.data_dir(epoch)
        )
        timings = StageTimings()
        with timings.stage("plan input"):
            sources, skipped = preflight(cfg)
            plan = plan_input(cfg, sources, limit, skipped)
        timings.stages[-1].rows = plan.rows
        if not plan.partitions:
            if plan.unreadable:
                names = "; ".join(u["error"] for u in plan.unreadable[:3])
                raise PipelineError(f"no input file could be read: {names}")
            raise PipelineError(f"input.path {cfg.input.path!r} holds no rows (empty input)")
        if restart:  # only once every check passed
            discard_outputs(layout)
        existing = check_output_dir(layout, plan, epoch)
        if existing is not None:
            logger.info(
                "%s is already scored for this input, model and settings; re-using it "
                "(--restart to score again)",
                existing.scores_dir,
            )
            push(layout)  # a run that died before its push left the remote behind
            return existing
        model_path = str(Path(cfg.model.path).absolute())
        summary = execute_scoring(
            cfg,
            epoch,
            model_path,
            plan,
            lambda pending, fragments: build_score_dataset(cfg, pending, fragments),
            n_sources=len(sources),
            raw_text=_raw_text_reader(cfg.input.split),
            stages=timings.to_list(),
        )
    if summary.scored == 0:
        top = ", ".join(f"{r} ({n:,})" for r, n in list(summary.reasons.items())[:3])
        raise PipelineError(
            f"every one of the {summary.rows:,} input rows was rejected (top reasons: {top}); "
            f"see {summary.rejects_dir}"
        )
    return summary


def execute_scoring(
    cfg: QTuneConfig,
    epoch: int,
    model_path: str,
    plan: ScoringPlan,
    build: Callable[[list[dict[str, Any]], Path], ray.data.Dataset],
    *,
    n_sources: int,
    raw_text: RawTextReader | None = None,
    carried_rejects: Path | None = None,
    extra: dict | None = None,
    restart: bool = False,
    stages: list[dict] | None = None,
) -> ScoreSummary:
    """Score the plan's unfinished partitions, finish, publish ``scores/`` and ``rejects/``.

    ``stages``: timings of steps before this one (planning), carried into the summary.

    ``raw_text``: reads original rows, to move repeated sample_ids to rejects (first scoring
    only). ``carried_rejects``: a previous epoch's rejects, copied in (re-scoring never sees
    those rows, yet every version must account for every input row).
    """
    layout = output_layout(cfg.output.dir, cfg.output.work_dir, pull=False)
    # On a cluster the writer tasks run on other machines: a remote output's fragments go to its
    # storage, where every node (and the driver) can reach them.
    state = ScoringState(layout.scoring_state(epoch, shared=bool(cfg.ray.address)), plan)
    try:
        return _execute_scoring(
            cfg,
            epoch,
            model_path,
            plan,
            build,
            layout,
            state,
            n_sources=n_sources,
            raw_text=raw_text,
            carried_rejects=carried_rejects,
            extra=extra,
            restart=restart,
            stages=stages,
        )
    except OSError as e:
        raise PipelineError(
            f"scoring into {layout.name} failed: {one_line(e)}. Finished partitions are kept in "
            f"{state.layout.root}: fix the cause (free disk space) and re-run the same command "
            "to resume"
        ) from e


def _execute_scoring(
    cfg: QTuneConfig,
    epoch: int,
    model_path: str,
    plan: ScoringPlan,
    build: Callable[[list[dict[str, Any]], Path], ray.data.Dataset],
    layout: OutputLayout,
    state: ScoringState,
    *,
    n_sources: int,
    raw_text: RawTextReader | None,
    carried_rejects: Path | None,
    extra: dict | None,
    restart: bool,
    stages: list[dict] | None,
) -> ScoreSummary:
    started = time.perf_counter()
    state.open(restart=restart)
    if state.finalized:
        summary = ScoreSummary.from_json((state.layout.scores / SCORE_SUMMARY).read_text())
    else:
        timings = StageTimings.from_list(stages or [])
        pending = state.pending()
        if pending:
            rows = sum(p["row_count"] for p in pending)
            with timings.stage("score", rows=rows):
                _score_pending(cfg, model_path, state, pending, build)
        state.check_complete()
        fault_point("score.before_finalize")
        with timings.stage("finish scores", rows=plan.rows):
            if raw_text is not None:
                state.deduplicate(raw_text)
            carried = sorted(carried_rejects.glob("*.parquet")) if carried_rejects else []
            summary = summarise(state.totals(), layout, epoch, n_sources, carried)
        summary.seconds = time.perf_counter() - started
        summary.backend = cfg.scoring.backend
        summary.model_path = model_path
        summary.model_fingerprint = plan.fingerprint.get("model") or model_fingerprint(model_path)
        summary.partitions = len(plan.partitions)
        summary.resumed_partitions = state.resumed
        summary.source_rows = plan.source_rows
        summary.unreadable_sources = plan.unreadable
        summary.skipped_inputs = plan.skipped
        summary.fingerprint = plan.fingerprint
        summary.limit = plan.limit
        summary.stages = timings.to_list()
        summary.extra = extra or {}
        state.finalize(summary.to_json(), cfg.to_json(), carried)
    state.publish(layout.rejects_dir(epoch), layout.scores_dir(epoch), owner=layout)
    push(layout)
    if state.layout.shared_fragments:
        storage.remove_tree(state.layout.shared_fragments)
    layout.remove_staging_dir(state.layout.root)
    fault_point("score.published")
    return summary


def _score_pending(
    cfg: QTuneConfig,
    model_path: str,
    state: ScoringState,
    pending: list[dict[str, Any]],
    build: Callable[[list[dict[str, Any]], Path], ray.data.Dataset],
) -> None:
    """Run the Ray pipeline over the unfinished partitions, completing each as it arrives."""
    import ray

    we_started_ray = init_ray(cfg)
    try:
        if cfg.scoring.backend == "vllm":
            on_cpu = not ray.cluster_resources().get("GPU", 0)
            check_vllm_can_serve(model_path, on_cpu)
        configure_ray_data()
        dataset = build(pending, state.layout.fragments)
        total = sum(p["row_count"] for p in pending)
        # Closed on the way out: an error in this loop (a full disk while a partition is
        # completed) stops the streaming executor now, before ray.shutdown(), not whenever the
        # iterator held by the error's traceback is garbage collected.
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        with StepProgress("scoring", total) as progress, contextlib.closing(batches):
            for fragments in batches:
                state.record(fragments)
                progress.advance(
                    int(pc.sum(fragments.column("rows")).as_py() or 0),
                    int(pc.sum(fragments.column("tokens")).as_py() or 0),
                )
    except ray.exceptions.RayActorError as e:
        raise PipelineError(
            f"a scoring worker died {cfg.scoring.max_restarts + 1} times "
            f"(scoring.max_restarts = {cfg.scoring.max_restarts}): "
            f"{str(e).strip().splitlines()[0]}. The {len(state.done_partitions())} "
            "finished partitions are kept: re-running the same command resumes."
        ) from e
    finally:
        if we_started_ray:
            if not cfg.ray.address:  # embedded: ray.shutdown() stops the raylet itself
                wait_for_released_actors()
            ray.shutdown()


def wait_for_released_actors(timeout_s: float = 60.0) -> None:
    """Wait until the processes of this job's finished actors have exited (embedded Ray).

    When a dataset finishes, Ray Data releases its actor pool: Ray marks each actor DEAD at once,
    but its process is still exiting (the UDF's ``__del__`` shuts the engine down, then Ray's core
    worker tears itself down). ``ray.shutdown()`` of an embedded cluster in that window stops the
    raylet under it: the worker's "raylet failed" exit then races its own graceful one and can
    abort ("Mutex corrupt", SIGABRT, "Fatal Python error: Aborted" in the log of a good run), or
    cut the engine's shutdown short. Best effort: gives up after ``timeout_s``, never raises.
    """
    import ray

    try:
        from ray._private import state  # an actor's pid, without the dashboard's state API

        job = ray.get_runtime_context().get_job_id()
        pids = {
            actor["Pid"]
            for actor in state.actors(actor_state_name="DEAD").values()
            if actor["JobID"] == job and not actor["IsDetached"] and actor["Pid"]
        }
    except Exception as e:  # noqa: BLE001 - teardown in a finally: never mask the run's outcome
        logger.debug("could not list this job's finished actors (%s); not waiting", e)
        return
    deadline = time.monotonic() + timeout_s
    while pids := {pid for pid in pids if not _process_gone(pid)}:
        if time.monotonic() > deadline:
            logger.debug("actor processes %s still exiting after %g s", sorted(pids), timeout_s)
            return
        time.sleep(0.05)


def _process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie has: its parent, the raylet, reaps it later)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return stat[stat.rfind(")") + 2] == "Z"


def summarise(
    totals: dict[str, Any],
    layout: OutputLayout,
    epoch: int,
    n_sources: int,
    carried_rejects: list[Path],
) -> ScoreSummary:
    reasons = totals["reasons"].copy()
    carried = 0
    for part in carried_rejects:
        column = pq.read_table(part, columns=[schema.REASON]).column(schema.REASON)
        reasons.update(column.to_pylist())
        carried += len(column)
    scored = totals["scored"]
    return ScoreSummary(
        output_dir=layout.location,
        scores_dir=str(layout.scores_dir(epoch)),
        rejects_dir=str(layout.rejects_dir(epoch)),
        sources=n_sources,
        rows=totals["rows"] + carried,
        scored=scored,
        rejected=totals["rejected"] + carried,
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
