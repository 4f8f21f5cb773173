"""Does pruning help on *this* corpus and model? Train every arm for N epochs and compare.

The dynamic loop, once per arm, from the same starting model: triage, train one epoch with
`transformers.Trainer`, re-score with the new checkpoint (score-dependent arms), triage again...
After each epoch: loss on a held-out set and, where held-out rows carry an answer, exact-match
accuracy of greedy generations. Arms:

- ``qtuning``: the config's settings (guards on);
- ``qtuning-no-token-pruning``: the same sample selection, every response token kept;
- ``qtuning-group``: triage within each input file (``scope: group``);
- ``qtuning-unguarded``: the paper's rule without qtune's guards;
- ``random``: random samples and random tokens at **qtuning's budget of that epoch**: the same
  number of samples and the largest random token ratio whose loss tokens do not exceed
  qtuning's (bisection). Scores do not decide it, so it is not re-scored: each epoch re-draws
  from the epoch-0 cache with a new seed;
- ``full``: every sample and token (epoch 0's version every epoch).

``run_arms`` is the engine (``qtune demo-loop`` and ``qtune compare`` both use it); every finished
epoch is recorded in ``results.json`` with a checkpoint, so an interrupted comparison resumes at
the next arm and epoch. ``run_compare`` prepares a user's corpus first: a held-out slice (or an
``--eval`` file), an optional ``--limit`` and a smaller ``--proxy-model`` with the same tokenizer.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qtune import schema
from qtune.pipeline.config import ModelConfig, QTuneConfig, load_config
from qtune.pipeline.errors import PipelineError
from qtune.pipeline.layout import OutputLayout
from qtune.pipeline.publish import MANIFEST, read_manifest, sha256_text, write_atomic

logger = logging.getLogger(__name__)

ARMS: tuple[str, ...] = (
    "qtuning",
    "qtuning-no-token-pruning",
    "qtuning-group",
    "qtuning-unguarded",
    "random",
    "full",
)
ARM_SETTINGS: dict[str, list[str]] = {
    "qtuning": [],
    "qtuning-no-token-pruning": ["qtuning.token_policy=none"],
    "qtuning-group": ["qtuning.scope=group"],
    "qtuning-unguarded": ["qtuning.keep_end_of_turn=false", "qtuning.min_prunable_tokens=0"],
    "random": ["qtuning.policy=random", "qtuning.token_policy=random"],
    "full": ["qtuning.policy=random", "qtuning.sample_ratio=1.0", "qtuning.token_policy=none"],
}
#: Arms whose selection does not depend on the model's scores (never re-scored).
SCORE_FREE = ("random", "full")
RESULTS, PLOT, SETTINGS = "results.json", "results.png", "compare.json"
CORPUS_DIR, TRAIN_FILE, EVAL_FILE = "corpus", "train.jsonl", "eval.jsonl"
_BUDGET_STEPS = 10  # bisection steps of the random arm's token ratio
_ANSWER_FIELD = "answer"

Judge = Callable[[str, str, str], bool]  # (generated text, reference, task) -> correct


@dataclass
class EpochRecord:
    epoch: int
    version: str
    kept_samples: int
    kept_loss_tokens: int
    train_loss: float
    heldout_loss: float
    accuracy: float | None  # exact match of the answer; None: no held-out row has one
    accuracy_by_task: dict[str, float] = field(default_factory=dict)
    heldout_loss_by_task: dict[str, float] = field(default_factory=dict)
    noise: dict[str, dict] = field(default_factory=dict)  # planted noise (demo): where it went
    ppl_tail: dict = field(default_factory=dict)  # kept share from the top 5% of PPL
    quadrant_changed: int | None = None
    kept_to_dropped: int | None = None
    dropped_to_kept: int | None = None
    token_ratio: float | None = None  # random arm: the matched token ratio
    seconds: float = 0.0


@dataclass
class ArmResult:
    arm: str
    epochs: list[EpochRecord] = field(default_factory=list)


@dataclass
class EvalSet:
    """Held-out conversations: all for the loss; those with a reference answer for accuracy."""

    loss_rows: Any  # datasets.Dataset: input_ids, attention_mask, labels, task
    prompts: list[list[dict]]  # the conversation up to its last assistant turn
    references: list[str]
    tasks: list[str]
    judge: Judge
    max_new_tokens: int = 256


@dataclass
class TrainSettings:
    learning_rate: float = 1e-5
    batch_size: int = 8
    seed: int = 0


def answer_matches(generated: str, reference: str, task: str = "") -> bool:
    """The default judge: the generation equals the reference, or its last line ends with it as
    a whole word ("... so the answer is 42." matches 42; 142 does not)."""
    del task
    text, reference = generated.strip(), reference.strip()
    if not reference:
        return False
    if text == reference:
        return True
    lines = [line for line in text.splitlines() if line.strip()]
    pattern = rf"(?:^|[^\w]){re.escape(reference)}[\s.!)*\"']*$"
    return bool(lines) and re.search(pattern, lines[-1].strip()) is not None


def eval_set(samples: list[dict], model: ModelConfig, judge: Judge, max_new_tokens: int) -> EvalSet:
    """``samples``: ``{"messages", "task"?, "answer"?, "tools"?}``. Every row counts towards the
    held-out loss (rows the tokenizer rejects are left out, with a warning); rows whose last turn
    is the assistant's and that carry an ``answer`` are judged by ``judge`` on a greedy
    generation of that turn."""
    import datasets

    from qtune.stages.tokenize import Tokenize, resolve_chat_template

    tokenize = Tokenize(
        str(Path(model.path).absolute()),
        model.max_length,
        resolve_chat_template(model.chat_template),
        model.overlength,
    )
    rows, prompts, references, tasks = [], [], [], []
    rejected = 0
    for sample in samples:
        messages = sample["messages"]
        try:
            ids, mask, _ = tokenize.encode(messages, "messages", sample.get("tools"))
        except schema.RowRejected:
            rejected += 1
            continue
        labels = np.where(mask, ids, schema.IGNORE_INDEX).tolist()
        task = str(sample.get("task") or "all")
        rows.append(
            {"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels,
             "task": task}
        )  # fmt: skip
        answer = sample.get(_ANSWER_FIELD)
        if answer is not None and messages[-1]["role"] == "assistant":
            prompts.append(messages[:-1])
            references.append(str(answer))
            tasks.append(task)
    if rejected:
        logger.warning("%d held-out rows could not be tokenised and are left out", rejected)
    if not rows:
        raise PipelineError("no held-out row could be tokenised: nothing to evaluate on")
    return EvalSet(
        datasets.Dataset.from_list(rows), prompts, references, tasks, judge, max_new_tokens
    )


def _accuracy(model, tokenizer, evals: EvalSet) -> tuple[float | None, dict[str, float]]:
    """Greedy generation of each judged prompt's answer; exact match overall and per task."""

    if not evals.prompts:
        return None, {}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # for generation only
    try:
        return _judged(model, tokenizer, evals)
    finally:
        tokenizer.padding_side = padding_side


