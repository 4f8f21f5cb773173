"""The dynamic-pruning loop on the demo, end to end: train, re-score, re-triage, repeat.

Three arms share one schedule (3 epochs of `transformers.Trainer` on CPU, starting from the demo
model): `qtuning` (the config's ratios, re-scored with each epoch's checkpoint), `random` (the
same number of samples chosen at random, all their tokens; also re-scored, so its migration is
visible) and `full` (every sample and token; it does not depend on scores, so it is not
re-scored). Each epoch trains on the version the previous checkpoint produced and is evaluated
on a held-out split of clean conversations drawn from the same task distribution.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtune.pipeline.config import load_config

logger = logging.getLogger(__name__)

ARMS = ("qtuning", "random", "full")
HELDOUT_CONVERSATIONS = 400
HELDOUT_SEED = 99


@dataclass
class EpochRecord:
    epoch: int
    version: str
    kept_samples: int
    kept_loss_tokens: int
    train_loss: float
    heldout_loss: float
    quadrant_changed: int | None = None
    kept_to_dropped: int | None = None
    dropped_to_kept: int | None = None
    seconds: float = 0.0


@dataclass
class ArmResult:
    arm: str
    epochs: list[EpochRecord] = field(default_factory=list)


def _arm_overrides(arm: str, out: Path) -> list[str]:
    common = [f"output.dir={out}", "scoring.backend=torch"]
    if arm == "qtuning":
        return common
    if arm == "random":
        return common + ["qtuning.policy=random", "qtuning.token_policy=none"]
    return common + [
        "qtuning.policy=random",
        "qtuning.sample_ratio=1.0",
        "qtuning.token_policy=none",
    ]


def _heldout(model_dir: Path, max_length: int):
    import datasets

    from qtune.demo.corpus import training_conversations
    from qtune.stages.tokenize import Tokenize

    tokenize = Tokenize(str(model_dir), max_length)
    rows = []
    for messages in training_conversations(HELDOUT_CONVERSATIONS, seed=HELDOUT_SEED):
        ids, mask, _ = tokenize.encode(messages, "messages")
        labels = [int(i) if m else -100 for i, m in zip(ids.tolist(), mask.tolist(), strict=True)]
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels})
    return datasets.Dataset.from_list(rows)


def _train_one_epoch(
    model, tokenizer, train, heldout, work: Path, seed: int
) -> tuple[float, float]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=5e-4,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=heldout,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    result = trainer.train()
    return float(result.training_loss), float(trainer.evaluate()["eval_loss"])


def run_demo_loop(
    config: Path = Path("configs/demo.yaml"),
    out_root: Path = Path("out/demo-loop"),
    epochs: int = 3,
) -> list[ArmResult]:
    """Run the three arms; return per-epoch records (also written to out_root/results.json)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtune.demo.assets import prepare_demo
    from qtune.pipeline.consume import load_version
    from qtune.pipeline.layout import OutputLayout
    from qtune.pipeline.rescore_job import run_rescore
    from qtune.pipeline.score_job import run_score
    from qtune.pipeline.triage_job import run_triage

    base_cfg = load_config(config)
    if isinstance(base_cfg.input.path, list):
        raise ValueError("the demo config must name one input directory")
    model_dir = Path(base_cfg.model.path)
    prepare_demo(Path(base_cfg.input.path), model_dir)
    shutil.rmtree(out_root, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = _heldout(model_dir, base_cfg.model.max_length)

    # Epoch 0 is scored once with the demo model; every arm triages that same cache.
    first = out_root / "qtuning"
    run_score(load_config(config, _arm_overrides("qtuning", first)))
    results = []
    for arm in ARMS:
        out = out_root / arm
        cfg = load_config(config, _arm_overrides(arm, out))
        if arm != "qtuning":
            source = OutputLayout(first)
            for epoch_dir in (source.scores_dir(0), source.rejects_dir(0)):
                if epoch_dir.is_dir():
                    shutil.copytree(epoch_dir, out / epoch_dir.relative_to(source.root))
        summary = run_triage(cfg, epoch=0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        arm_result = ArmResult(arm)
        for epoch in range(epochs):
            started = time.perf_counter()
            # Full data does not depend on scores: it trains on epoch 0's version every epoch.
            version = 0 if arm == "full" else epoch
            train = load_version(out, version, columns=["input_ids", "attention_mask", "labels"])
            train_loss, heldout_loss = _train_one_epoch(
                model, tokenizer, train, heldout, out / "trainer", seed=epoch
            )
            record = EpochRecord(
                epoch=epoch,
                version=f"epoch_{version:03d}",
                kept_samples=summary.kept,
                kept_loss_tokens=summary.kept_loss_tokens,
                train_loss=train_loss,
                heldout_loss=heldout_loss,
            )
            if summary.migration:
                record.quadrant_changed = summary.migration["quadrant_changed"]
                record.kept_to_dropped = summary.migration["kept_to_dropped"]
                record.dropped_to_kept = summary.migration["dropped_to_kept"]
            if epoch + 1 < epochs and arm != "full":
                checkpoint = out / "checkpoints" / f"after-epoch-{epoch}"
                model.save_pretrained(checkpoint)
                tokenizer.save_pretrained(checkpoint)
                _, summary = run_rescore(cfg, checkpoint, epoch=epoch + 1)
            record.seconds = time.perf_counter() - started
            arm_result.epochs.append(record)
            logger.info("%s epoch %d: %s", arm, epoch, asdict(record))
        results.append(arm_result)
    (out_root / "results.json").write_text(
        json.dumps(
            [{"arm": r.arm, "epochs": [asdict(e) for e in r.epochs]} for r in results], indent=2
        )
    )
    return results
