"""Streaming memory: peak RSS of `qtune run` with a cheap model, on a small and a 10x larger corpus.

Builds (once, cached under .cache/) synthetic demo corpora of each size (`write_demo_corpus`) and
a cheap random Llama (hidden 64, one head of 64, one layer, the demo's 1,024-token vocabulary),
then runs `qtune run` on each as a subprocess (`output.report=false` unless `--report`) while
sampling every process of its tree (the driver, Ray's raylet/GCS/agents, its workers and the
scoring actor) every `--interval` seconds with psutil. Reports, per size, the peak RSS of the
driver, of the scoring actor, of the largest other Ray worker and of the whole tree (the peak of
the per-sample sum; the sum of PSS beside it, which counts shared pages such as the object store
once), the largest input partition, wall time and samples/s, then each ratio larger/smaller
(goal: the larger run's peak within 1.3x of the smaller's). Prints the figures, writes JSON.

`--layouts demo bounded` also runs the same rows laid out differently: `sharegpt.json` (a JSON
array) rewritten as JSON lines, `alpaca.parquet` (one row group) rewritten with row groups of
`input.partition_rows`. Both layouts are split into partitions of at most `input.partition_rows`
rows now (JSON arrays by byte range, Parquet by row range); before that, the demo layout's array
and single-row-group file were one partition each.
The torch backend is the default: on this cheap model a quick check ran the 10k corpus in 28 s
with torch and 56 s with vllm (whose import and engine start alone take ~9 s on CPU, and whose
1 GiB CPU KV cache sits in the actor); `--backend vllm` measures vllm. `qtune run` gets
RAY_ADDRESS=local (unless set), so it never joins another Ray cluster on the machine.

    python benchmarks/streaming_memory.py                        # 10,000 and 100,000 samples
    python benchmarks/streaming_memory.py --layouts demo bounded
    python benchmarks/streaming_memory.py --sizes 3000 30000 --backend vllm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GOAL_RATIO = 1.3
MODEL_RECIPE = {"hidden": 64, "layers": 1, "heads": 1, "vocab": 1024, "seed": 0, "texts": 3000}
MIB = 2**20


def code_state() -> dict:
    """The commit measured, and the files of qtune/ changed since (others edit concurrently)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--short", "--", "qtune")
    return {"commit": git("rev-parse", "HEAD"), "qtune_changed": changed.splitlines()}


