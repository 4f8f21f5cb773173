"""The ``qtune`` command line."""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qtune import storage
from qtune.pipeline.config import ConfigError, QTuneConfig, check_output_location, load_config

if TYPE_CHECKING:
    from qtune.pipeline.score_job import ScoreSummary
    from qtune.pipeline.triage_job import TriageSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Q-Tuning data curation for SFT: score, triage on the Error-Uncertainty plane, publish.",
)
# Logs and CI capture are not terminals: use a width that keeps the summary tables on one line.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
T = TypeVar("T")

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable)."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        min=1,
        help="Only the first N input rows: a quick, partial trial of a config (marked partial).",
    ),
]
RestartOpt = Annotated[
    bool,
    typer.Option(
        "--restart",
        help="Discard an unfinished or mismatching earlier run in output.dir instead of "
        "resuming or refusing (run/score: every file qtune wrote there, as its manifests and "
        "state list them; files it did not write stay; rescore: that epoch's).",
    ),
]


def _print_skipped_inputs(skipped: list[dict[str, str]], shown: int = 10) -> None:
    """Files of the input folders that were not read (all listed in the manifest); hidden
    metadata names (``_SUCCESS``, ``.git``) only as a count."""
    from qtune.stages.ingest import HIDDEN_REASON

    hidden = sum(entry["reason"] == HIDDEN_REASON for entry in skipped)
    if hidden:
        console.print(
            f"{hidden} hidden metadata file(s) in the input folders not read (names starting "
            "with '.' or '_'; listed in the manifest's skipped_inputs)",
            highlight=False,
        )
    skipped = [entry for entry in skipped if entry["reason"] != HIDDEN_REASON]
    for entry in skipped[:shown]:
        err_console.print(
            f"[yellow]not an input, skipped:[/yellow] {escape(entry['path'])}: "
            f"{escape(entry['reason'])}",
            highlight=False,
            soft_wrap=True,
        )
    if len(skipped) > shown:
        err_console.print(
            f"… and {len(skipped) - shown} more skipped file(s), listed in the manifest's "
            "skipped_inputs",
            highlight=False,
        )


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # bind to the current stderr on every invocation
    )


def _load(config: Path | None, overrides: list[str] | None) -> QTuneConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        raise _fail(str(e), code=2) from None


def _load_for_writing(
    config: Path | None, overrides: list[str] | None, out: str | None = None
) -> QTuneConfig:
    """The config of a command that writes into ``output.dir`` (or ``out``): its location is
    checked before anything starts (``check_output_location``)."""
    cfg = _load(config, overrides)
    try:
        check_output_location(cfg, out)
    except ConfigError as e:
        raise _fail(str(e), code=2) from None
    return cfg


