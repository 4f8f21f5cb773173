"""Consuming versions: load_version, LatestVersionDataset (LATEST per epoch, sharding, shuffle),
RescoreCallback (subprocess / Ray job orchestration), and a transformers.Trainer run on CPU."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader
from transformers.trainer_callback import (
    CallbackHandler,
    DefaultFlowCallback,
    TrainerControl,
    TrainerState,
)

from qtune.demo.synthetic_cache import write_synthetic_cache
from qtune.pipeline import consume
from qtune.pipeline.config import load_config
from qtune.pipeline.consume import (
    LatestVersionDataset,
    RescoreCallback,
    RescoreError,
    VersionNotFoundError,
    load_version,
    steps_per_epoch,
)
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.publish import read_manifest
from qtune.pipeline.triage_job import run_triage

SMALL = {"response_tokens": 8, "prompt_tokens": 4}


def _overrides(out: Path) -> list[str]:
    return [
        "input.path=unused.jsonl",
        "model.path=unused",
        f"output.dir={out}",
        "output.num_shards=4",
        "output.row_group_rows=4",  # several row groups per shard: the shuffling units
        "qtuning.sample_ratio=0.25",
    ]


def publish(out: Path, epoch: int, n: int = 64) -> None:
    """Publish data/epoch_NNN: n synthetic scored samples (seeded by epoch), a quarter kept."""
    write_synthetic_cache(out, n, epoch=epoch, seed=100 + epoch, **SMALL)
    run_triage(load_config(None, _overrides(out)), epoch=epoch)


def version_rows(out: Path, epoch: int) -> Counter:
    """Each row of a published version as (sample_id, input_ids), read straight from its shards."""
    table = pq.ParquetDataset(out / f"data/epoch_{epoch:03d}/train").read(
        columns=["sample_id", "input_ids"]
    )
    return Counter(
        (s, tuple(ids))
        for s, ids in zip(
            table["sample_id"].to_pylist(), table["input_ids"].to_pylist(), strict=True
        )
    )


def keys(rows) -> list[tuple]:
    return [(r["sample_id"], tuple(r["input_ids"])) for r in rows]


# Stand-in for `qtune rescore`: the real command scores the checkpoint with vLLM and publishes
# epoch N. These tests are about orchestration (when the callback triggers, which checkpoint and
# epoch it passes, how it waits for LATEST and reports failures), so a synthetic version replaces
# the scorer's output. It records what it was given in <marks>/rescore-N.json.
STANDIN = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from qtune.demo.synthetic_cache import write_synthetic_cache
    from qtune.pipeline.config import load_config
    from qtune.pipeline.triage_job import run_triage

    SMALL = __SMALL__
    out, checkpoint, epoch = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    marks, overrides = Path(sys.argv[4]), json.loads(sys.argv[5])
    files = sorted(p.name for p in checkpoint.iterdir()) if checkpoint.is_dir() else None
    print(f"stand-in re-score of {checkpoint} for epoch {epoch}")
    write_synthetic_cache(out, 64, epoch=epoch, seed=100 + epoch, **SMALL)
    run_triage(load_config(None, overrides), epoch=epoch)
    mark = {"checkpoint": str(checkpoint), "files": files}
    (marks / f"rescore-{epoch}.json").write_text(json.dumps(mark))
    """
).replace("__SMALL__", repr(SMALL))


@pytest.fixture
def standin(tmp_path):
    """command_factory for the stand-in script, and the folder where it leaves its marks."""
    script = tmp_path / "standin_rescore.py"
    script.write_text(STANDIN)
    marks = tmp_path / "marks"
    marks.mkdir()

    def factory_for(out: Path):
        def command(checkpoint: Path, epoch: int) -> list[str]:
            args = [str(out), str(checkpoint), str(epoch), str(marks), json.dumps(_overrides(out))]
            return [sys.executable, str(script), *args]

        return command

    return SimpleNamespace(factory_for=factory_for, marks=marks)


@pytest.fixture
def out(tmp_path) -> Path:
    out = tmp_path / "out"
    publish(out, 0)
    return out


# --- load_version ---------------------------------------------------------------------------------


