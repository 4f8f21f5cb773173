"""The ``qtune`` command line."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from qtune.pipeline.config import ConfigError, QTuneConfig, load_config

if TYPE_CHECKING:
    from qtune.pipeline.score_job import ScoreSummary

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Q-Tuning data curation for SFT: score, triage on the Error-Uncertainty plane, publish.",
)
console = Console(stderr=False)
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable)."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


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
        err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _run_score(cfg: QTuneConfig) -> None:
    from qtune.pipeline.score_job import PipelineError, run_score
    from qtune.stages.ingest import InputError
    from qtune.stages.score import ScoringSetupError
    from qtune.stages.tokenize import TokenizerSetupError

    try:
        summary = run_score(cfg)
    except (PipelineError, InputError, ScoringSetupError, TokenizerSetupError) as e:
        raise _fail(str(e)) from None
    except Exception as e:
        cause = _root_cause(e)
        if isinstance(cause, InputError | ScoringSetupError | TokenizerSetupError):
            raise _fail(str(cause)) from None
        raise
    print_score_summary(summary)


def _root_cause(error: BaseException) -> BaseException:
    # Ray wraps a stage's exception (RayTaskError -> cause); report the stage's own message.
    seen = error
    while getattr(seen, "cause", None) is not None or seen.__cause__ is not None:
        seen = getattr(seen, "cause", None) or seen.__cause__
    return seen


def print_score_summary(summary: ScoreSummary) -> None:
    table = Table(title="qtune score", show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    ppl = math.exp(summary.mean_nll) if summary.scored else float("nan")
    for name, value in [
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
    ]:
        table.add_row(name, value)
    console.print(table)
    if summary.reasons:
        reasons = Table(title="rejects by reason", title_justify="left")
        reasons.add_column("reason")
        reasons.add_column("rows", justify="right")
        for reason, count in summary.reasons.items():
            reasons.add_row(reason, f"{count:,}")
        console.print(reasons)
    console.print(f"scored cache: {summary.scores_dir}")
    console.print(f"rejects:      {summary.rejects_dir}")


@app.command()
def score(config: ConfigArg, set_: SetOpt = None, verbose: VerboseOpt = False) -> None:
    """Score the corpus: per-token log-prob and entropy into <output.dir>/scores/epoch_000."""
    _setup_logging(verbose)
    _run_score(_load(config, set_))


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="Demo config.")] = Path("configs/demo.yaml"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Build the demo corpus and tiny model (cached), then run the main job on embedded Ray."""
    from qtune.demo.assets import prepare_demo

    _setup_logging(verbose)
    cfg = _load(config, set_)
    prepare_demo(corpus_dir=Path(_single_path(cfg.input.path)), model_dir=Path(cfg.model.path))
    _run_score(cfg)


def _single_path(path: str | list[str]) -> str:
    if isinstance(path, list):
        raise _fail("the demo config must name one input directory")
    return path


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
