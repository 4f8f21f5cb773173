"""The dynamic-pruning loop on the demo: ``qtune compare``'s arms on the demo corpus and model.

The engine is :func:`qtune.pipeline.compare.run_arms` (arms, equal-budget random arm, resume);
this module adds what only the demo knows: a held-out split drawn from the clean training
distribution (400 short conversations and 100 worked solutions), the demo's answer judge, and the
planted noise of the corpus, so that each version reports where every kind of noise went.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qtune.pipeline.compare import (
    ARMS,
    PLOT,
    RESULTS,
    ArmResult,
    TrainSettings,
    eval_set,
    run_arms,
)
from qtune.pipeline.config import load_config

logger = logging.getLogger(__name__)

HELDOUT_CONVERSATIONS = 400
HELDOUT_WORKED = 100
HELDOUT_SEED = 99
#: The demo model is tiny and trained from scratch: a learning rate far above a real model's.
DEMO_TRAINING = TrainSettings(learning_rate=5e-4, batch_size=16)
_MAX_NEW_TOKENS = 400  # a worked solution of 24 steps

__all__ = ["ARMS", "PLOT", "RESULTS", "noise_routing", "run_demo_loop"]


def judge(generated: str, reference: str, task: str) -> bool:
    """Worked solutions: the number on the ``Answer:`` line; short tasks: the whole sentence."""
    from qtune.demo.worked import TASK as WORKED
    from qtune.demo.worked import final_answer

    if task == WORKED:
        return final_answer(generated.strip()) == reference
    return generated.strip() == reference.strip()


def heldout_samples() -> list[dict]:
    """Clean held-out conversations with a reference answer (none for open-ended ``chat``)."""
    from qtune.demo.corpus import clean_samples
    from qtune.demo.worked import generate_worked

    samples = []
    for sample in clean_samples(HELDOUT_CONVERSATIONS, seed=HELDOUT_SEED):
        answer = None if sample["task"] == "chat" else sample["messages"][-1]["content"]
        samples.append({**sample, "answer": answer})
    worked = generate_worked(HELDOUT_WORKED, seed=HELDOUT_SEED, noise_rate=0.0, id_prefix="heldout")
    return samples + worked


def planted_noise(recipe: dict) -> dict[str, tuple[str, str | None]]:
    """sample_id -> (family, noise kind or None) for every demo row whose file carries an id."""
    from qtune.demo.corpus import generate_samples
    from qtune.demo.worked import generate_worked

    truth = {
        s["id"]: ("short", "short_wrong_label" if s["noisy"] else None)
        for s in generate_samples(recipe["n_samples"], seed=recipe["corpus_seed"])
    }
    for s in generate_worked(recipe["worked_samples"], seed=recipe["corpus_seed"]):
        truth[s["id"]] = ("worked", f"worked_{s['noise']}" if s["noise"] else None)
    return truth


def noise_routing(version_dir: Path, truth: dict[str, tuple[str, str | None]]) -> dict:
    """Per planted-noise kind: input and kept counts, its share of its family's input and of its
    family's kept samples, and where it went by quadrant (kept and dropped)."""
    import polars as pl
    import pyarrow.dataset as pads

    columns = ["sample_id", "quadrant"]
    kept = pl.from_arrow(pads.dataset(version_dir / "train").to_table(columns=columns))
    dropped = pl.from_arrow(pads.dataset(version_dir / "dropped.parquet").to_table(columns=columns))
    ids = list(truth)
    known = pl.DataFrame(
        {
            "sample_id": ids,
            "family": [truth[i][0] for i in ids],
            "kind": [truth[i][1] for i in ids],
        }
    )
    rows = pl.concat(
        [kept.with_columns(kept=pl.lit(True)), dropped.with_columns(kept=pl.lit(False))]
    ).join(known, on="sample_id")
    routing = {}
    for kind in sorted(k for k in rows.get_column("kind").unique().to_list() if k):
        family = rows.filter(pl.col("kind") == kind).get_column("family")[0]
        in_family = rows.filter(pl.col("family") == family)
        mine = in_family.filter(pl.col("kind") == kind)
        kept_family = int(in_family.get_column("kept").sum())
        kept_mine = int(mine.get_column("kept").sum())
        counts = mine.group_by(["quadrant", "kept"]).len().sort(["kept", "quadrant"])
        routing[kind] = {
            "input": mine.height,
            "kept": kept_mine,
            "input_share": mine.height / in_family.height,
            "kept_share": kept_mine / kept_family if kept_family else 0.0,
            "by_quadrant": {f"{'kept' if k else 'dropped'} {q}": n for q, k, n in counts.rows()},
        }
    return routing


def run_demo_loop(
    config: Path = Path("configs/demo.yaml"),
    out_root: Path = Path("out/demo-loop"),
    epochs: int = 3,
    arms: tuple[str, ...] = ARMS,
) -> list[ArmResult]:
    """Run the arms from scratch; return per-epoch records (also ``results.json``, a plot)."""
    import shutil

    from qtune.demo.assets import DEMO_RECIPE, prepare_demo

    base = load_config(config)
    if isinstance(base.input.path, list):
        raise ValueError("the demo config must name one input directory")
    model_dir = Path(base.model.path)
    prepare_demo(Path(base.input.path), model_dir)
    shutil.rmtree(out_root, ignore_errors=True)
    truth = planted_noise(DEMO_RECIPE)
    evals = eval_set(heldout_samples(), base.model, judge, _MAX_NEW_TOKENS)
    return run_arms(
        config,
        out_root,
        epochs=epochs,
        arms=arms,
        evals=evals,
        # The torch backend: on the tiny model it has no engine start-up to pay.
        overrides=["scoring.backend=torch", "output.report=false"],
        train=DEMO_TRAINING,
        noise=lambda version_dir: noise_routing(version_dir, truth),
    )