def _judged(model, tokenizer, evals: EvalSet) -> tuple[float, dict[str, float]]:
    import torch

    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in evals.prompts
    ]
    correct = np.zeros(len(texts), dtype=bool)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    stop = _stop_tokens(tokenizer)
    with torch.no_grad():
        for start in range(0, len(order), 32):
            index = order[start : start + 32]
            batch = tokenizer(
                [texts[i] for i in index],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=evals.max_new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id
                if tokenizer.pad_token_id is not None
                else tokenizer.eos_token_id,
            )
            answers = tokenizer.batch_decode(
                out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for i, answer in zip(index, answers, strict=True):
                correct[i] = evals.judge(answer, evals.references[i], evals.tasks[i])
    tasks = np.asarray(evals.tasks)
    by_task = {str(t): float(correct[tasks == t].mean()) for t in sorted(set(evals.tasks))}
    return float(correct.mean()), by_task


def _stop_tokens(tokenizer) -> list[int]:
    """The template's end-of-turn token(s) as generation stops (where the loss span ends)."""
    from qtune.stages.chat_spans import ChatRenderer

    try:
        ends = ChatRenderer(tokenizer).turn_end()
    except Exception:  # a template qtune cannot probe: the EOS token alone
        ends = None
    stops = {tokenizer.eos_token_id} - {None}
    for marker in (ends.marker, ends.history_marker) if ends else ():
        ids = tokenizer.encode(marker.strip(), add_special_tokens=False) if marker.strip() else []
        if len(ids) == 1:
            stops.add(ids[0])
    return sorted(stops)


def _train_one_epoch(model, tokenizer, train, evals: EvalSet, work: Path, settings, seed: int):
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=max(settings.batch_size, 16),
        learning_rate=settings.learning_rate,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=settings.seed + seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    result = trainer.train()
    rows = evals.loss_rows
    by_task = {}
    tasks = sorted(set(rows["task"]))
    if len(tasks) > 1:
        for task in tasks:
            subset = rows.filter(lambda r, t=task: r["task"] == t).remove_columns("task")
            by_task[task] = float(trainer.evaluate(subset)["eval_loss"])
    overall = float(trainer.evaluate(rows.remove_columns("task"))["eval_loss"])
    return float(result.training_loss), overall, by_task


def _version_facts(out: Path, version: int) -> dict:
    """kept samples, loss tokens, extreme-PPL tail and migration, from a version's manifest."""
    manifest = read_manifest(OutputLayout(out), version)
    counts = manifest["counts"]
    return {
        "kept": counts["kept"],
        "kept_loss_tokens": counts["kept_loss_tokens"],
        "ppl_tail": (manifest.get("signals") or {}).get("ppl_tail", {}),
        "migration": manifest.get("migration"),
    }


def _published(out: Path, version: int) -> bool:
    return (OutputLayout(out).data_dir(version) / MANIFEST).is_file()


def _copy_cache(first: Path, out: Path, epoch: int) -> None:
    """Epoch 0's scored cache (and rejects) from the first arm into ``out``'s ``epoch`` slot."""
    source, target = OutputLayout(first), OutputLayout(out)
    pairs = (
        (source.scores_dir(0), target.scores_dir(epoch)),
        (source.rejects_dir(0), target.rejects_dir(epoch)),
    )
    for src, dst in pairs:
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)