def test_load_version_latest_given_and_missing(out, tmp_path):
    cache = tmp_path / "hf-cache"
    publish(out, 1)
    latest = load_version(out, cache_dir=cache)
    assert Counter(keys(latest)) == version_rows(out, 1)
    assert "labels" in latest.column_names and "quadrant" in latest.column_names
    for epoch in (0, "epoch_000"):
        first = load_version(out, epoch, columns=["sample_id", "input_ids"], cache_dir=cache)
        assert sorted(first.column_names) == ["input_ids", "sample_id"]
        assert Counter(keys(first)) == version_rows(out, 0)
    assert version_rows(out, 0) != version_rows(out, 1)

    with pytest.raises(VersionNotFoundError) as missing:
        load_version(out, 5)
    assert str(missing.value) == (
        f"epoch_005 is not published in {out}; published: epoch_000, epoch_001"
    )
    with pytest.raises(ValueError, match="epoch must be an int or 'epoch_NNN'"):
        load_version(out, "latest")
    with pytest.raises(ValueError, match="missing nope in .*; present: sample_id, input_ids"):
        load_version(out, 0, columns=["nope"])
    with pytest.raises(VersionNotFoundError, match="no published version in .*empty"):
        load_version(tmp_path / "empty")


# --- LatestVersionDataset -------------------------------------------------------------------------


def test_dataset_switches_version_exactly_at_set_epoch(out, caplog):
    dataset = LatestVersionDataset(out, columns=["sample_id"], seed=3)
    assert dataset.version == "epoch_000"
    assert not hasattr(dataset, "__len__")
    dataset.set_epoch(0)
    rows = iter(dataset)
    head = [next(rows) for _ in range(5)]
    publish(out, 1)  # published while epoch 0 is being read
    assert (out / "LATEST").read_text().strip() == "epoch_001"
    epoch0 = head + list(rows)
    assert Counter(keys(epoch0)) == version_rows(out, 0)  # epoch 0 finished on its version
    assert dataset.version == "epoch_000"
    row = epoch0[0]
    assert set(row) == {"input_ids", "attention_mask", "labels", "sample_id"}
    assert all(isinstance(row[k], list) for k in ("input_ids", "attention_mask", "labels"))
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
    assert -100 in row["labels"] and any(x != -100 for x in row["labels"])

    with caplog.at_level(logging.INFO, logger="qtune.pipeline.consume"):
        dataset.set_epoch(1)
    assert "training epoch 1 reads epoch_001 (was epoch_000)" in caplog.text
    assert dataset.version == "epoch_001"
    assert Counter(keys(dataset)) == version_rows(out, 1)
    assert dataset.history == [(0, "epoch_000"), (1, "epoch_001")]


def _collect(dataset, epoch: int, num_workers: int) -> list[tuple]:
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return keys(loader)


def test_ranks_and_workers_read_every_row_exactly_once_per_epoch(tmp_path):
    out = tmp_path / "out"
    publish(out, 0, n=160)
    expected = version_rows(out, 0)
    assert sum(expected.values()) == 40
    assert sum(pq.read_metadata(p).num_row_groups for p in out.glob("data/*/train/*")) >= 8
    orders = []
    for epoch in (0, 1):
        per_rank = [
            _collect(
                LatestVersionDataset(out, columns=["sample_id"], rank=r, world_size=2, seed=7),
                epoch,
                num_workers=2,
            )
            for r in (0, 1)
        ]
        assert Counter(per_rank[0] + per_rank[1]) == expected  # each row once, on one rank
        assert [len(r) for r in per_rank] == [20, 20]
        orders.append(per_rank[0] + per_rank[1])
    assert orders[0] != orders[1]  # reshuffled per epoch
    # One process, two workers: the same rows; the DataLoader yields batches as counted.
    dataset = LatestVersionDataset(out, columns=["sample_id"], seed=7)
    assert Counter(_collect(dataset, 0, num_workers=2)) == expected
    batches = list(DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list))
    assert len(batches) == steps_per_epoch(out, 4, num_workers=2) == 10
    assert steps_per_epoch(out, 4) == 10 and steps_per_epoch(out, 4, 2) == 5
    assert steps_per_epoch(out, 3, num_workers=2) == 14  # 20 rows per worker: 7 batches each
    assert steps_per_epoch(out, 4, gradient_accumulation_steps=3) == 3
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        LatestVersionDataset(out, rank=2, world_size=2)


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    out = tmp_path / "out"
    publish(out, 0, n=160)

    def order(seed: int, epoch: int, **kwargs) -> list[tuple]:
        dataset = LatestVersionDataset(out, columns=["sample_id"], seed=seed, **kwargs)
        dataset.set_epoch(epoch)
        return keys(dataset)

    first = order(0, 0)
    assert order(0, 0) == first
    assert order(0, 1) != first and order(1, 0) != first
    assert Counter(order(0, 1)) == Counter(first) == version_rows(out, 0)
    in_file_order = []
    for entry in read_manifest(OutputLayout(out), 0)["files"]:
        table = pq.read_table(out / "data/epoch_000" / entry["path"])
        in_file_order += keys(table.select(["sample_id", "input_ids"]).to_pylist())
    assert order(0, 0, shuffle=False) == order(5, 3, shuffle=False) == in_file_order
    assert first != in_file_order