def build_model(root: Path) -> Path:
    """The cheap model: random weights (scores carry no signal; only their cost matters here)."""
    from transformers import AutoModelForCausalLM

    from qtune.demo.corpus import training_conversations
    from qtune.demo.model import build_bpe_tokenizer, save_tiny_model, tiny_config

    r = MODEL_RECIPE
    target = root / f"bench-stream-model-h{r['hidden']}-l{r['layers']}"
    stamp = target / "_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == r:
        return target
    shutil.rmtree(target, ignore_errors=True)
    conversations = training_conversations(r["texts"], seed=1)
    tokenizer = build_bpe_tokenizer((m["content"] for c in conversations for m in c), r["vocab"])
    config = tiny_config(
        "llama",
        len(tokenizer),
        hidden_size=r["hidden"],
        num_layers=r["layers"],
        num_heads=r["heads"],
        num_kv_heads=r["heads"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    import torch

    torch.manual_seed(r["seed"])
    save_tiny_model(target, "llama", tokenizer, model=AutoModelForCausalLM.from_config(config))
    stamp.write_text(json.dumps(r))
    return target


def build_corpus(root: Path, samples: int, seed: int) -> Path:
    from qtune.demo.corpus import write_demo_corpus

    target = root / f"bench-stream-corpus-{samples}-s{seed}"
    stamp = target / "_done.json"
    if not stamp.is_file():
        shutil.rmtree(target, ignore_errors=True)
        write_demo_corpus(target, n_samples=samples, seed=seed)
        stamp.write_text(json.dumps({"samples": samples, "seed": seed}))
    return target


def bounded_layout(demo: Path, partition_rows: int) -> Path:
    """The same rows as ``demo``, in files that partition into at most ``partition_rows`` rows."""
    import pyarrow.parquet as pq

    target = demo.with_name(f"{demo.name}-bounded{partition_rows}")
    stamp = target / "_done.json"
    if stamp.is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in demo.iterdir():
        if path.name == "sharegpt.json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            with (target / "sharegpt.jsonl").open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        elif path.suffix == ".parquet":
            pq.write_table(
                pq.read_table(path),
                target / path.name,
                row_group_size=partition_rows,
                compression="zstd",
            )
        elif path.name != "_done.json":
            shutil.copy2(path, target / path.name)
    stamp.write_text(json.dumps({"from": str(demo), "partition_rows": partition_rows}))
    return target


def partition_plan(config: Path, corpus: Path, model: Path) -> dict:
    """How the driver will partition ``corpus``: count and the largest partition, per file."""
    from qtune.pipeline.config import load_config
    from qtune.pipeline.score_job import plan_input, preflight

    cfg = load_config(
        config, [f"input.path={corpus}", f"model.path={model}", "scoring.backend=torch"]
    )
    plan = plan_input(cfg, preflight(cfg))
    per_file: dict[str, dict] = {}
    for part in plan.partitions:
        entry = per_file.setdefault(Path(part["source"]).name, {"partitions": 0, "largest": 0})
        entry["partitions"] += 1
        entry["largest"] = max(entry["largest"], part["row_count"])
    largest = max(plan.partitions, key=lambda part: part["row_count"])
    return {
        "partitions": len(plan.partitions),
        "largest_rows": largest["row_count"],
        "largest_file": Path(largest["source"]).name,
        "per_file": per_file,
    }


def role(proc, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "driver"
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:  # gone, or unreadable
        return "other"
    if "MapBatches(Score)" in cmdline and "Tokenize" not in cmdline:
        return "scoring_actor"
    if cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "ray_system"
    # A worker shows default_worker.py until Ray retitles it (ray::IDLE, ray::MapWorker(...)).
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "ray_worker"
    return "ray_system"


class TreeSampler:
    """Samples RSS and PSS of a process and its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.samples = 0
        self.peak_tree_rss = 0
        self.peak_tree_pss = 0
        self.peak_processes = 0
        self.peak_tree_rss_at_s = 0.0
        self.started = time.perf_counter()
        self.peak_by_pid: dict[int, dict] = {}  # pid -> role, peak rss, peak pss, title
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except self.psutil.Error:
            return
        tree_rss = tree_pss = 0
        for proc in procs:
            try:
                info = proc.memory_full_info()
            except self.psutil.Error:
                continue
            tree_rss += info.rss
            tree_pss += info.pss
            entry = self.peak_by_pid.get(proc.pid)
            if entry is None:
                entry = self.peak_by_pid[proc.pid] = {"role": "other", "rss": 0, "pss": 0, "uss": 0}
            if entry["role"] in ("ray_worker", "other"):
                # A worker becomes the scoring actor after it starts: re-check until it has.
                kind = role(proc, self.root.pid)
                if kind != "other":  # "other": gone or unreadable now; keep what was seen
                    entry["role"] = kind
                try:
                    entry["title"] = " ".join(proc.cmdline())[:120]
                except self.psutil.Error:
                    pass
            if info.rss > entry["rss"]:
                entry["rss_peak_at_s"] = time.perf_counter() - self.started
            entry["rss"] = max(entry["rss"], info.rss)
            entry["pss"] = max(entry["pss"], info.pss)
            entry["uss"] = max(entry["uss"], info.uss)
        self.samples += 1
        if tree_rss > self.peak_tree_rss:
            self.peak_tree_rss_at_s = time.perf_counter() - self.started
        self.peak_tree_rss = max(self.peak_tree_rss, tree_rss)
        self.peak_tree_pss = max(self.peak_tree_pss, tree_pss)
        self.peak_processes = max(self.peak_processes, len(procs))

    def peak(self, kind: str, key: str = "rss") -> int:
        return max((e[key] for e in self.peak_by_pid.values() if e["role"] == kind), default=0)


def run_size(
    config: Path, corpus: Path, model: Path, backend: str, report: bool, interval: float, tmp: Path
) -> dict:
    out_dir = tmp / f"out-{corpus.name}"
    log_path = tmp / f"{corpus.name}.log"
    local = Path(sys.executable).parent / "qtune"
    command = [str(local) if local.is_file() else "qtune", "run", str(config)]
    for item in (
        f"input.path={corpus}",
        f"model.path={model}",
        f"output.dir={out_dir}",
        f"scoring.backend={backend}",
        f"output.report={'true' if report else 'false'}",
    ):
        command += ["--set", item]
    started = time.perf_counter()
    with log_path.open("w") as log:
        # Embedded Ray, never a cluster another process left in /tmp/ray/ray_current_cluster.
        env = {"RAY_ADDRESS": "local", **os.environ}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeSampler(process.pid, interval) as sampler:
            code = process.wait()
    wall = time.perf_counter() - started
    if code:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"qtune run failed ({code}); log {log_path}:\n{tail}")
    summary = json.loads((out_dir / "scores/epoch_000/_summary.json").read_text())
    manifest = json.loads((out_dir / "data/epoch_000/manifest.json").read_text())
    stages = manifest["stages"]["scoring"] + manifest["stages"]["triage"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "corpus": str(corpus),
        "rows": summary["rows"],
        "scored": summary["scored"],
        "tokens": summary["tokens"],
        "partitions": summary["partitions"],
        "wall_s": wall,
        "samples_per_s": summary["rows"] / wall,
        "stages": {s["stage"]: s["seconds"] for s in stages},
        "samples_taken": sampler.samples,
        "peak_processes": sampler.peak_processes,
        "peak_tree_rss_at_s": sampler.peak_tree_rss_at_s,
        "peak_mib": {
            "driver_rss": sampler.peak("driver") / MIB,
            "scoring_actor_rss": sampler.peak("scoring_actor") / MIB,
            "ray_worker_rss_max": sampler.peak("ray_worker") / MIB,
            "ray_system_rss_max": sampler.peak("ray_system") / MIB,
            "tree_rss_sum": sampler.peak_tree_rss / MIB,
            "tree_pss_sum": sampler.peak_tree_pss / MIB,
            "driver_pss": sampler.peak("driver", "pss") / MIB,
            "scoring_actor_pss": sampler.peak("scoring_actor", "pss") / MIB,
            "driver_uss": sampler.peak("driver", "uss") / MIB,
            "scoring_actor_uss": sampler.peak("scoring_actor", "uss") / MIB,
            "ray_worker_uss_max": sampler.peak("ray_worker", "uss") / MIB,
        },
        "processes": sorted(
            (
                {
                    "pid": pid,
                    "role": e["role"],
                    "title": e.get("title", ""),
                    "peak_rss_mib": e["rss"] / MIB,
                    "peak_pss_mib": e["pss"] / MIB,
                    "peak_uss_mib": e["uss"] / MIB,
                    "peak_rss_at_s": e.get("rss_peak_at_s"),
                }
                for pid, e in sampler.peak_by_pid.items()
            ),
            key=lambda p: -p["peak_rss_mib"],
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--backend", choices=["vllm", "torch"], default="torch")
    parser.add_argument("--layouts", nargs="+", choices=["demo", "bounded"], default=["demo"])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--report", action="store_true", help="also write the version's report")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/streaming_memory.json")
    )
    args = parser.parse_args()

    import psutil  # noqa: F401  (fail early if it is missing)

    from qtune.pipeline.config import load_config

    partition_rows = load_config(args.config).input.partition_rows
    cache = Path(".cache")
    started = time.perf_counter()
    model = build_model(cache).absolute()
    sizes = sorted(args.sizes)
    corpora: dict[str, dict[int, Path]] = {}
    for layout in args.layouts:
        for n in sizes:
            corpus = build_corpus(cache, n, args.seed).absolute()
            if layout == "bounded":
                corpus = bounded_layout(corpus, partition_rows)
            corpora.setdefault(layout, {})[n] = corpus
    print(f"model and corpora ready in {time.perf_counter() - started:.0f} s: {model}")

    results: dict[str, dict] = {}
    keys = ("driver_rss", "scoring_actor_rss", "ray_worker_rss_max", "tree_rss_sum", "tree_pss_sum")
    with tempfile.TemporaryDirectory(prefix="qtune-memory-") as tmp:
        for layout, by_size in corpora.items():
            runs = {}
            for n, corpus in by_size.items():
                plan = partition_plan(args.config, corpus, model)
                run = run_size(
                    args.config, corpus, model, args.backend, args.report, args.interval, Path(tmp)
                )
                run["plan"] = plan
                runs[str(n)] = run
                peak = run["peak_mib"]
                print(
                    f"[{layout}] {n:>9,} samples: {run['wall_s']:6.1f} s, "
                    f"{run['samples_per_s']:5.0f} samples/s; peak RSS MiB: driver "
                    f"{peak['driver_rss']:5.0f}, scoring actor {peak['scoring_actor_rss']:5.0f}, "
                    f"largest other worker {peak['ray_worker_rss_max']:5.0f}, tree "
                    f"{peak['tree_rss_sum']:5.0f} (PSS {peak['tree_pss_sum']:5.0f}); "
                    f"{plan['partitions']} partitions, largest {plan['largest_rows']:,} rows "
                    f"({plan['largest_file']})"
                )
            small, large = runs[str(sizes[0])], runs[str(sizes[-1])]
            ratios = {
                k: large["peak_mib"][k] / small["peak_mib"][k] for k in keys if small["peak_mib"][k]
            }
            results[layout] = {
                "runs": runs,
                "ratios_large_over_small": ratios,
                "goal_met": {k: v <= GOAL_RATIO for k, v in ratios.items()},
                "wall_ratio": large["wall_s"] / small["wall_s"],
            }
            print(f"[{layout}] ratio {sizes[-1]:,} / {sizes[0]:,} samples (goal <= {GOAL_RATIO}x):")
            for k, v in ratios.items():
                print(f"  {k:<20} {v:5.2f}x  {'met' if v <= GOAL_RATIO else 'NOT met'}")
            print(
                f"  wall time ratio {results[layout]['wall_ratio']:.2f}x for "
                f"{sizes[-1] / sizes[0]:.0f}x the samples"
            )
    result = {
        "backend": args.backend,
        "code": code_state(),
        "model": str(model),
        "model_recipe": MODEL_RECIPE,
        "sizes": sizes,
        "report": args.report,
        "interval_s": args.interval,
        "partition_rows": partition_rows,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "goal_ratio": GOAL_RATIO,
        "layouts": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