def triage_at_budget(
    config: Path, overrides: list[str], out: Path, epoch: int, samples: int, loss_tokens: int
) -> float:
    """Random samples and tokens into ``out``'s version ``epoch``: exactly ``samples`` samples and
    the largest random token ratio whose loss tokens do not exceed ``loss_tokens``. Returns the
    ratio."""
    from qtune.pipeline.triage_job import run_triage

    summary_path = OutputLayout(out).score_summary(epoch)
    scored = int(json.loads(summary_path.read_text())["scored"])

    def triage(token_ratio: float):
        settings = [
            *overrides,
            f"output.dir={out}",
            *ARM_SETTINGS["random"],
            f"qtuning.sample_ratio={min(1.0, (samples + 0.5) / scored)}",
            f"qtuning.token_ratio={token_ratio}",
            f"qtuning.seed={epoch}",
        ]
        return run_triage(load_config(config, settings), epoch=epoch)

    low, high = 1e-3, 1.0
    if triage(high).kept_loss_tokens <= loss_tokens:
        return high
    for _ in range(_BUDGET_STEPS):
        middle = (low + high) / 2
        if triage(middle).kept_loss_tokens <= loss_tokens:
            low = middle
        else:
            high = middle
    triage(low)
    return low


def _load_results(out_root: Path) -> dict[str, ArmResult]:
    path = out_root / RESULTS
    if not path.is_file():
        return {}
    results = {}
    for entry in json.loads(path.read_text()):
        records = [EpochRecord(**e) for e in entry["epochs"]]
        results[entry["arm"]] = ArmResult(entry["arm"], records)
    return results