def _distributed_worker(rank: int, out: str, init: str, results: str) -> None:
    """Two gloo ranks: rank 1's own view of LATEST is stale; the version must come from rank 0."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    result: dict = {}
    try:
        if rank == 1:
            consume.resolve_epoch = lambda out_dir, epoch=None: 0  # a stale view: epoch_000
        dataset = LatestVersionDataset(out, columns=["sample_id"], rank=rank, world_size=2)
        result["built_with"] = dataset.version
        dataset.set_epoch(0)
        result["version"] = dataset.version
        result["rows"] = len(keys(dataset))
        if rank == 0:  # rank 0 fails to read: every rank must raise, none may wait forever

            def broken(out_dir, epoch=None):
                raise consume.VersionNotFoundError("LATEST vanished")

            consume.resolve_epoch = broken
        try:
            dataset.set_epoch(1)
        except VersionNotFoundError as e:
            result["error"] = str(e)
    finally:
        dist.destroy_process_group()
        Path(results, f"rank{rank}.json").write_text(json.dumps(result))


def test_distributed_ranks_read_the_version_rank_0_broadcasts(out, tmp_path):
    publish(out, 1)
    context = torch.multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'pg-init'}"
    procs = [
        context.Process(target=_distributed_worker, args=(r, str(out), init, str(tmp_path)))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=90)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():  # a hung collective: do not leave it behind
                p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["built_with"] for r in results] == ["epoch_001", "epoch_000"]
    assert [r["version"] for r in results] == ["epoch_001", "epoch_001"]
    assert sum(r["rows"] for r in results) == sum(version_rows(out, 1).values())
    for r in results:
        assert r["error"] == "rank 0 could not read LATEST: VersionNotFoundError: LATEST vanished"


# --- RescoreCallback without a Trainer ------------------------------------------------------------


def _epoch_end_then_save(
    callback, output_dir: Path, *, step: int = 4, max_steps: int = 8, main: bool = True
) -> TrainerControl:
    """What Trainer does at an epoch end: on_epoch_end, then, if asked, a checkpoint and on_save
    (through transformers' own CallbackHandler and DefaultFlowCallback, as in Trainer)."""
    handler = CallbackHandler([DefaultFlowCallback, callback], None, None, None, None)
    args = SimpleNamespace(
        output_dir=str(output_dir), logging_strategy="no", eval_strategy="no", save_strategy="no"
    )
    state = TrainerState(global_step=step, max_steps=max_steps, is_world_process_zero=main)
    control = handler.on_epoch_end(args, state, TrainerControl())
    if control.should_save:
        checkpoint = output_dir / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text("{}")
        control = handler.on_save(args, state, control)
    return control


def test_default_command_and_out_dir_from_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"input: {{path: x.jsonl}}\nmodel: {{path: m}}\noutput: {{dir: {tmp_path}/o}}\n"
    )
    callback = RescoreCallback(config, overrides=["scoring.batch_size=8"])
    assert callback.layout.root == tmp_path / "o"
    assert callback.default_command(Path("ckpt/checkpoint-4"), 1) == [
        sys.executable,
        "-m",
        "qtune.pipeline.cli",
        "rescore",
        str(config),
        "--model",
        str(Path("ckpt/checkpoint-4").absolute()),
        "--epoch",
        "1",
        "--set",
        "scoring.batch_size=8",
    ]
    with pytest.raises(ValueError, match="unknown mode 'slurm'"):
        RescoreCallback(config, mode="slurm")


