"""Demo assets for ``make demo``: the synthetic corpus and a tiny model trained on its distribution.

Both are built once and cached (a stamp file records the recipe version); building the model
takes about two minutes on two CPU cores, so its scores carry real signal rather than noise.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from qtune.pipeline.layout import publish_dir

logger = logging.getLogger(__name__)

DEMO_RECIPE = {
    "version": 2,
    "n_samples": 3000,
    "corpus_seed": 0,
    # Long worked solutions (the paper's regime) beside the short answers: qtune/demo/worked.py.
    "worked_samples": 600,
    "train_conversations": 6000,
    "worked_train_conversations": 1500,
    "train_seed": 1,
    "vocab_size": 1024,
    "arch": "llama",
    # Step-bounded so the model (and every figure measured on it) is the same on any machine;
    # the time cap only guards against a pathologically slow one.
    "train_steps": 1500,
    "train_seconds": 600.0,
}
STAMP = "_qtune_demo.json"


def _is_current(directory: Path, recipe: dict) -> bool:
    stamp = directory / STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == recipe


def prepare_demo_corpus(corpus_dir: Path, recipe: dict = DEMO_RECIPE) -> Path:
    from qtune.demo.corpus import write_demo_corpus
    from qtune.demo.worked import write_worked

    if _is_current(corpus_dir, recipe):
        return corpus_dir
    staging = corpus_dir.with_name(f".{corpus_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    write_demo_corpus(staging, n_samples=recipe["n_samples"], seed=recipe["corpus_seed"])
    write_worked(staging, recipe["worked_samples"], seed=recipe["corpus_seed"])
    (staging / STAMP).write_text(json.dumps(recipe))
    publish_dir(staging, corpus_dir)
    logger.info("demo corpus written to %s", corpus_dir)
    return corpus_dir


def prepare_demo_model(model_dir: Path, recipe: dict = DEMO_RECIPE) -> Path:
    from transformers import AutoModelForCausalLM

    from qtune.demo.corpus import training_conversations
    from qtune.demo.model import build_bpe_tokenizer, save_tiny_model, tiny_config, train_tiny_model
    from qtune.demo.worked import worked_conversations

    if _is_current(model_dir, recipe):
        return model_dir
    started = time.perf_counter()
    conversations = training_conversations(
        recipe["train_conversations"], seed=recipe["train_seed"]
    ) + worked_conversations(recipe["worked_train_conversations"], seed=recipe["train_seed"])
    tokenizer = build_bpe_tokenizer(
        (m["content"] for c in conversations for m in c), vocab_size=recipe["vocab_size"]
    )
    config = tiny_config(
        recipe["arch"],
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    logger.info(
        "training the demo model: %d steps (about two minutes on CPU)", recipe["train_steps"]
    )
    stats = train_tiny_model(
        model,
        tokenizer,
        conversations,
        max_steps=recipe["train_steps"],
        max_seconds=recipe["train_seconds"],
        seed=0,
    )
    staging = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_tiny_model(staging, recipe["arch"], tokenizer, model=model)
    (staging / STAMP).write_text(json.dumps(recipe))
    (staging / "_qtune_demo_training.json").write_text(json.dumps(stats))
    publish_dir(staging, model_dir)
    logger.info(
        "demo model ready in %.0f s (loss %.3f -> %.3f): %s",
        time.perf_counter() - started,
        stats["first_loss"],
        stats["final_loss"],
        model_dir,
    )
    return model_dir


def prepare_demo(corpus_dir: Path, model_dir: Path) -> None:
    """Build (or reuse) the demo corpus and model."""
    prepare_demo_corpus(corpus_dir)
    prepare_demo_model(model_dir)