def run_arms(
    config: Path,
    out_root: Path,
    *,
    epochs: int,
    arms: tuple[str, ...],
    evals: EvalSet,
    overrides: list[str],
    train: TrainSettings,
    noise: Callable[[Path], dict] | None = None,
) -> list[ArmResult]:
    """Run (or resume) every arm; ``overrides`` apply to every arm's config (``model.path``,
    ``input.path``...). ``noise(version_dir)``: where planted noise went (the demo knows)."""
    from transformers import AutoModelForCausalLM

    from qtune.pipeline.consume import load_version
    from qtune.pipeline.progress import StepProgress
    from qtune.pipeline.rescore_job import run_rescore
    from qtune.pipeline.score_job import run_score
    from qtune.pipeline.triage_job import run_triage
    from qtune.stages.tokenize import load_tokenizer, resolve_chat_template

    unknown = [a for a in arms if a not in ARMS]
    if unknown or "qtuning" not in arms:
        raise PipelineError(f"arms must include qtuning and be among {', '.join(ARMS)}")
    base = load_config(config, overrides)
    model_dir = Path(base.model.path)
    tokenizer = load_tokenizer(str(model_dir), resolve_chat_template(base.model.chat_template))
    done = _load_results(out_root)
    first = out_root / "qtuning"
    ordered = [a for a in ARMS if a in arms]
    remaining = sum(epochs - len(done.get(a, ArmResult(a)).epochs) for a in ordered)
    with StepProgress("compare: arm-epochs", remaining, unit="epochs") as progress:
        if not _published(first, 0):
            run_score(load_config(config, [*overrides, f"output.dir={first}"]))
        for arm in ordered:
            out = out_root / arm
            cfg = load_config(config, [*overrides, f"output.dir={out}", *ARM_SETTINGS[arm]])
            result = done.setdefault(arm, ArmResult(arm))
            start = len(result.epochs)
            if start >= epochs:
                continue
            checkpoints = out / "checkpoints"
            resume = checkpoints / f"after-epoch-{start - 1}"
            model = AutoModelForCausalLM.from_pretrained(resume if start else model_dir)
            for epoch in range(start, epochs):
                started = time.perf_counter()
                version = 0 if arm == "full" else epoch
                token_ratio = None
                if arm == "random":
                    _copy_cache(first, out, epoch)  # scores do not decide it: epoch 0's
                    qtuning = _version_facts(first, epoch)
                    token_ratio = triage_at_budget(
                        config, overrides, out, epoch, qtuning["kept"], qtuning["kept_loss_tokens"]
                    )
                elif not _published(out, version) and version == 0:
                    if arm != "qtuning":
                        _copy_cache(first, out, 0)
                    run_triage(cfg, epoch=0)
                elif not _published(out, version):  # scored by the previous epoch's checkpoint
                    run_rescore(cfg, checkpoints / f"after-epoch-{epoch - 1}", epoch=epoch)
                facts = _version_facts(out, version)
                data = load_version(out, version, columns=["input_ids", "attention_mask", "labels"])
                train_loss, heldout_loss, loss_by_task = _train_one_epoch(
                    model, tokenizer, data, evals, out / "trainer", train, epoch
                )
                accuracy, by_task = _accuracy(model, tokenizer, evals)
                migration = facts["migration"] or {}
                record = EpochRecord(
                    epoch=epoch,
                    version=f"epoch_{version:03d}",
                    kept_samples=facts["kept"],
                    kept_loss_tokens=facts["kept_loss_tokens"],
                    train_loss=train_loss,
                    heldout_loss=heldout_loss,
                    accuracy=accuracy,
                    accuracy_by_task=by_task,
                    heldout_loss_by_task=loss_by_task,
                    noise=noise(OutputLayout(out).data_dir(version)) if noise else {},
                    ppl_tail=facts["ppl_tail"],
                    quadrant_changed=migration.get("quadrant_changed"),
                    kept_to_dropped=migration.get("kept_to_dropped"),
                    dropped_to_kept=migration.get("dropped_to_kept"),
                    token_ratio=token_ratio,
                )
                checkpoint = checkpoints / f"after-epoch-{epoch}"
                model.save_pretrained(checkpoint)
                tokenizer.save_pretrained(checkpoint)
                record.seconds = time.perf_counter() - started
                result.epochs.append(record)
                _write_results(out_root, [done[a] for a in ordered if a in done])
                progress.advance(1)
                logger.info(
                    "%s epoch %d: %d samples, %d loss tokens, held-out loss %.4f, accuracy %s",
                    arm,
                    epoch,
                    record.kept_samples,
                    record.kept_loss_tokens,
                    heldout_loss,
                    "-" if accuracy is None else f"{accuracy:.3f}",
                )
    return [done[a] for a in ordered]