def _fail(message: str, code: int = 1) -> typer.Exit:
    from qtune.pipeline.inspect import terminal_safe

    # Messages quote paths, ids and data: shown as written, never as markup or terminal codes.
    err_console.print(
        f"[red]error:[/red] {escape(terminal_safe(message))}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code)


def _known_error(error: BaseException, expected: tuple[type, ...]) -> BaseException | None:
    """The first known error along the chain (Ray wraps a stage's exception: RayTaskError ->
    ``cause``); its own message, not Ray's wrapper with a remote traceback."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    wrapper = ray_exceptions.RayTaskError if ray_exceptions else ()
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, expected) and not isinstance(seen, wrapper):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def _guard(job: Callable[[], T]) -> T:
    """Run a job; known failures become one clear line and a non-zero exit, not a traceback.

    A configuration problem found on the way (``ConfigError``: e.g. an output directory holding
    files qtune did not write) exits with 2; an OS error no job explained (a full disk, a
    read-only filesystem) with 1, as the error's own line (path and cause); its traceback is
    logged with ``--verbose``.
    """
    from qtune.pipeline.checkpoints import CheckpointError
    from qtune.pipeline.errors import PipelineError, one_line
    from qtune.pipeline.inspect import InspectError
    from qtune.pipeline.lock import OutputLockedError
    from qtune.pipeline.report_job import ReportError
    from qtune.pipeline.verify import VerifyError
    from qtune.pipeline.watch import WatchError
    from qtune.stages.ingest import InputError
    from qtune.stages.score import ScoringSetupError
    from qtune.stages.tokenize import TokenizerSetupError
    from qtune.storage import StorageError

    expected = (
        StorageError,
        PipelineError,
        InputError,
        ScoringSetupError,
        TokenizerSetupError,
        CheckpointError,
        WatchError,
        OutputLockedError,
        VerifyError,
        ReportError,
        InspectError,
    )
    try:
        return job()
    except Exception as e:
        known = _known_error(e, (ConfigError, *expected))
        if known is not None:
            raise _fail(str(known), code=2 if isinstance(known, ConfigError) else 1) from None
        os_error = _known_error(e, (OSError,))
        if os_error is not None:
            logging.getLogger(__name__).debug("unexplained OS error", exc_info=os_error)
            raise _fail(one_line(os_error)) from None
        raise


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_score_summary(summary: ScoreSummary) -> None:
    ppl = math.exp(summary.mean_nll) if summary.scored else float("nan")
    console.print(
        _table(
            "qtune score",
            [
                ("input rows", f"{summary.rows:,}"),
                ("scored samples", f"{summary.scored:,}"),
                ("rejected rows", f"{summary.rejected:,}"),
                ("truncated samples", f"{summary.truncated:,}"),
                ("tokens scored", f"{summary.tokens:,}"),
                ("response tokens", f"{summary.response_tokens:,}"),
                ("wall time", f"{summary.seconds:,.1f} s"),
                ("tokens/s (end to end)", f"{summary.tokens_per_second:,.0f}"),
                ("mean sample PPL (geometric)", f"{ppl:.3f}"),
                ("mean sample entropy (nats)", f"{summary.mean_entropy:.3f}"),
                ("backend", summary.backend),
                (
                    "partitions (resumed)",
                    f"{summary.partitions:,} ({summary.resumed_partitions:,})",
                ),
            ],
        )
    )
    if summary.reused:
        console.print(f"re-used the complete scored cache {summary.scores_dir} (nothing scored)")
    if summary.limit:
        console.print(_partial_notice(summary.limit))
    for unreadable in summary.unreadable_sources:
        err_console.print(
            f"[yellow]unreadable input skipped:[/yellow] {escape(unreadable['error'])}",
            highlight=False,
            soft_wrap=True,
        )
    _print_skipped_inputs(summary.skipped_inputs)
    for warning in (summary.extra.get("checkpoint") or {}).get("warnings") or []:
        err_console.print(
            f"[yellow]checkpoint:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True
        )
    if summary.reasons:
        reasons = Table(title="rejects by reason", title_justify="left")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, count in summary.reasons.items():
            reasons.add_row(reason, f"{count:,}")
        console.print(reasons)
    console.print(f"scored cache: {summary.scores_dir}")
    console.print(f"rejects:      {summary.rejects_dir}")


def print_triage_summary(summary: TriageSummary) -> None:
    quadrants = Table(title=f"EU plane, epoch {summary.epoch:03d}", title_justify="left")
    for column in (
        "",
        "samples",
        "share",
        "kept",
        "filled",
        "mean PPL",
        "mean entropy",
        "loss tokens",
        "kept loss tokens",
    ):
        quadrants.add_column(column, justify="left" if not column else "right")
    for name, q in summary.quadrants.items():
        quadrants.add_row(
            f"{name} {q['name']}",
            f"{q['samples']:,}",
            f"{q['share']:.0%}",
            f"{q['kept']:,}",
            f"{q['filled']:,}",
            "-" if q["mean_ppl"] is None else f"{q['mean_ppl']:.4g}",
            "-" if q["mean_entropy"] is None else f"{q['mean_entropy']:.4g}",
            f"{q['response_tokens']:,}",
            f"{q['kept_loss_tokens']:,}",
        )
    console.print(quadrants)
    t = summary.thresholds
    if "a" in t:
        console.print(
            f"thresholds (a = {t['a']:.4f}): Q2 = PPL > {t['ppl_high']:.4g} and entropy <= "
            f"{t['entropy_low']:.4g}; Q4 = PPL <= {t['ppl_low']:.4g} and entropy > "
            f"{t['entropy_high']:.4g}; medians PPL {t['ppl_median']:.4g}, entropy "
            f"{t['entropy_median']:.4g}",
            highlight=False,
        )
    elif "a_mean" in t:
        console.print(
            f"thresholds: {t['batches']:,} pseudo mini-batches, mean a = {t['a_mean']:.4f}"
        )
    elif t.get("scope") == "group":
        small = t.get("small_groups", [])
        console.print(
            f"thresholds: one triage per group ({len(t['groups']):,} groups"
            + (f", {len(small)} too small to triage: kept by the support score" if small else "")
            + ")",
            highlight=False,
        )
    share = summary.kept_loss_tokens / summary.response_tokens if summary.response_tokens else 0
    console.print(
        _table(
            f"qtune triage ({summary.policy})",
            [
                ("input rows", f"{summary.input_rows:,}"),
                ("kept samples", f"{summary.kept:,} ({summary.kept / summary.scored:.1%})"),
                ("dropped samples", f"{summary.dropped:,}"),
                ("rejected rows", f"{summary.rejected:,}"),
                ("kept loss tokens", f"{summary.kept_loss_tokens:,} ({share:.1%} of all)"),
                *_signal_rows(summary.signals),
                ("shards", f"{summary.files}"),
                ("triage time", f"{summary.seconds:,.1f} s"),
            ],
        )
    )
    if summary.per_source:
        print_accounting(summary.per_source)
    if len(summary.coverage.get("groups", {})) > 1:
        print_coverage(summary.coverage, summary.thresholds)
    if summary.migration:
        print_migration(summary.migration)
    for warning in summary.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True)
    if summary.limit:
        console.print(_partial_notice(summary.limit))
    console.print(f"published: {summary.version_dir}")
    console.print("load it with:")
    if storage.is_remote(summary.output_dir):
        # datasets would need the protocol's fsspec package and storage_options; qtune's loader
        # fetches the version into the working copy with the filesystem qtune already uses.
        console.print("  from qtune.pipeline.consume import load_version", highlight=False)
        console.print(f'  train = load_version("{summary.output_dir}")', highlight=False)
    else:
        console.print("  from datasets import load_dataset", highlight=False)
        console.print(f'  train = load_dataset("{summary.output_dir}")["train"]', highlight=False)


def _signal_rows(signals: dict) -> list[tuple[str, str]]:
    """Summary rows: kept samples that barely carry a loss, and the extreme-PPL tail's share."""
    if not signals:
        return []
    tail = signals["ppl_tail"]
    return [
        (
            "kept with <= 1 loss token",
            f"{signals['at_most_one_loss_token']:,} "
            f"({signals['at_most_one_loss_token_share']:.1%})",
        ),
        (
            f"kept from the top {1 - tail['quantile']:.0%} PPL",
            f"{tail['kept_share']:.1%} of kept (input: {tail['input_share']:.1%})",
        ),
    ]


def _partial_notice(limit: int) -> str:
    return (
        f"[yellow]PARTIAL RUN:[/yellow] only the first {limit:,} input rows (--limit); the "
        "results are for checking a config, not for training"
    )


def print_stage_timings(stages: list[dict]) -> None:
    """The final per-stage table: wall time, rows, rows/s."""
    table = Table(title="stage timings", title_justify="left")
    table.add_column("stage")
    for column in ("wall time", "rows", "rows/s"):
        table.add_column(column, justify="right")
    for stage in stages:
        rows, rate = stage.get("rows"), stage.get("rows_per_second")
        table.add_row(
            stage["stage"],
            f"{stage['seconds']:,.2f} s",
            "-" if rows is None else f"{rows:,}",
            "-" if rate is None else f"{rate:,.0f}",
        )
    console.print(table)


def print_summaries(score_summary: ScoreSummary, triage_summary: TriageSummary) -> None:
    print_score_summary(score_summary)
    print_triage_summary(triage_summary)


def print_accounting(per_source: dict[str, dict[str, int]]) -> None:
    """Every input file's rows: kept + dropped + rejected must equal its input rows."""
    table = Table(title="row accounting per input file", title_justify="left")
    table.add_column("source")
    for column in ("input rows", "kept", "dropped", "rejected", "adds up"):
        table.add_column(column, justify="right")
    for source, c in per_source.items():
        adds_up = c["kept"] + c["dropped"] + c["rejected"] == c["input_rows"]
        table.add_row(
            source,
            f"{c['input_rows']:,}",
            f"{c['kept']:,}",
            f"{c['dropped']:,}",
            f"{c['rejected']:,}",
            "yes" if adds_up else "[red]NO[/red]",
        )
    console.print(table)


def print_coverage(coverage: dict, thresholds: dict) -> None:
    """Per group: input share against kept share (the check that no part of a mix starves)."""
    per_group = thresholds.get("groups", {})
    table = Table(title=f"coverage by {coverage['group_by']}", title_justify="left")
    table.add_column("group")
    for column in ("samples", "input share", "K_g", "kept", "kept share", "kept loss tokens", ""):
        table.add_column(column, justify="right")
    for name, g in coverage["groups"].items():
        plan = per_group.get(name, {})
        k = "-" if not plan else f"{plan['k']:,}" + (" (small)" if plan.get("small") else "")
        table.add_row(
            Path(name).name if coverage["group_by"] == "file" else name,
            f"{g['input_samples']:,}",
            f"{g['input_share']:.1%}",
            k,
            f"{g['kept_samples']:,}",
            f"{g['kept_share']:.1%}",
            f"{g['kept_loss_tokens']:,}",
            "[red]under-covered[/red]" if g["under_covered"] else "",
        )
    console.print(table)


def print_migration(migration: dict) -> None:
    table = Table(
        title=f"quadrant migration since {migration['parent']} (rows: before, columns: now)",
        title_justify="left",
    )
    table.add_column("")
    quadrants = list(migration["matrix"])
    for q in quadrants:
        table.add_column(q, justify="right")
    for q, row in migration["matrix"].items():
        table.add_row(q, *(f"{row[r]:,}" for r in quadrants))
    console.print(table)
    console.print(
        f"{migration['quadrant_changed']:,} of {migration['matched']:,} samples changed quadrant; "
        f"{migration['kept_to_dropped']:,} kept -> dropped, "
        f"{migration['dropped_to_kept']:,} dropped -> kept",
        highlight=False,
    )


@app.command()
def score(
    config: ConfigArg,
    set_: SetOpt = None,
    restart: RestartOpt = False,
    limit: LimitOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Score the corpus: per-token log-prob and entropy into <output.dir>/scores/epoch_000.

    Re-running after a crash resumes; a complete cache for the same input, model and settings
    is re-used."""
    from qtune.pipeline.score_job import run_score

    _setup_logging(verbose)
    cfg = _load_for_writing(config, set_)
    summary = _guard(lambda: run_score(cfg, restart=restart, limit=limit))
    print_score_summary(summary)
    print_stage_timings(summary.stages)


@app.command()
def triage(
    config: ConfigArg,
    set_: SetOpt = None,
    out: Annotated[
        str | None,
        typer.Option(
            help="Publish into this directory (or URI) instead of output.dir (for sweeps)."
        ),
    ] = None,
    epoch: Annotated[
        int | None, typer.Option(help="Scored epoch to triage (default: the newest).")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Re-triage an existing scored cache (new ratios or policy) without re-scoring."""
    from qtune.pipeline.triage_job import run_triage

    _setup_logging(verbose)
    cfg = _load_for_writing(config, set_, out)
    logging.getLogger(__name__).info(
        "re-using the scored cache of %s (no re-scoring)", storage.without_query(cfg.output.dir)
    )
    print_triage_summary(_guard(lambda: run_triage(cfg, epoch=epoch, out_dir=out)))


def _run(cfg: QTuneConfig, restart: bool = False, limit: int | None = None) -> None:
    from qtune.pipeline.lock import OutputLock
    from qtune.pipeline.remote_sync import output_layout
    from qtune.pipeline.score_job import run_score
    from qtune.pipeline.triage_job import run_triage

    def job() -> tuple[ScoreSummary, TriageSummary]:
        # One lock over both steps: no other writer can slip in between scoring and triage.
        layout = output_layout(cfg.output.dir, cfg.output.work_dir, pull=False)
        with OutputLock(layout.lock_file, "qtune run"):
            score_summary = run_score(cfg, restart=restart, limit=limit)
            print_score_summary(score_summary)  # before triage starts
            summary = run_triage(cfg, epoch=0)
        print_triage_summary(summary)
        return score_summary, summary

    score_summary, summary = _guard(job)
    stages = summary.stages
    if score_summary.reused:  # the cache's own stages describe an earlier run
        stages = [{"stage": "score (complete cache re-used)", "seconds": 0.0}] + [
            s for s in stages if s not in score_summary.stages
        ]
    _report_after(cfg, summary, stages)


def _report_after(
    cfg: QTuneConfig, summary: TriageSummary, stages: list[dict] | None = None
) -> None:
    """The version's report (unless output.report is off), then the stage timings."""
    stages = list(summary.stages if stages is None else stages)
    index = None
    if cfg.output.report:
        from qtune.pipeline.remote_sync import output_layout
        from qtune.pipeline.report_job import write_report

        # The configured working copy (a remote output's default one may differ).
        work_dir = cfg.output.work_dir if summary.output_dir == cfg.output.dir else None
        layout = output_layout(summary.output_dir, work_dir, pull=False)
        started = time.perf_counter()
        index = _guard(lambda: write_report(layout, summary.epoch))
        stages.append({"stage": "report", "seconds": time.perf_counter() - started})
    print_stage_timings(stages)
    if index is not None:
        console.print(f"report: {index}")  # last: the one thing to open next


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    restart: RestartOpt = False,
    limit: LimitOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Score the corpus, then triage, prune tokens and publish epoch_000.

    Re-running the same command after a crash resumes where it stopped."""
    _setup_logging(verbose)
    _run(_load_for_writing(config, set_), restart, limit)


# str, not Path: a URI (s3://bucket/run) would lose a slash to Path.
OutputDirArg = Annotated[
    str, typer.Argument(help="An output directory (or URI) qtune published into.")
]
EpochOpt = Annotated[int | None, typer.Option(help="Version to use (default: the one in LATEST).")]


@app.command()
def report(output_dir: OutputDirArg, epoch: EpochOpt = None, verbose: VerboseOpt = False) -> None:
    """Write a version's report: EU plane, quadrants, pruning, sources, migration, examples."""
    from qtune.pipeline.report_job import write_report

    _setup_logging(verbose)
    console.print(f"report: {_guard(lambda: write_report(output_dir, epoch))}")


@app.command()
def inspect(
    output_dir: OutputDirArg,
    sample_id: Annotated[
        list[str] | None, typer.Option("--sample-id", help="Sample(s) to show (repeatable).")
    ] = None,
    quadrant: Annotated[
        str | None, typer.Option(help="Show samples of this quadrant: Q1, Q2, Q3 or Q4.")
    ] = None,
    kept: Annotated[
        bool | None, typer.Option("--kept/--dropped", help="Only kept, or only dropped, samples.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many samples to show.")] = 5,
    epoch: EpochOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Print samples with their scores: response tokens shaded, pruned tokens struck through."""
    from qtune.pipeline.inspect import find_samples, render_sample

    _setup_logging(verbose)
    views = _guard(
        lambda: find_samples(
            output_dir, epoch, sample_ids=sample_id, quadrant=quadrant, limit=limit, kept=kept
        )
    )
    if not views:
        raise _fail("no sample matches")
    for view in views:
        console.print(render_sample(view))


@app.command()
def verify(
    output_dir: OutputDirArg,
    epoch: Annotated[
        int | None, typer.Option(help="Version to check (default: the one in LATEST).")
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Re-derive the loss mask of every kept row from the input (default: a sample "
            "of 256).",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Re-check a published version: checksums, schema, masks (re-derived from the input with
    the tokenizer and chat template), token budget, counts."""
    from qtune.pipeline.verify import verify_version

    _setup_logging(verbose)
    report = _guard(lambda: verify_version(output_dir, epoch, full=full))
    checked = ", ".join(f"{v:,} {k}" for k, v in report.checks.items())
    for note in report.notes:
        err_console.print(f"[yellow]note:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    if report.ok:
        console.print(f"[green]ok[/green] {report.version_dir}: {checked}", highlight=False)
        return
    for problem in report.problems:
        err_console.print(f"[red]problem:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    raise _fail(f"{len(report.problems)} problem(s) in {report.version_dir}")


@app.command()
def rescore(
    config: ConfigArg,
    model: Annotated[
        Path,
        typer.Option(
            "--model", help="Checkpoint: model dir, Trainer checkpoint-* dir, or LoRA adapter."
        ),
    ],
    epoch: Annotated[
        int | None, typer.Option(help="Epoch to publish (default: the next one).")
    ] = None,
    set_: SetOpt = None,
    restart: RestartOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Re-score the corpus with a checkpoint, triage, and publish the next epoch's version."""
    from qtune.pipeline.rescore_job import run_rescore

    _setup_logging(verbose)
    cfg = _load_for_writing(config, set_)
    score_summary, triage_summary = _guard(lambda: run_rescore(cfg, model, epoch, restart=restart))
    print_summaries(score_summary, triage_summary)
    _report_after(cfg, triage_summary)


@app.command()
def watch(
    config: ConfigArg,
    checkpoints: Annotated[
        Path, typer.Option(help="A training run's output dir with checkpoint-<step> dirs.")
    ],
    poll: Annotated[float, typer.Option(help="Seconds between scans.")] = 30.0,
    state: Annotated[
        Path | None, typer.Option(help="State file (default: <output.dir>/.watch/state.json).")
    ] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Re-score each new complete checkpoint of a training run, in order, once each."""
    from qtune.pipeline.remote_sync import output_layout
    from qtune.pipeline.rescore_job import checkpoint_fingerprint, published_epoch_of, run_rescore
    from qtune.pipeline.score_job import init_ray
    from qtune.pipeline.watch import default_state_file, watch_main

    _setup_logging(verbose)
    cfg = _load_for_writing(config, set_)

    def rescore_checkpoint(checkpoint: Path) -> int:
        score_summary, triage_summary = run_rescore(cfg, checkpoint)
        print_summaries(score_summary, triage_summary)
        _report_after(cfg, triage_summary)
        return triage_summary.epoch

    # A complete checkpoint does not change: fingerprint it once, not once per question.
    @functools.cache
    def fingerprint(checkpoint: Path) -> str:
        return checkpoint_fingerprint(cfg, checkpoint)

    def already_published(checkpoint: Path) -> int | None:
        return published_epoch_of(cfg, fingerprint(checkpoint))

    # Connect to Ray once, before the watcher installs its signal handlers: ray.init replaces
    # the process's SIGTERM handler, and re-connecting per checkpoint would cost seconds each.
    init_ray(cfg)
    code = _guard(
        lambda: watch_main(
            checkpoints,
            state or default_state_file(output_layout(cfg.output.dir, cfg.output.work_dir, False)),
            rescore_checkpoint,
            already_published=already_published,
            fingerprint=fingerprint,
            poll_seconds=poll,
        )
    )
    raise typer.Exit(code)


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="Demo config.")] = Path("configs/demo.yaml"),
    set_: SetOpt = None,
    limit: LimitOpt = None,
    restart: RestartOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Build the demo corpus and tiny model (cached), then run the main job on embedded Ray."""
    from qtune.demo.assets import prepare_demo

    _setup_logging(verbose)
    cfg = _load_for_writing(config, set_)
    if isinstance(cfg.input.path, list):
        raise _fail("the demo config must name one input directory")
    corpus_dir, model_dir = Path(cfg.input.path), Path(cfg.model.path)
    for name, directory in (("input.path", corpus_dir), ("model.path", model_dir)):
        _check_demo_asset_dir(name, directory)
    prepare_demo(corpus_dir=corpus_dir, model_dir=model_dir)
    stale = _demo_output_predates_assets(cfg, corpus_dir, model_dir)
    if stale and not restart:
        # A newer demo recipe rebuilt the corpus and model after this output was written: it is
        # another corpus's, and `run` would refuse it. --restart removes only qtune's own files.
        logging.getLogger(__name__).info(
            "%s was written from earlier demo assets: restarting the demo run", cfg.output.dir
        )
    _run(cfg, restart=restart or stale, limit=limit)


def _demo_output_predates_assets(cfg: QTuneConfig, corpus_dir: Path, model_dir: Path) -> bool:
    """Whether the demo's (local) output was scored before its assets were last built."""
    from qtune.demo.assets import STAMP
    from qtune.pipeline.layout import OutputLayout

    if storage.is_remote(cfg.output.dir):
        return False
    summary = OutputLayout(Path(cfg.output.dir)).score_summary(0)
    if not summary.is_file():
        return False
    stamps = [d / STAMP for d in (corpus_dir, model_dir) if (d / STAMP).is_file()]
    return any(s.stat().st_mtime > summary.stat().st_mtime for s in stamps)


def _check_demo_asset_dir(name: str, directory: Path) -> None:
    """``qtune demo`` (re)builds its corpus and model in these directories, replacing them:
    refuse one that holds files the demo did not write (its stamp file marks its own)."""
    from qtune.demo.assets import STAMP

    if not directory.exists():
        return
    if not directory.is_dir():
        raise _fail(f"{name} {directory} is a file; the demo writes a directory there", code=2)
    if any(directory.iterdir()) and not (directory / STAMP).is_file():
        raise _fail(
            f"{name} {directory} holds files the demo did not write (no {STAMP}); the demo "
            f"replaces that directory: point {name} at a new directory for the demo",
            code=2,
        )


@app.command("demo-loop")
def demo_loop(
    config: Annotated[Path, typer.Option(help="Demo config.")] = Path("configs/demo.yaml"),
    out: Annotated[Path, typer.Option(help="Where the arms publish.")] = Path("out/demo-loop"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per arm.")] = 3,
    arms: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of the arms (qtuning is always run)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train the demo model for N epochs on qtune's shards, re-scoring between epochs; compare
    qtuning and its variants with random selection at the same sample and loss-token budget and
    with full data: held-out loss and answer accuracy, and where the planted noise went."""
    from qtune.demo.loop import PLOT, RESULTS, run_demo_loop

    _setup_logging(verbose)
    _check_demo_loop_out(out)
    chosen = _parse_arms(arms)
    results = _guard(lambda: run_demo_loop(config, out, epochs, chosen))
    print_demo_loop(results)
    console.print(f"results: {out / RESULTS} and {out / PLOT}")


def _parse_arms(arms: str | None) -> tuple[str, ...]:
    from qtune.pipeline.compare import ARMS

    if not arms:
        return ARMS
    names = {a.strip() for a in arms.split(",") if a.strip()} | {"qtuning"}
    unknown = sorted(names - set(ARMS))
    if unknown:
        raise _fail(f"--arms: unknown {', '.join(unknown)}; valid: {', '.join(ARMS)}", 2)
    return tuple(a for a in ARMS if a in names)


@app.command()
def compare(
    config: ConfigArg,
    out: Annotated[Path, typer.Option(help="Where the comparison writes (resumable).")] = Path(
        "out/compare"
    ),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per arm.")] = 3,
    holdout: Annotated[
        float, typer.Option(min=0.0, max=0.5, help="Share of the corpus held out for eval.")
    ] = 0.02,
    eval_file: Annotated[
        str | None,
        typer.Option("--eval", help="Held-out rows from this file instead of --holdout."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Use only the corpus' first N usable rows.")
    ] = None,
    proxy_model: Annotated[
        str | None,
        typer.Option(help="A smaller model with the same tokenizer, scored and trained instead."),
    ] = None,
    arms: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of the arms (qtuning is always run)."),
    ] = None,
    learning_rate: Annotated[float, typer.Option(help="Trainer learning rate.")] = 1e-5,
    batch_size: Annotated[int, typer.Option(min=1, help="Trainer batch size per device.")] = 8,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest generated answer when judging accuracy.")
    ] = 256,
    set_: SetOpt = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard an earlier comparison in --out.")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Does pruning help on this corpus and model? Train qtuning, its variants, random selection
    at the same sample and loss-token budget, and full data for N epochs each (re-scoring
    between epochs), then compare held-out loss and, where eval rows carry an `answer` field,
    exact-match accuracy. Resumes per arm and epoch."""
    from qtune.pipeline.compare import PLOT, RESULTS, TrainSettings, run_compare

    _setup_logging(verbose)
    _load(config, set_)  # a config error is a clean message before anything starts
    chosen = _parse_arms(arms)

    def show_plan(plan: dict) -> None:
        console.print(
            _table(
                "qtune compare: plan",
                [
                    ("training rows", f"{plan['train_rows']:,}"),
                    ("held-out rows", f"{plan['eval_rows']:,} ({plan['judged_rows']:,} judged)"),
                    ("rejected rows", f"{plan['rejected_rows']:,}"),
                    ("arms × epochs", f"{len(plan['arms'])} × {plan['epochs']}"),
                    ("scoring passes", f"{plan['scoring_passes']} ({plan['scored_samples']:,})"),
                    ("trained samples (at most)", f"{plan['trained_samples']:,}"),
                ],
            )
        )

    results = _guard(
        lambda: run_compare(
            config,
            out,
            epochs=epochs,
            arms=chosen,
            holdout=holdout,
            eval_file=eval_file,
            limit=limit,
            proxy_model=proxy_model,
            train=TrainSettings(learning_rate=learning_rate, batch_size=batch_size),
            max_new_tokens=max_new_tokens,
            restart=restart,
            overrides=list(set_ or []),
            on_plan=show_plan,
        )
    )
    print_demo_loop(results)
    console.print(f"results: {out / RESULTS} and {out / PLOT}")


def print_demo_loop(results: list) -> None:
    """Per arm and epoch: budget, losses, accuracy; per task after the last epoch; planted noise
    (the demo); the final verdict side by side."""

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    table = Table(title="every arm, every epoch", title_justify="left")
    columns = ("arm", "epoch", "samples", "loss tokens", "train loss", "held-out loss",
               "accuracy", "top-5% PPL")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right", no_wrap=True)
    for result in results:
        for e in result.epochs:
            table.add_row(
                result.arm,
                str(e.epoch),
                f"{e.kept_samples:,}",
                f"{e.kept_loss_tokens:,}",
                f"{e.train_loss:.4f}",
                f"{e.heldout_loss:.4f}",
                pct(e.accuracy),
                pct(e.ppl_tail.get("kept_share")),
            )
    console.print(table)
    tasks = sorted({t for r in results for t in r.epochs[-1].heldout_loss_by_task})
    if tasks:
        by_task = Table(
            title="after the last epoch, by task: held-out loss / accuracy", title_justify="left"
        )
        by_task.add_column("arm", no_wrap=True)
        for task in tasks:
            by_task.add_column(task, justify="right")
        for result in results:
            last = result.epochs[-1]
            by_task.add_row(
                result.arm,
                *(
                    f"{last.heldout_loss_by_task.get(t, float('nan')):.2f} / "
                    + (
                        "-"
                        if last.accuracy_by_task.get(t) is None
                        else f"{last.accuracy_by_task[t]:.0%}"
                    )
                    for t in tasks
                ),
            )
        console.print(by_task)
    kinds = sorted({k for r in results for k in r.epochs[-1].noise})
    if kinds:
        noise = Table(
            title="planted noise in the last version trained on: kept share (input share)",
            title_justify="left",
        )
        noise.add_column("arm")
        for kind in kinds:
            noise.add_column(kind.replace("_", " "), justify="right")
        for result in results:
            routing = result.epochs[-1].noise
            noise.add_row(
                result.arm,
                *(
                    f"{routing[k]['kept_share']:.1%} ({routing[k]['input_share']:.1%})"
                    if k in routing
                    else "-"
                    for k in kinds
                ),
            )
        console.print(noise)
    final = Table(title="after the last epoch", title_justify="left")
    for column in ("arm", "held-out loss", "accuracy", "loss tokens", "samples"):
        final.add_column(column, justify="left" if column == "arm" else "right", no_wrap=True)
    for result in results:
        last = result.epochs[-1]
        final.add_row(
            result.arm,
            f"{last.heldout_loss:.4f}",
            pct(last.accuracy),
            f"{last.kept_loss_tokens:,}",
            f"{last.kept_samples:,}",
        )
    console.print(final)


def _check_demo_loop_out(out: Path) -> None:
    """The demo loop deletes ``out`` before it starts: only an earlier demo loop's output (its
    arms' folders and results) may be there."""
    from qtune.pipeline.compare import ARMS, PLOT, RESULTS

    resolved = out.resolve()
    if resolved in (Path("/"), Path.cwd().resolve(), Path.home().resolve()):
        raise _fail(f"--out {out} is {resolved}: the demo loop needs a directory of its own", 2)
    if resolved.exists() and not resolved.is_dir():
        raise _fail(f"--out {out} is a file; the demo loop writes a directory there", code=2)
    if resolved.is_dir():
        own = {*ARMS, RESULTS, PLOT}
        foreign = sorted(p.name for p in resolved.iterdir() if p.name not in own)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise _fail(
                f"--out {out} holds files an earlier demo loop did not write ({shown}); the "
                "demo loop replaces that directory: choose a new one",
                code=2,
            )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