def test_callback_rescores_then_waits_and_skips_the_last_epoch(out, tmp_path, standin):
    callback = RescoreCallback(
        "unused.yaml", out, command_factory=standin.factory_for(out), poll_s=0.05
    )
    control = _epoch_end_then_save(callback, tmp_path / "train")
    assert not control.should_save and not control.should_training_stop
    assert (out / "LATEST").read_text().strip() == "epoch_001"
    [run] = callback.runs
    assert (run.epoch, run.checkpoint) == (1, str(tmp_path / "train/checkpoint-4"))
    assert "stand-in re-score of" in Path(run.log).read_text()
    mark = json.loads((standin.marks / "rescore-1.json").read_text())
    assert mark == {"checkpoint": run.checkpoint, "files": ["config.json"]}

    last = _epoch_end_then_save(callback, tmp_path / "train", step=8, max_steps=8)
    assert not last.should_save and len(callback.runs) == 1  # max_steps reached: no re-score

    capped = RescoreCallback(
        "unused.yaml", out, num_epochs=1, command_factory=standin.factory_for(out)
    )
    control = _epoch_end_then_save(capped, tmp_path / "capped")
    assert control.should_training_stop and not capped.runs


def _fake_command(tmp_path: Path, body: str):
    script = tmp_path / "fake.py"
    script.write_text(textwrap.dedent(body))
    return lambda checkpoint, epoch: [sys.executable, str(script)]


def test_callback_errors_name_the_cause(out, tmp_path):
    failing = _fake_command(
        tmp_path,
        "import sys\nfor i in range(50): print('line', i)\nprint('boom at the end')\nsys.exit(3)\n",
    )
    callback = RescoreCallback("c.yaml", out, command_factory=failing, poll_s=0.05)
    with pytest.raises(RescoreError, match=r"(?s)failed \(exit 3\).*line 49\nboom at the end"):
        _epoch_end_then_save(callback, tmp_path / "a")
    assert not callback.runs

    quiet = _fake_command(tmp_path, "print('did nothing')\n")
    callback = RescoreCallback("c.yaml", out, command_factory=quiet, timeout_s=1, poll_s=0.05)
    with pytest.raises(RescoreError, match="LATEST names epoch_000, not epoch_001"):
        _epoch_end_then_save(callback, tmp_path / "b")

    hanging = _fake_command(tmp_path, "import time\nprint('working', flush=True)\ntime.sleep(60)\n")
    callback = RescoreCallback("c.yaml", out, command_factory=hanging, timeout_s=1, poll_s=0.05)
    started = time.monotonic()
    with pytest.raises(RescoreError, match=r"(?s)still running after 1 s; stopped it.*working"):
        _epoch_end_then_save(callback, tmp_path / "c")
    assert time.monotonic() - started < 10


def test_other_processes_wait_for_latest(out, tmp_path):
    callback = RescoreCallback("c.yaml", out, timeout_s=60, poll_s=0.05)
    publisher = threading.Timer(0.5, publish, args=(out, 1))
    publisher.start()
    _epoch_end_then_save(callback, tmp_path / "a", main=False)  # returns once LATEST moved
    publisher.join()
    assert (out / "LATEST").read_text().strip() == "epoch_001" and not callback.runs

    callback.timeout_s = 0.3  # the second epoch end: nobody publishes epoch_002
    with pytest.raises(RescoreError, match="names epoch_001, not epoch_002"):
        _epoch_end_then_save(callback, tmp_path / "b", step=8, max_steps=16, main=False)