def _write_results(out_root: Path, results: list[ArmResult]) -> None:
    payload = [{"arm": r.arm, "epochs": [asdict(e) for e in r.epochs]} for r in results]
    write_atomic(out_root / RESULTS, json.dumps(payload, indent=2))
    write_atomic(out_root / PLOT, results_png(results))


def results_png(results: list[ArmResult]) -> bytes:
    """Held-out loss, accuracy and loss tokens per epoch, one line per arm."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        ("heldout_loss", "held-out loss (lower is better)"),
        ("accuracy", "held-out exact-match accuracy"),
        ("kept_loss_tokens", "loss tokens trained on"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        for result in results:
            values = [getattr(e, key) for e in result.epochs]
            if any(v is None for v in values):
                continue
            ax.plot([e.epoch for e in result.epochs], values, marker="o", label=result.arm)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


# --- qtune compare: a user's corpus -----------------------------------------------------------


def _normalized_rows(cfg: QTuneConfig, paths: str | list[str], limit: int | None):
    """Usable normalised rows of ``paths`` (dicts: sample_id, format, metadata, messages, tools),
    the first ``limit`` of them; and the number of rows ingest rejected."""
    from qtune.stages import ingest

    sources, _ = ingest.discover_inputs(paths)
    rows, rejected = [], 0
    for source in sources:
        fmt = None if cfg.input.format == "auto" else cfg.input.format
        plan = ingest.plan_source(source, fmt, 0, cfg.input.partition_rows, cfg.input.split)
        for partition in plan:
            for batch in ingest.iter_raw_rows(partition, cfg.input.batch_rows, cfg.input.split):
                table = ingest.normalize_batch(partition, batch)
                for row in table.to_pylist():
                    if row[schema.REJECT_REASON] is not None:
                        rejected += 1
                        continue
                    rows.append(row)
                    if limit is not None and len(rows) >= limit:
                        return rows, rejected
    return rows, rejected


def _as_input_row(row: dict) -> dict:
    """A normalised row back as a chat-messages JSONL row qtune reads the same way."""
    messages = []
    for message in row[schema.MESSAGES]:
        entry = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in entry:
            entry["tool_calls"] = json.loads(entry["tool_calls"])
        messages.append(entry)
    metadata = json.loads(row[schema.METADATA]) if row[schema.METADATA] else {}
    out = {**metadata, "id": row[schema.SAMPLE_ID], "messages": messages}
    if row[schema.TOOLS]:
        out["tools"] = json.loads(row[schema.TOOLS])
    return out


def _in_holdout(sample_ids: list[str], share: float) -> np.ndarray:
    from qtune.stages.triage import stable_hash64

    keys = stable_hash64(pa.array(sample_ids, pa.string()))
    return keys.astype(np.float64) / 2.0**64 < share


@dataclass
class CompareSplit:
    train_path: Path
    train_rows: int
    eval_rows: list[dict]
    rejected: int


def split_corpus(
    cfg: QTuneConfig,
    work: Path,
    *,
    holdout: float,
    eval_file: str | None,
    limit: int | None,
) -> CompareSplit:
    """Write the training part of the corpus to ``work/corpus/train.jsonl`` (chat messages, ids
    and fields kept) and return it with the held-out rows: a deterministic ``holdout`` share (by
    a hash of each sample id) or, with ``eval_file``, every row of that file."""
    rows, rejected = _normalized_rows(cfg, cfg.input.path, limit)
    if not rows:
        raise PipelineError(f"no usable row in {cfg.input.path} ({rejected} rejected)")
    if eval_file:
        held, _ = _normalized_rows(cfg, eval_file, None)
        held_ids = {r[schema.SAMPLE_ID] for r in held}
        train = [r for r in rows if r[schema.SAMPLE_ID] not in held_ids]
    else:
        mask = _in_holdout([r[schema.SAMPLE_ID] for r in rows], holdout)
        held = [r for r, m in zip(rows, mask, strict=True) if m]
        train = [r for r, m in zip(rows, mask, strict=True) if not m]
    if not held:
        raise PipelineError(
            f"the held-out slice is empty ({len(rows)} rows, --holdout {holdout}): raise "
            "--holdout or pass --eval FILE"
        )
    corpus = work / CORPUS_DIR
    corpus.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(_as_input_row(r), ensure_ascii=False) + "\n" for r in train)
    write_atomic(corpus / TRAIN_FILE, lines)
    eval_rows = [_as_input_row(r) for r in held]
    write_atomic(
        corpus / EVAL_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_rows)
    )
    return CompareSplit(corpus / TRAIN_FILE, len(train), eval_rows, rejected)


def cost_estimate(rows: int, epochs: int, arms: tuple[str, ...], sample_ratio: float) -> dict:
    """What a comparison will do, before it starts: scoring passes over the training corpus and
    sample-epochs of training (upper bounds)."""
    dependent = [a for a in arms if a not in SCORE_FREE]
    passes = 1 + (epochs - 1) * len(dependent)
    trained = sum(
        epochs * (rows if arm == "full" else max(1, int(sample_ratio * rows))) for arm in arms
    )
    return {"scoring_passes": passes, "scored_samples": passes * rows, "trained_samples": trained}


def settings_fingerprint(settings: dict) -> str:
    return sha256_text(json.dumps(settings, sort_keys=True))[:16]


def run_compare(
    config: Path,
    out: Path,
    *,
    epochs: int,
    arms: tuple[str, ...],
    holdout: float,
    eval_file: str | None,
    limit: int | None,
    proxy_model: str | None,
    train: TrainSettings,
    max_new_tokens: int,
    restart: bool,
    overrides: list[str] | None = None,
    on_plan: Callable[[dict], None] | None = None,
) -> list[ArmResult]:
    """``qtune compare``: split, estimate, then run (or resume) every arm into ``out``."""
    overrides = list(overrides or [])
    if proxy_model:
        overrides.append(f"model.path={proxy_model}")
    cfg = load_config(config, overrides)
    # Not the epochs: a finished comparison resumes into more of them.
    settings = {
        "config": json.loads(cfg.to_json()),
        "holdout": holdout,
        "eval": eval_file,
        "limit": limit,
        "train": asdict(train),
        "max_new_tokens": max_new_tokens,
    }
    recorded = out / SETTINGS
    if restart:
        for name in (*ARMS, CORPUS_DIR, RESULTS, PLOT, SETTINGS):  # only what compare writes
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before.get("fingerprint") != settings_fingerprint(settings):
            raise PipelineError(
                f"{out} holds a comparison with other settings; pass --restart to start over "
                "or choose another --out"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise PipelineError(f"{out} is not empty and not a qtune comparison: choose another --out")
    split = split_corpus(cfg, out, holdout=holdout, eval_file=eval_file, limit=limit)
    plan = {
        "train_rows": split.train_rows,
        "eval_rows": len(split.eval_rows),
        "judged_rows": sum(1 for r in split.eval_rows if r.get(_ANSWER_FIELD) is not None),
        "rejected_rows": split.rejected,
        "arms": list(arms),
        "epochs": epochs,
        **cost_estimate(split.train_rows, epochs, arms, cfg.qtuning.sample_ratio),
    }
    if on_plan:
        on_plan(plan)
    write_atomic(
        recorded,
        json.dumps({"fingerprint": settings_fingerprint(settings), **settings, "plan": plan}),
    )  # after the plan: a comparison that could not start leaves nothing to resume
    evals = eval_set(split.eval_rows, cfg.model, answer_matches, max_new_tokens)
    return run_arms(
        config,
        out,
        epochs=epochs,
        arms=arms,
        evals=evals,
        overrides=[*overrides, f"input.path={split.train_path}", "input.format=messages"],
        train=train,
    )
