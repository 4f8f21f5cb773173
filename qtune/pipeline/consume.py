"""Consuming published versions from a trainer: load one, follow LATEST, re-score between epochs.

- :func:`load_version`: one version's train split as a ``datasets.Dataset`` (LATEST by default).
- :class:`LatestVersionDataset`: a ``torch`` ``IterableDataset`` for ``transformers.Trainer`` that
  re-reads ``<out>/LATEST`` in ``set_epoch``, so a running trainer trains each epoch on the newest
  version without restarting. It streams the version's Parquet shards with pyarrow.
- :class:`RescoreCallback`: a ``TrainerCallback`` that, at the end of every epoch but the last,
  makes the Trainer save a checkpoint, re-scores it with ``qtune rescore`` (a subprocess or a Ray
  job) and waits until LATEST names the next version.

How ``transformers`` 5.19 drives an ``IterableDataset`` (read in ``trainer.py`` and accelerate 1.15
``data_loader.py``):

- ``Trainer._run_epoch`` calls ``train_dataloader.set_epoch(epoch)`` at the start of every epoch,
  before ``iter(train_dataloader)``; the loader is accelerate's ``DataLoaderShard`` or
  ``DataLoaderDispatcher``, whose ``set_epoch`` calls ``dataset.set_epoch(epoch)`` on every
  process (through accelerate's ``IterableDatasetShard`` when it wraps the dataset); the
  loader's ``__iter__`` then calls ``set_epoch`` once more with the same number. Epoch ``e``
  starts after epoch ``e - 1``'s ``on_epoch_end`` and its checkpoint save (``on_save``), so a
  version published by :class:`RescoreCallback` is the one ``set_epoch(e)`` finds.
- Without ``__len__``, Trainer needs ``max_steps`` and runs "epochs" until that many optimizer
  steps: an epoch ends when the dataset is exhausted (:func:`steps_per_epoch` gives the count).
- With several processes accelerate splits an ``IterableDataset`` itself: by default process 0
  iterates it and dispatches slices of each batch (``dispatch_batches``, which needs equal-width
  batches), or, with ``accelerator_config={"dispatch_batches": False}``, every process iterates it
  in the same order and keeps its slice of each global batch. Either way the dataset must yield the
  whole version on every process: leave ``rank``/``world_size`` unset under Trainer (they are for
  loops that shard the data themselves), and keep ``dataloader_persistent_workers`` off (persistent
  workers keep the copy of the dataset they started with and never see a new version).
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import TrainerCallback

from qtune import schema, storage
from qtune.pipeline.layout import epoch_name
from qtune.pipeline.publish import latest_epoch, published_epochs, read_manifest
from qtune.pipeline.remote_sync import CONSUMED, output_layout, read_latest

if TYPE_CHECKING:
    import datasets
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

#: What every row yields: the inputs ``DataCollatorForSeq2Seq`` pads (labels with -100).
TRAIN_COLUMNS: tuple[str, ...] = (schema.INPUT_IDS, schema.ATTENTION_MASK, schema.LABELS)
CommandFactory = Callable[[Path, int], list[str]]
_EPOCH = re.compile(r"^(?:epoch_)?(\d+)$")
_LOG_TAIL_LINES = 30
_SETTLE_S = 60.0  # after a successful re-score, how long LATEST may lag (shared filesystems)


class VersionNotFoundError(FileNotFoundError):
    """The asked version (or any version) is not published in the output directory."""


class RescoreError(RuntimeError):
    """A re-score failed, timed out, or did not move LATEST to the expected version."""


# --- versions -----------------------------------------------------------------------------------


def _parse_epoch(epoch: int | str) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int | str):
        raise TypeError(f"epoch must be an int or 'epoch_NNN'; got {epoch!r}")
    if isinstance(epoch, int):
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        return epoch
    match = _EPOCH.match(epoch.strip())
    if not match:
        raise ValueError(f"epoch must be an int or 'epoch_NNN'; got {epoch!r}")
    return int(match.group(1))


def resolve_epoch(out_dir: str | Path, epoch: int | str | None = None) -> int:
    """The published epoch ``epoch`` names (``None``: the one LATEST names), checked to exist.

    Raises :class:`VersionNotFoundError` listing the published epochs.
    """
    layout = output_layout(out_dir, only=CONSUMED)
    published = published_epochs(layout)
    wanted = latest_epoch(layout) if epoch is None else _parse_epoch(epoch)
    if wanted is None:
        raise VersionNotFoundError(
            f"no published version in {layout.name} (no data/epoch_NNN/manifest.json); "
            "run `qtune run` first"
        )
    if wanted not in published:
        listed = ", ".join(epoch_name(e) for e in published) or "none"
        what = f"LATEST names {epoch_name(wanted)}, which" if epoch is None else epoch_name(wanted)
        raise VersionNotFoundError(f"{what} is not published in {layout.name}; published: {listed}")
    return wanted


def version_files(out_dir: str | Path, epoch: int) -> list[tuple[Path, int]]:
    """``(path, rows)`` of each train shard of a published version, from its manifest."""
    layout = output_layout(out_dir, only=(f"data/{epoch_name(epoch)}",))
    manifest = read_manifest(layout, epoch)
    return [(layout.data_dir(epoch) / f["path"], int(f["rows"])) for f in manifest["files"]]


def _check_columns(path: Path, wanted: Sequence[str]) -> None:
    present = pq.read_schema(path).names
    missing = [c for c in wanted if c not in present]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} in {path}; present: {', '.join(present)}")


def load_version(
    out_dir: str | Path,
    epoch: int | str | None = None,
    *,
    columns: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """The train split of one published version (default: the one LATEST names).

    ``epoch`` is an int or ``"epoch_001"``. The files are the ones the version's manifest lists, so
    the result does not depend on the dataset card. ``columns`` selects columns (default: all of
    the shard schema); ``cache_dir`` is passed to ``datasets.load_dataset`` (which converts the
    shards into its Arrow cache, as ``load_dataset(out)`` does).
    """
    from datasets import load_dataset

    number = resolve_epoch(out_dir, epoch)
    files = [path for path, _ in version_files(out_dir, number)]
    if columns is not None:
        _check_columns(files[0], columns)
    return load_dataset(
        "parquet",
        data_files={"train": [str(p) for p in files]},
        split="train",
        columns=columns,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )


def steps_per_epoch(
    out_dir: str | Path,
    batch_size: int,
    world_size: int = 1,
    *,
    num_workers: int = 0,
    gradient_accumulation_steps: int = 1,
    epoch: int | str | None = None,
) -> int:
    """Optimizer steps Trainer makes in one pass over a version (default: LATEST's).

    ``batch_size`` is the per-device batch size. The count is exact for one process, and for
    several with ``accelerator_config={"dispatch_batches": False}``: each DataLoader worker batches
    its own share of the rows, accelerate completes a process's last partial batch with rows from
    the start, and a trailing group of fewer than ``gradient_accumulation_steps`` batches makes no
    optimizer step in Trainer's loop for datasets without a length. With accelerate's default
    dispatching it may differ by a step. Use ``max_steps = epochs * steps_per_epoch(...)`` (and
    ``RescoreCallback(num_epochs=...)`` to end exactly at an epoch boundary if versions differ in
    size: the count of a version published later is unknown when training starts).
    """
    if batch_size < 1 or world_size < 1 or gradient_accumulation_steps < 1 or num_workers < 0:
        raise ValueError(
            "need batch_size, world_size, gradient_accumulation_steps >= 1 and num_workers >= 0"
        )
    rows = sum(n for _, n in version_files(out_dir, resolve_epoch(out_dir, epoch)))
    workers = max(1, num_workers)
    shares = [rows * (k + 1) // workers - rows * k // workers for k in range(workers)]
    batches = sum(math.ceil(n / (batch_size * world_size)) for n in shares)
    return max(1, batches // gradient_accumulation_steps)


# --- the dataset that follows LATEST ------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """Rows ``start:stop`` of one row group: what one consumer reads of one shuffling unit."""

    path: Path
    row_group: int
    start: int
    stop: int


class LatestVersionDataset(IterableDataset):
    """Rows of the version LATEST named at the last ``set_epoch``, for ``transformers.Trainer``.

    Yields dicts with ``input_ids``, ``attention_mask``, ``labels`` (Python lists, what
    ``DataCollatorForSeq2Seq`` expects) and any extra ``columns``. The version is read when the
    dataset is built and again in every ``set_epoch(epoch)``: a version published meanwhile is used
    from the next epoch on, never in the middle of one. With ``torch.distributed`` initialised,
    rank 0 reads LATEST and broadcasts it (``set_epoch`` is then a collective call, as Trainer makes
    it on every process), so all ranks read the same version.

    Order: the row groups of all shards are permuted by ``(seed, epoch)``, laid end to end, and the
    row sequence is cut into equal contiguous ranges, one per consumer (``world_size`` parts, each
    split between the DataLoader workers of ``get_worker_info``): every row is read exactly once
    per epoch and no consumer reads a row group it does not need. Each consumer then shuffles
    windows of ``shuffle_window`` consecutive row groups (as Arrow, converted row by row as they
    are yielded). ``shuffle=False`` keeps shard and row order. The order depends on seed, epoch,
    version, world size and worker count, nothing else.

    ``rank``/``world_size``: leave unset under Trainer/accelerate, which split an
    ``IterableDataset`` across processes themselves (see the module docstring); set them in a loop
    that gives each rank its own DataLoader over this dataset.

    No ``__len__``: Trainer then requires ``max_steps`` (see :func:`steps_per_epoch`).
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        columns: Sequence[str] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if world_size is None:
            if rank not in (None, 0):
                raise ValueError(f"rank {rank} given without world_size")
            rank, world_size = 0, 1
        if world_size < 1 or rank is None or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world={world_size}")
        if seed < 0 or shuffle_window < 1:
            raise ValueError(
                f"need seed >= 0 and shuffle_window >= 1; got {seed}, {shuffle_window}"
            )
        self.out_dir = str(out_dir) if storage.is_remote(out_dir) else Path(out_dir).absolute()
        self.columns: list[str] = list(TRAIN_COLUMNS) + [
            c for c in (columns or []) if c not in TRAIN_COLUMNS
        ]
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_window = shuffle_window
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        #: ``(epoch, version)`` per epoch started with ``set_epoch``, in order.
        self.history: list[tuple[int, str]] = []
        self._version_number = resolve_epoch(self.out_dir)
        _check_columns(version_files(self.out_dir, self._version_number)[0][0], self.columns)
        logger.info("training data: %s of %s", self.version, self.out_dir)

    @property
    def version(self) -> str:
        """The version in use (``epoch_NNN``), fixed from one ``set_epoch`` to the next."""
        return epoch_name(self._version_number)

    def set_epoch(self, epoch: int) -> None:
        """Start training epoch ``epoch``: re-read LATEST (agreed across ranks) and reshuffle."""
        self.epoch = int(epoch)
        number = self._agreed_latest()
        if number != self._version_number:
            logger.info(
                "training epoch %d reads %s (was %s) of %s",
                self.epoch,
                epoch_name(number),
                self.version,
                self.out_dir,
            )
            _check_columns(version_files(self.out_dir, number)[0][0], self.columns)
            self._version_number = number
        # accelerate's loaders call set_epoch again, with the same number, as iteration starts.
        if self.history and self.history[-1][0] == self.epoch:
            self.history[-1] = (self.epoch, self.version)
        else:
            self.history.append((self.epoch, self.version))

    def _agreed_latest(self) -> int:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return resolve_epoch(self.out_dir)
        # Rank 0 decides; an error there is sent too, so that no rank waits for a missing value.
        payload: list[Any] = [None]
        if torch.distributed.get_rank() == 0:
            try:
                payload = [("ok", resolve_epoch(self.out_dir))]
            except (OSError, ValueError) as e:
                payload = [("error", f"{type(e).__name__}: {e}")]
        torch.distributed.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise VersionNotFoundError(f"rank 0 could not read LATEST: {value}")
        return int(value)

    def _plan(self, consumer: int, consumers: int) -> list[_Piece]:
        """The row-group pieces ``consumer`` of ``consumers`` reads this epoch, in order."""
        files = version_files(self.out_dir, self._version_number)
        units: list[tuple[Path, int, int]] = []
        for path, rows in files:
            meta = pq.read_metadata(path)
            if meta.num_rows != rows:
                raise RuntimeError(
                    f"{path} has {meta.num_rows} rows, its manifest says {rows}: the version was "
                    "replaced while it was being read"
                )
            units += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        order = np.arange(len(units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
        sizes = np.array([units[i][2] for i in order], dtype=np.int64)
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if len(ends) else 0
        lo, hi = total * consumer // consumers, total * (consumer + 1) // consumers
        pieces = []
        for unit, end, size in zip(order, ends.tolist(), sizes.tolist(), strict=True):
            begin = end - size
            if end <= lo or begin >= hi:
                continue
            path, group, _ = units[unit]
            pieces.append(_Piece(path, group, max(lo, begin) - begin, min(hi, end) - begin))
        return pieces

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumer = self.rank * workers + worker
        consumers = self.world_size * workers
        pieces = self._plan(consumer, consumers)
        rng = np.random.default_rng([self.seed, self.epoch, consumer, consumers])
        files: dict[Path, pq.ParquetFile] = {}
        for first in range(0, len(pieces), self.shuffle_window):
            tables = []
            for piece in pieces[first : first + self.shuffle_window]:
                if piece.path not in files:
                    files[piece.path] = pq.ParquetFile(piece.path)
                group = files[piece.path].read_row_group(piece.row_group, columns=self.columns)
                tables.append(group.slice(piece.start, piece.stop - piece.start))
            window = pa.concat_tables(tables)
            if self.shuffle:
                window = window.take(pa.array(rng.permutation(window.num_rows)))
            values = [window.column(c).to_pylist() for c in self.columns]
            for row in zip(*values, strict=True):
                yield dict(zip(self.columns, row, strict=True))


# --- re-scoring between epochs ------------------------------------------------------------------


@dataclass
class RescoreRun:
    """One re-score the callback ran (recorded by the main process only)."""

    epoch: int
    checkpoint: str
    command: list[str]
    seconds: float
    log: str | None = None  # subprocess mode: the command's output
    ray_job_id: str | None = None  # ray mode


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class RescoreCallback(TrainerCallback):
    """Re-score each epoch's checkpoint and publish the next version before the next epoch starts.

    At every epoch end except the last (max_steps reached, or ``num_epochs`` epochs done, which
    then also stops training), the callback sets ``control.should_save``; in the ``on_save`` that
    follows, the main process (``state.is_world_process_zero``) runs::

        python -m qtune.pipeline.cli rescore CONFIG --model <output_dir>/checkpoint-<step> \\
            --epoch N [--set k=v ...]

    with N the number of epochs completed in this ``train()`` call, and waits until
    ``<out>/LATEST`` names epoch N; the other processes poll LATEST. The next epoch's
    ``set_epoch`` of :class:`LatestVersionDataset` then reads version N. Training stops with
    :class:`RescoreError` if the command fails (with its last output lines), or if LATEST does not
    move within ``timeout_s``.

    ``mode="subprocess"`` runs the command locally (``sys.executable``), its output going to
    ``<output_dir>/rescore-epoch_NNN.log``. ``mode="ray"`` submits it as a Ray job
    (``JobSubmissionClient(ray_address)``, with ``python`` from the cluster's environment: config,
    checkpoint and output paths must be on storage the cluster sees) and polls its status.
    ``command_factory(checkpoint, N)`` replaces the command. ``out_dir`` defaults to the config's
    ``output.dir`` (with ``overrides`` applied). Pass ``processing_class=tokenizer`` to Trainer so
    that checkpoints carry the tokenizer the scorer loads.
    """

    def __init__(
        self,
        config: str | Path,
        out_dir: str | Path | None = None,
        *,
        overrides: Sequence[str] = (),
        mode: Literal["subprocess", "ray"] = "subprocess",
        ray_address: str | None = None,
        command_factory: CommandFactory | None = None,
        num_epochs: int | None = None,
        timeout_s: float = 24 * 3600.0,
        poll_s: float = 2.0,
    ) -> None:
        if mode not in ("subprocess", "ray"):
            raise ValueError(f"unknown mode {mode!r}; valid: subprocess, ray")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1; got {num_epochs}")
        self.config = Path(config)
        self.overrides = list(overrides)
        if out_dir is None:
            from qtune.pipeline.config import load_config

            out_dir = load_config(self.config, self.overrides).output.dir
        self.layout = output_layout(out_dir, pull=False)
        self.mode = mode
        self.ray_address = ray_address
        self.command_factory = command_factory or self.default_command
        self.num_epochs = num_epochs
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.epochs_completed = 0
        #: The re-scores this process ran, in order.
        self.runs: list[RescoreRun] = []
        self._pending: int | None = None

    def default_command(self, checkpoint: Path, epoch: int) -> list[str]:
        python = sys.executable if self.mode == "subprocess" else "python"
        command = [python, "-m", "qtune.pipeline.cli", "rescore", str(self.config.absolute())]
        command += ["--model", str(Path(checkpoint).absolute()), "--epoch", str(epoch)]
        for override in self.overrides:
            command += ["--set", override]
        return command

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.epochs_completed = 0
        self._pending = None
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        self.epochs_completed += 1
        last = control.should_training_stop or state.global_step >= state.max_steps
        if self.num_epochs is not None and self.epochs_completed >= self.num_epochs:
            control.should_training_stop = True
            last = True
        if not last:
            self._pending = self.epochs_completed
            control.should_save = True
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ):
        if self._pending is None:  # a save of another cause (save_strategy)
            return control
        epoch, self._pending = self._pending, None
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        deadline = time.monotonic() + self.timeout_s
        if state.is_world_process_zero:
            self._rescore(checkpoint, epoch, Path(args.output_dir), deadline)
        else:
            self._wait_for_latest(epoch, deadline, "the main process's re-score")
        return control

    def _rescore(self, checkpoint: Path, epoch: int, output_dir: Path, deadline: float) -> None:
        if not any((checkpoint / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
            logger.warning(
                "%s has no tokenizer files: pass processing_class=tokenizer to Trainer so the "
                "re-score can load the checkpoint on its own",
                checkpoint,
            )
        command = self.command_factory(checkpoint, epoch)
        started = time.monotonic()
        logger.info(
            "re-scoring %s to publish %s (%s): %s",
            checkpoint,
            epoch_name(epoch),
            self.mode,
            shlex.join(command),
        )
        run = RescoreRun(epoch, str(checkpoint), command, 0.0)
        if self.mode == "ray":
            run.ray_job_id = self._run_ray_job(command, epoch, deadline)
        else:
            run.log = self._run_subprocess(command, epoch, output_dir, deadline)
        settle = min(deadline, time.monotonic() + _SETTLE_S)
        self._wait_for_latest(epoch, settle, "a successful re-score", run.log)
        run.seconds = time.monotonic() - started
        self.runs.append(run)
        logger.info("%s published in %.1f s; LATEST moved", epoch_name(epoch), run.seconds)

    def _run_subprocess(
        self, command: list[str], epoch: int, output_dir: Path, deadline: float
    ) -> str:
        """Run ``command`` to completion; return the path of its log."""
        output_dir.mkdir(parents=True, exist_ok=True)
        log_path = output_dir / f"rescore-{epoch_name(epoch)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while (code := process.poll()) is None:
                if time.monotonic() > deadline:
                    raise RescoreError(
                        f"re-score for {epoch_name(epoch)} still running after {self.timeout_s:g}"
                        f" s; stopped it. Last lines of {log_path}:\n{self._log_tail(log_path)}"
                    )
                time.sleep(self.poll_s)
        finally:
            if process.poll() is None:  # timed out, or the trainer was interrupted
                process.kill()
                process.wait()
        if code != 0:
            raise RescoreError(
                f"re-score for {epoch_name(epoch)} failed (exit {code}): {shlex.join(command)}\n"
                f"last lines of {log_path}:\n{self._log_tail(log_path)}"
            )
        return str(log_path)

    @staticmethod
    def _log_tail(path: Path) -> str:
        try:
            return _tail(path.read_text(errors="replace"))
        except OSError as e:
            return f"(log unreadable: {e})"

    def _run_ray_job(self, command: list[str], epoch: int, deadline: float) -> str:
        """Submit ``command`` as a Ray job and wait for it to succeed; return the job id."""
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.ray_address)
        job_id = client.submit_job(entrypoint=shlex.join(command))
        logger.info("re-score for %s submitted as Ray job %s", epoch_name(epoch), job_id)
        while (status := client.get_job_status(job_id)) != JobStatus.SUCCEEDED:
            if status in (JobStatus.FAILED, JobStatus.STOPPED):
                raise RescoreError(
                    f"re-score for {epoch_name(epoch)}: Ray job {job_id} {status.value}: "
                    f"{shlex.join(command)}\nlast log lines:\n{_tail(client.get_job_logs(job_id))}"
                )
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise RescoreError(
                    f"re-score for {epoch_name(epoch)}: Ray job {job_id} still {status.value} "
                    f"after {self.timeout_s:g} s; stopped it.\nlast log lines:\n"
                    f"{_tail(client.get_job_logs(job_id))}"
                )
            time.sleep(self.poll_s)
        return job_id

    def _wait_for_latest(
        self, epoch: int, deadline: float, after: str, log: str | None = None
    ) -> None:
        while True:
            try:
                current = _parse_epoch(read_latest(self.layout) or "")
            except ValueError:
                current = None  # no LATEST yet, or not an epoch name
            if current is not None and current >= epoch:
                return
            if time.monotonic() > deadline:
                named = epoch_name(current) if current is not None else "nothing"
                where = f" (log: {log})" if log else ""
                raise RescoreError(
                    f"after {after}, {storage.join(self.layout.name, 'LATEST')} names {named}, not "
                    f"{epoch_name(epoch)}{where}"
                )
            time.sleep(self.poll_s)