class FakeJobClient:
    """Stands in for ray.job_submission.JobSubmissionClient: runs the entrypoint on submit and
    reports PENDING, RUNNING, then the outcome."""

    submitted: list[str] = []

    def __init__(self, address=None):
        self.address = address

    def submit_job(self, *, entrypoint: str) -> str:
        FakeJobClient.submitted.append(entrypoint)
        done = subprocess.run(shlex.split(entrypoint), capture_output=True, text=True)
        self.logs = done.stdout + done.stderr
        self.statuses = iter(
            ["PENDING", "RUNNING", "SUCCEEDED" if done.returncode == 0 else "FAILED"]
        )
        return f"raysubmit_{len(FakeJobClient.submitted)}"

    def get_job_status(self, job_id: str):
        from ray.job_submission import JobStatus

        return JobStatus(next(self.statuses, "FAILED"))

    def get_job_logs(self, job_id: str) -> str:
        return self.logs

    def stop_job(self, job_id: str) -> bool:
        return True


def test_ray_mode_submits_the_command_as_a_job(out, tmp_path, standin, monkeypatch):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobClient)
    FakeJobClient.submitted = []
    command = standin.factory_for(out)
    callback = RescoreCallback(
        "c.yaml",
        out,
        mode="ray",
        ray_address="http://head:8265",
        command_factory=command,
        poll_s=0.01,
    )
    _epoch_end_then_save(callback, tmp_path / "train")
    [run] = callback.runs
    assert run.ray_job_id == "raysubmit_1" and run.log is None
    assert FakeJobClient.submitted == [shlex.join(command(tmp_path / "train/checkpoint-4", 1))]
    assert (out / "LATEST").read_text().strip() == "epoch_001"

    failing = _fake_command(tmp_path, "import sys\nprint('scorer crashed')\nsys.exit(1)\n")
    callback = RescoreCallback("c.yaml", out, mode="ray", command_factory=failing, poll_s=0.01)
    with pytest.raises(RescoreError, match=r"(?s)Ray job raysubmit_2 FAILED.*scorer crashed"):
        _epoch_end_then_save(callback, tmp_path / "again", step=8, max_steps=16)


# --- end to end: transformers.Trainer on CPU ------------------------------------------------------


def test_trainer_follows_latest_and_rescores_between_epochs(out, tmp_path, tokenizer, standin):
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from qtune.demo.model import save_tiny_model, tiny_config

    # Synthetic token ids go up to 32000: a one-layer llama with that vocabulary (4M parameters).
    config = tiny_config("llama", 32000, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1)
    model_dir = save_tiny_model(
        tmp_path / "model", "llama", tokenizer, model=AutoModelForCausalLM.from_config(config)
    )
    dataset = LatestVersionDataset(out, seed=1)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True)
    seen: list[tuple[int, str, tuple]] = []

    def collate(features):
        seen.extend((dataset.epoch, dataset.version, tuple(f["input_ids"])) for f in features)
        return collator(features)

    steps = steps_per_epoch(out, batch_size=4)
    assert steps == 4  # 16 rows
    rescore = RescoreCallback(
        "unused.yaml", out, command_factory=standin.factory_for(out), poll_s=0.05
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "train"),
        per_device_train_batch_size=4,
        max_steps=2 * steps,
        learning_rate=1e-3,
        save_strategy="no",  # the callback's should_save makes the epoch-end checkpoint
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=dataset,
        data_collator=collate,
        processing_class=tokenizer,
        callbacks=[rescore],
    )
    result = trainer.train()

    assert trainer.state.global_step == 8 and result.training_loss > 0
    assert (out / "LATEST").read_text().strip() == "epoch_001"
    [run] = rescore.runs
    assert (run.epoch, run.checkpoint) == (1, str(tmp_path / "train/checkpoint-4"))
    files = json.loads((standin.marks / "rescore-1.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert dataset.history == [(0, "epoch_000"), (1, "epoch_001")]
    for epoch, version in ((0, "epoch_000"), (1, "epoch_001")):
        rows = [ids for e, v, ids in seen if e == epoch]
        assert {v for e, v, _ in seen if e == epoch} == {version}
        assert Counter(rows) == Counter(ids for _, ids in version_rows(out, epoch).elements())
