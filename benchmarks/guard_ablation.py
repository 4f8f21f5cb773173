"""Ablation of ``qtuning.min_prunable_tokens`` on the demo loop (the qtuning arm only).

Runs the demo's dynamic loop (3 epochs, the demo's held-out set and judge, torch scoring) once per
value, everything else at configs/demo.yaml, and prints held-out loss and accuracy per epoch.
Method quality, not speed: one seed per value, so differences of about 2.4 accuracy points are
within the noise (438 judged prompts).

    python benchmarks/guard_ablation.py --values 0 4 16 64 --out out/guard-ablation
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from qtune.demo.assets import DEMO_RECIPE, prepare_demo
from qtune.demo.loop import DEMO_TRAINING, heldout_samples, judge, noise_routing, planted_noise
from qtune.pipeline.compare import eval_set, run_arms
from qtune.pipeline.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--values", type=int, nargs="+", default=[0, 4, 16, 64])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("out/guard-ablation"))
    args = parser.parse_args()
    base = load_config(args.config)
    prepare_demo(Path(base.input.path), Path(base.model.path))
    evals = eval_set(heldout_samples(), base.model, judge, 400)
    truth = planted_noise(DEMO_RECIPE)
    table = {}
    for value in args.values:
        out = args.out / f"min_prunable_{value}"
        shutil.rmtree(out, ignore_errors=True)
        [result] = run_arms(
            args.config,
            out,
            epochs=args.epochs,
            arms=("qtuning",),
            evals=evals,
            overrides=[
                "scoring.backend=torch",
                "output.report=false",
                f"qtuning.min_prunable_tokens={value}",
            ],
            train=DEMO_TRAINING,
            noise=lambda version_dir: noise_routing(version_dir, truth),
        )
        table[value] = [
            {
                "epoch": e.epoch,
                "loss_tokens": e.kept_loss_tokens,
                "heldout_loss": round(e.heldout_loss, 4),
                "accuracy": round(e.accuracy, 4),
            }
            for e in result.epochs
        ]
        print(value, json.dumps(table[value]), flush=True)
    (args.out / "ablation.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
