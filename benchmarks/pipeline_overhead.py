"""Pipeline overhead: the full `qtune run` on the demo corpus versus the model forward alone.

Each round of this one run does, in turn:

(a) `qtune run CONFIG` end to end as a subprocess into a fresh temporary output dir: wall time,
    per-stage seconds from the published manifest (`stages`) and the scored cache's
    `_summary.json`, and a timeline from known log lines (their arrival times here, and the
    timestamps of Ray Data's own log of the run);
(b) the model forward alone: the same backend, options and token ids (read back from (a)'s scored
    cache, plus the repeated sample_ids the pipeline scored and then moved to the rejects), in the
    same windows of `scoring.batch_size` rows, in a spawned child process without Ray, with the
    scoring actor's thread count (`ScoringOptions.num_threads` as the pipeline sets it) and,
    unless `--no-all-cores`, once more with every core. Imports, engine start and forward are
    timed apart;
(c) read + tokenisation alone, in a spawned child with one thread (as a Ray task gets), and the
    driver's preflight + input planning; and the tokenizer's load in a fresh process (as in each
    Ray worker that tokenises), through qtune's `load_tokenizer` and through `AutoTokenizer`.

The overhead share is the part of (a)'s wall time not spent in the forward:
`(wall - forward - start-up) / wall` and `(wall - forward) / wall` (goal: under 15%). Each figure
is the best (minimum) over the rounds. `--prototype` also runs (a), in every round beside the
baseline (a different run first in each round), with a fix the figures point to applied from
outside qtune (see PROTOTYPES below) and reports its wall time against the baseline's.
`--baseline-ref REF` does the same with the files `--baseline-path` names (default: all of
qtune/) as they were at git REF, the rest of qtune/ as in this checkout: a before/after of a
change in one run. (a) runs with RAY_ADDRESS=local (unless set), so that it never joins another
Ray cluster on the machine. Prints the figures, writes them as JSON.

    python benchmarks/pipeline_overhead.py                    # vllm, configs/demo.yaml, 2 rounds
    python benchmarks/pipeline_overhead.py --backend torch --rounds 3
    python benchmarks/pipeline_overhead.py --rounds 3 --prototype all-core-actor \
        --baseline-ref HEAD --baseline-path qtune/stages/score \
        --baseline-path qtune/stages/tokenize.py
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

GOAL_SHARE = 0.15

# Events of a run: (name, pattern of the log line that marks it, what happened). Times are the
# arrival times of the lines here; lines of Ray workers come through Ray's log monitor, up to ~1 s
# late. "first_score_task" comes from the timestamps of Ray Data's own log file instead.
MARKERS: list[tuple[str, re.Pattern | None, str]] = [
    (
        "ray_init",
        re.compile(r"Token authentication is enabled|Started a local Ray instance"),
        "ray.init starts (after CLI start-up, preflight, plan input)",
    ),
    ("dataset_start", re.compile(r"Starting execution of Dataset"), "Ray Data execution starts"),
    (
        "engine_begin",
        re.compile(r"non-default args"),
        "scoring actor: vLLM imported, engine construction begins",
    ),
    ("engine_ready", re.compile(r"Supported pooling task"), "scoring actor: engine ready"),
    (
        "first_score_task",
        None,
        "first tokenised partition handed to the scoring actor",
    ),
    ("dataset_done", re.compile(r"Dataset \S+ execution finished"), "scoring stream done"),
    (
        "scores_published",
        re.compile(r"^qtune score\b"),
        "scores finished + published, Ray shut down",
    ),
    ("published", re.compile(r"^published: "), "triage done, version published"),
    ("exit", None, "report written, process exited"),
]
STAGE_ROW = re.compile(r"^[│┃|]\s*(?P<stage>[a-z][a-z ,()]+?)\s*[│┃|]\s*(?P<s>[\d,.]+) s\s*[│┃|]")
RAY_DATA_DIR = re.compile(r"Full logs are in (\S+)")
FIRST_SCORE_TASK = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}).*Executing map task of operator MapBatches\(Score\)"
)


# PROTOTYPES of the fixes this benchmark points to, applied to (a) without editing qtune. Applied
# since: eager-engine (the Score stage starts its backend in its constructor) and the backends'
# explicit thread count (ScoringOptions.num_threads; None = every core).
# - all-core-actor: a `sitecustomize` on PYTHONPATH (Ray workers inherit the driver's
#   environment) makes `score_job.scoring_options` leave `num_threads` unset, so the scoring
#   actor (1 CPU reserved in Ray, so that tokenisation tasks still run beside it) runs its forward
#   on every core: what a `scoring.cpu_threads` knob defaulting to every core would do.
PROTOTYPE_SHIM = """\
import dataclasses
import importlib.machinery
import os
import sys


class _AllCoreActor:
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "qtune.pipeline.score_job":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            scoring_options = module.scoring_options

            def every_core(*args, **kwargs):
                return dataclasses.replace(scoring_options(*args, **kwargs), num_threads=None)

            module.scoring_options = every_core

        spec.loader.exec_module = patched
        return spec


if os.environ.get("QTUNE_PROTOTYPE_ALL_CORE_ACTOR"):
    sys.meta_path.insert(0, _AllCoreActor())
"""
PROTOTYPES = ("all-core-actor",)


def prototype_env(name: str, shim_dir: Path) -> dict[str, str]:
    """Environment of (a) for a prototype (several may be joined by +)."""
    env: dict[str, str] = {}
    for part in name.split("+"):
        if part not in PROTOTYPES:
            raise SystemExit(f"unknown prototype {part!r}; valid: {', '.join(PROTOTYPES)}")
        shim_dir.mkdir(exist_ok=True)
        (shim_dir / "sitecustomize.py").write_text(PROTOTYPE_SHIM)
        path = os.environ.get("PYTHONPATH")
        env["PYTHONPATH"] = str(shim_dir) + (os.pathsep + path if path else "")
        env[f"QTUNE_PROTOTYPE_{part.upper().replace('-', '_')}"] = "1"
    return env


def prototype_threads(name: str, actor_threads: int) -> int:
    return os.cpu_count() or 1 if "all-core-actor" in name.split("+") else actor_threads


def baseline_tree(ref: str, paths: list[str], into: Path) -> Path:
    """A copy of this checkout's qtune/ with ``paths`` as at git ``ref`` (for (a) to import).

    (a) then runs in ``into`` (Ray workers import from the driver's working directory), which
    links this checkout's configs/ and .cache/ (the demo assets).
    """
    outside = [p for p in paths if Path(p).parts[:1] != ("qtune",)]
    if outside:
        raise SystemExit(f"--baseline-path must name files under qtune/, not {outside}")
    shutil.copytree("qtune", into / "qtune", ignore=shutil.ignore_patterns("__pycache__"))
    for path in paths:  # files added since ref must go too
        target = into / path
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "--", *paths],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    for name in ("configs", ".cache"):
        (into / name).symlink_to(Path(name).absolute())
    return into


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


def qtune_command() -> str:
    local = Path(sys.executable).parent / "qtune"
    return str(local) if local.is_file() else shutil.which("qtune") or "qtune"


def _first_score_task(ray_data_dir: str | None, spawned_at: float) -> float | None:
    """Seconds from the subprocess start to the first Score block handed to the actor."""
    if ray_data_dir is None:
        return None
    for path in sorted(Path(ray_data_dir).glob("ray-data-dataset_*.log")):
        for line in path.read_text(errors="replace").splitlines():
            match = FIRST_SCORE_TASK.match(line)
            if match:
                stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                return stamp - spawned_at
    return None


def run_pipeline(
    config: Path,
    overrides: list[str],
    out_dir: Path,
    log_path: Path,
    extra_env: dict[str, str],
    tree: Path | None = None,
) -> dict:
    """(a): `qtune run` as a subprocess; wall time, marker times, the printed stage table.

    ``tree``: import qtune from there (a ``baseline_tree``) and run in it.
    """
    command = [qtune_command(), "run", str(config)]
    for item in [*overrides, f"output.dir={out_dir}"]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra_env}
    # Embedded Ray must not join another cluster on this machine: ray.init() without an address
    # connects to the one whose address a `ray start` (or a test's ray.cluster_utils.Cluster)
    # left in /tmp/ray/ray_current_cluster, and dies with it.
    env.setdefault("RAY_ADDRESS", "local")
    if tree is not None:
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(tree) + (os.pathsep + path if path else "")
    patterns = {name: pattern for name, pattern, _ in MARKERS if pattern is not None}
    markers: dict[str, float] = {}
    printed: dict[str, float] = {}
    in_stage_table = False
    ray_data_dir = None
    spawned_at = time.time()
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=tree,
        )
        assert process.stdout is not None
        for line in process.stdout:
            now = time.perf_counter() - started
            log.write(line)
            for name, pattern in patterns.items():
                if name not in markers and pattern.search(line):
                    markers[name] = now
            ray_data_dir = ray_data_dir or next(iter(RAY_DATA_DIR.findall(line)), None)
            in_stage_table = in_stage_table or line.startswith("stage timings")
            match = STAGE_ROW.match(line.strip()) if in_stage_table else None
            if match:
                printed[match["stage"]] = float(match["s"].replace(",", ""))
        code = process.wait()
    wall = time.perf_counter() - started
    if code:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"qtune run failed ({code}); log {log_path}:\n{tail}")
    first_task = _first_score_task(ray_data_dir, spawned_at)
    if first_task is not None:
        markers["first_score_task"] = first_task
    markers["exit"] = wall
    manifest = json.loads((out_dir / "data/epoch_000/manifest.json").read_text())
    summary = json.loads((out_dir / "scores/epoch_000/_summary.json").read_text())
    stages = [
        {"stage": s["stage"], "seconds": s["seconds"], "rows": s.get("rows")}
        for s in manifest["stages"]["scoring"] + manifest["stages"]["triage"]
    ]
    known = {s["stage"] for s in stages}
    # Stages only the printed table holds (timed after the manifest was written).
    stages += [
        {"stage": k, "seconds": v, "rows": None} for k, v in printed.items() if k not in known
    ]
    return {
        "wall_s": wall,
        "stages": stages,
        "score_summary_seconds": summary["seconds"],
        "scored": summary["scored"],
        "rows": summary["rows"],
        "tokens": summary["tokens"],
        "markers": markers,
    }


def timeline(markers: dict[str, float]) -> list[dict]:
    """The events that were seen, in time order, with the time since the previous one."""
    labels = {name: label for name, _, label in MARKERS}
    events, previous = [], 0.0
    for name, at in sorted(markers.items(), key=lambda item: item[1]):
        events.append({"event": name, "what": labels[name], "at_s": at, "since_s": at - previous})
        previous = at
    return events


def forward_windows(out_dir: Path, batch_size: int) -> tuple[list[list], dict]:
    """The token ids the scoring actor saw, in its windows (partition, row_index // batch_size).

    The scored cache holds every scored row except the repeated sample_ids, which are scored and
    only then moved to the rejects: they are put back (same ids as their first occurrence).
    """
    import numpy as np
    import pyarrow.parquet as pq

    parts: list[dict] = []
    by_id: dict[str, np.ndarray] = {}
    for path in sorted((out_dir / "scores/epoch_000").glob("part-*.parquet")):
        table = pq.read_table(path, columns=["sample_id", "source", "row_index", "input_ids"])
        ids = [np.asarray(x, dtype=np.int32) for x in table.column("input_ids").to_pylist()]
        rows = table.column("row_index").to_pylist()
        by_id.update(zip(table.column("sample_id").to_pylist(), ids, strict=True))
        parts.append(
            {
                "source": table.column("source")[0].as_py() if len(table) else None,
                "lo": min(rows, default=0),
                "hi": max(rows, default=-1),
                "rows": list(zip(rows, ids, strict=True)),
            }
        )
    duplicates = 0
    for path in sorted((out_dir / "rejects/epoch_000").glob("*.parquet")):
        table = pq.read_table(path, columns=["sample_id", "source", "row_index", "reason"])
        for row in table.to_pylist():
            if row["reason"] != "duplicate_sample_id" or row["sample_id"] not in by_id:
                continue
            candidates = [p for p in parts if p["source"] == row["source"]]
            if not candidates:
                continue
            inside = [p for p in candidates if p["lo"] <= row["row_index"] <= p["hi"]]
            (inside or candidates)[-1]["rows"].append((row["row_index"], by_id[row["sample_id"]]))
            duplicates += 1
    windows: list[list] = []
    for part in parts:
        current: dict[int, list] = {}
        for row_index, ids in sorted(part["rows"], key=lambda r: r[0]):
            current.setdefault(row_index // batch_size, []).append(ids)
        windows += list(current.values())
    samples = sum(len(w) for w in windows)
    tokens = int(sum(len(s) for w in windows for s in w))
    return windows, {"samples": samples, "tokens": tokens, "duplicates_added": duplicates}


def _forward_child(backend: str, options, windows: list[list], threads: int, queue) -> None:
    """(b), in a fresh process: imports, engine start, one cold and one warm pass."""
    try:
        started = time.perf_counter()
        if backend == "vllm":
            from vllm import LLM  # noqa: F401  (what VllmBackend imports first)
        else:
            import transformers  # noqa: F401
        from qtune.stages.score import create_backend

        import_s = time.perf_counter() - started
        tick = time.perf_counter()
        engine = create_backend(backend, replace(options, num_threads=threads))
        engine_s = time.perf_counter() - tick
        passes = []
        for _ in range(2):
            tick = time.perf_counter()
            for window in windows:
                engine.score(window)
            passes.append(time.perf_counter() - tick)
        engine.close()
        queue.put(
            {
                "threads": threads,
                "import_s": import_s,
                "engine_s": engine_s,
                "startup_s": import_s + engine_s,
                "forward_s": passes[0],
                "forward_warm_s": passes[1],
            }
        )
    except BaseException as e:  # the parent reports it
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def _tokenize_child(config: Path, overrides: list[str], queue) -> None:
    """(c), in a fresh process: the driver's preflight + planning, then read + tokenise."""
    try:
        import pyarrow as pa

        started = time.perf_counter()
        from qtune.pipeline.config import load_config
        from qtune.pipeline.score_job import plan_input, preflight
        from qtune.stages import ingest
        from qtune.stages.tokenize import Tokenize, resolve_chat_template

        import_s = time.perf_counter() - started
        cfg = load_config(config, overrides)
        tick = time.perf_counter()
        import torch  # noqa: F401  (preflight imports it to ask for a GPU before vLLM checks)

        torch_import_s = time.perf_counter() - tick
        sources = preflight(cfg)
        preflight_s = time.perf_counter() - tick
        tick = time.perf_counter()
        plan = plan_input(cfg, sources)
        plan_s = time.perf_counter() - tick
        read = ingest.ReadPartitions(cfg.input.batch_rows, cfg.input.split)
        tokenize = Tokenize(
            str(Path(cfg.model.path).absolute()),
            cfg.model.max_length,
            resolve_chat_template(cfg.model.chat_template),
            cfg.model.overlength,
        )
        read_s, tokenize_s, per_partition, rows = 0.0, 0.0, [], 0
        for partition in plan.partitions:
            item = pa.table({"partition": [json.dumps(partition, sort_keys=True)]})
            tick = time.perf_counter()
            (table,) = list(read(item))
            read_s += (split := time.perf_counter()) - tick
            tokenize(table)
            tokenize_s += (done := time.perf_counter()) - split
            per_partition.append({"rows": table.num_rows, "seconds": done - tick})
            rows += table.num_rows
        queue.put(
            {
                "import_s": import_s,
                "preflight_s": preflight_s,
                "torch_import_s": torch_import_s,
                "plan_s": plan_s,
                "read_s": read_s,
                "tokenize_s": tokenize_s,
                "rows": rows,
                "partitions": per_partition,
            }
        )
    except BaseException as e:  # the parent reports it
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def _tokenizer_load_child(model_path: str, chat_template: str | None, how: str, queue) -> None:
    """(c), in a fresh process (as a Ray worker's first tokenisation): the tokenizer's load,
    through qtune's ``load_tokenizer`` or, as it was done before, ``AutoTokenizer``."""
    try:
        started = time.perf_counter()
        if how == "qtune":
            from qtune.stages.tokenize import load_tokenizer

            tokenizer = load_tokenizer(model_path, chat_template)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_path)
        queue.put(
            {
                "seconds": time.perf_counter() - started,
                "class": type(tokenizer).__name__,
                "torch_imported": "torch" in sys.modules,
            }
        )
    except BaseException as e:  # the parent reports it
        queue.put({"error": f"{type(e).__name__}: {e}"})
        raise


def in_child(target, args: tuple, threads: int) -> dict:
    """Run ``target(*args, queue)`` in a spawned process with OMP_NUM_THREADS=threads."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # Ray sets it to a task's/actor's num_cpus
    try:
        child = context.Process(target=target, args=(*args, queue))
        child.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    result = queue.get()
    child.join()
    if "error" in result:
        raise SystemExit(f"{target.__name__} failed: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--backend", choices=["vllm", "torch"], default="vllm")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (a), (b), (c)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--no-all-cores", action="store_true", help="(b) only with the actor's thread count"
    )
    parser.add_argument(
        "--prototype",
        action="append",
        default=[],
        metavar="NAME",
        help=f"also run (a) with a prototype fix, alternating with the baseline: "
        f"{', '.join(PROTOTYPES)}, or several joined by +",
    )
    parser.add_argument(
        "--baseline-ref",
        metavar="REF",
        help="also run (a) with the --baseline-path files as at git REF (e.g. HEAD): before/after",
    )
    parser.add_argument(
        "--baseline-path",
        action="append",
        default=[],
        metavar="PATH",
        help="files or folders under qtune/ that --baseline-ref takes from REF (default: qtune)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="environment of (a), e.g. VLLM_CPU_KVCACHE_SPACE=2",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/pipeline_overhead.json")
    )
    args = parser.parse_args()

    from qtune.demo.assets import prepare_demo
    from qtune.pipeline.config import load_config
    from qtune.pipeline.score_job import scoring_options
    from qtune.stages.score import cpu_threads
    from qtune.stages.tokenize import resolve_chat_template

    overrides = [f"scoring.backend={args.backend}", *args.overrides]
    cfg = load_config(args.config, overrides)
    started = time.perf_counter()
    prepare_demo(Path(cfg.input.path), Path(cfg.model.path))  # cached in .cache/demo
    print(f"demo assets ready in {time.perf_counter() - started:.1f} s")
    options = scoring_options(cfg)
    extra_env = dict(item.split("=", 1) for item in args.env)
    # The backends set their thread count from the options (Ray's OMP_NUM_THREADS aside).
    actor_threads = cpu_threads(options.num_threads)
    model_path = str(Path(cfg.model.path).absolute())
    chat_template = resolve_chat_template(cfg.model.chat_template)
    config = args.config.absolute()
    thread_counts = [actor_threads]
    if not args.no_all_cores and (os.cpu_count() or 1) != actor_threads:
        thread_counts.append(os.cpu_count() or 1)

    rounds: list[dict] = []
    windows: list[list] | None = None
    workload: dict = {}
    with tempfile.TemporaryDirectory(prefix="qtune-overhead-") as tmp:
        # The runs of (a): (name, environment, tree to import qtune from, actor threads).
        runs: list[tuple[str, dict[str, str], Path | None, int]] = [
            ("baseline", extra_env, None, actor_threads)
        ]
        for name in args.prototype:
            env = {**extra_env, **prototype_env(name, Path(tmp) / "shim")}
            runs.append((name, env, None, prototype_threads(name, actor_threads)))
        if args.baseline_ref:
            paths = args.baseline_path or ["qtune"]
            tree = baseline_tree(args.baseline_ref, paths, Path(tmp) / "baseline-tree")
            runs.append((f"{args.baseline_ref}:{','.join(paths)}", extra_env, tree, actor_threads))
        for index in range(args.rounds):
            variants = {}
            # A different run goes first in each round: the machine warms up (page cache, CPU
            # clock) over a round.
            for name, env, tree, threads in runs[index % len(runs) :] + runs[: index % len(runs)]:
                out_dir = Path(tmp) / f"run-{index}-{len(variants)}"
                log_path = Path(tmp) / f"run-{index}-{len(variants)}.log"
                got = run_pipeline(config, overrides, out_dir, log_path, env, tree)
                got["threads"] = threads
                variants[name] = got
                print(f"round {index + 1}: (a) qtune run, {name}: {got['wall_s']:.1f} s")
                if windows is None and name == "baseline":
                    windows, workload = forward_windows(out_dir, cfg.scoring.batch_size)
                shutil.rmtree(out_dir, ignore_errors=True)
            run = variants.pop("baseline")
            forward = {}
            for threads in thread_counts:
                f = in_child(_forward_child, (args.backend, options, windows, threads), threads)
                forward[str(threads)] = f
                print(
                    f"round {index + 1}: (b) forward, {threads} thread(s): {f['forward_s']:.2f} s "
                    f"(warm pass {f['forward_warm_s']:.2f} s); start-up {f['startup_s']:.1f} s "
                    f"(imports {f['import_s']:.1f} s + engine {f['engine_s']:.1f} s)"
                )
            tok = in_child(_tokenize_child, (args.config, overrides), 1)
            for how in ("qtune", "auto"):
                load = in_child(_tokenizer_load_child, (model_path, chat_template, how), 1)
                tok[f"tokenizer_load_{how}_s"] = load["seconds"]
            print(
                f"round {index + 1}: (c) read {tok['read_s']:.2f} s + tokenise "
                f"{tok['tokenize_s']:.2f} s for {tok['rows']:,} rows; preflight "
                f"{tok['preflight_s']:.2f} s + plan {tok['plan_s']:.2f} s; tokenizer load "
                f"{tok['tokenizer_load_qtune_s']:.2f} s (AutoTokenizer "
                f"{tok['tokenizer_load_auto_s']:.2f} s)"
            )
            rounds.append({"run": run, "variants": variants, "forward": forward, "tokenize": tok})

    best = min(rounds, key=lambda r: r["run"]["wall_s"])["run"]
    wall = best["wall_s"]

    def best_forward(threads: int, key: str) -> float:
        return min(r["forward"][str(threads)][key] for r in rounds)

    def best_tokenize(key: str) -> float:
        return min(r["tokenize"][key] for r in rounds)

    forward_s = best_forward(actor_threads, "forward_s")
    startup_s = best_forward(actor_threads, "startup_s")
    tokenize = {
        k: best_tokenize(k)
        for k in (
            "import_s",
            "preflight_s",
            "torch_import_s",
            "plan_s",
            "read_s",
            "tokenize_s",
            "tokenizer_load_qtune_s",
            "tokenizer_load_auto_s",
        )
    }
    result = {
        "config": str(args.config),
        "code": code_state(),
        "backend": args.backend,
        "overrides": overrides,
        "env": extra_env,
        "rounds": args.rounds,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "workload": {**workload, "pipeline_rows": best["rows"], "pipeline_scored": best["scored"]},
        "scoring_batch_size": cfg.scoring.batch_size,
        "actor_threads": actor_threads,
        "wall_s": wall,
        "forward_s": forward_s,
        "forward_warm_s": best_forward(actor_threads, "forward_warm_s"),
        "import_s": best_forward(actor_threads, "import_s"),
        "engine_s": best_forward(actor_threads, "engine_s"),
        "startup_s": startup_s,
        "overhead_share_excl_startup": (wall - forward_s - startup_s) / wall,
        "overhead_share": (wall - forward_s) / wall,
        "goal_share": GOAL_SHARE,
        "stages": best["stages"],
        "outside_stages_s": wall - sum(s["seconds"] for s in best["stages"]),
        "timeline": timeline(best["markers"]),
        "forward_by_threads": {
            str(t): {k: best_forward(t, k) for k in ("forward_s", "forward_warm_s", "startup_s")}
            for t in thread_counts
        },
        "read_tokenize_1_thread": tokenize,
        "rates_samples_per_s": {
            "pipeline_end_to_end": workload["samples"] / wall,
            "forward_actor_threads": workload["samples"] / forward_s,
            "read_tokenize_1_thread": best["rows"] / (tokenize["read_s"] + tokenize["tokenize_s"]),
        },
        "rounds_detail": rounds,
    }
    result["goal_met"] = result["overhead_share"] < GOAL_SHARE
    # Every other run of (a): the prototypes and the --baseline-ref tree.
    result["prototypes"] = {}
    for name in rounds[0]["variants"]:
        v_best = min((r["variants"][name] for r in rounds), key=lambda v: v["wall_s"])
        threads = v_best["threads"]
        v_forward = best_forward(threads, "forward_s") if threads in thread_counts else forward_s
        result["prototypes"][name] = {
            "wall_s": v_best["wall_s"],
            "wall_ratio_to_baseline": v_best["wall_s"] / wall,
            "speedup": wall / v_best["wall_s"],
            "actor_threads": threads,
            "forward_s": v_forward,
            "overhead_share": (v_best["wall_s"] - v_forward) / v_best["wall_s"],
            "stages": v_best["stages"],
            "timeline": timeline(v_best["markers"]),
        }

    print(
        f"\nworkload: {workload['samples']:,} samples scored, {workload['tokens']:,} tokens "
        f"({args.backend}, batch {cfg.scoring.batch_size}; best of {args.rounds} rounds)"
    )
    print(f"qtune run wall time               {wall:7.2f} s")
    print(
        f"forward alone, {actor_threads} thread (actor)    {forward_s:7.2f} s  "
        f"(warm pass {result['forward_warm_s']:.2f} s)"
    )
    for t, f in result["forward_by_threads"].items():
        if t != str(actor_threads):
            print(
                f"forward alone, {t} threads          {f['forward_s']:7.2f} s  "
                f"(warm pass {f['forward_warm_s']:.2f} s)"
            )
    print(
        f"engine start-up                   {startup_s:7.2f} s  (imports "
        f"{result['import_s']:.2f} s + engine construction {result['engine_s']:.2f} s)"
    )
    print(
        f"read + tokenise, 1 thread         {tokenize['read_s'] + tokenize['tokenize_s']:7.2f} s"
        f"  (read {tokenize['read_s']:.2f} s, tokenise {tokenize['tokenize_s']:.2f} s)"
    )
    print(
        f"driver preflight + plan input     {tokenize['preflight_s'] + tokenize['plan_s']:7.2f} s"
        f"  (preflight {tokenize['preflight_s']:.2f} s of which import torch "
        f"{tokenize['torch_import_s']:.2f} s, plan {tokenize['plan_s']:.2f} s)"
    )
    print(
        f"tokenizer load, fresh process     {tokenize['tokenizer_load_qtune_s']:7.2f} s"
        f"  (AutoTokenizer {tokenize['tokenizer_load_auto_s']:.2f} s)"
    )
    print(
        f"overhead (wall - forward - start-up) / wall  {result['overhead_share_excl_startup']:6.1%}"
    )
    print(
        f"overhead (wall - forward) / wall             {result['overhead_share']:6.1%}  "
        f"(goal < {GOAL_SHARE:.0%}: {'met' if result['goal_met'] else 'NOT met'})"
    )
    rates = result["rates_samples_per_s"]
    print(
        f"samples/s: end to end {rates['pipeline_end_to_end']:,.0f}, forward "
        f"{rates['forward_actor_threads']:,.0f}, read + tokenise "
        f"{rates['read_tokenize_1_thread']:,.0f}"
    )
    print("per stage (manifest; publish and report from the printed table):")
    for s in best["stages"]:
        print(f"  {s['stage']:<30} {s['seconds']:7.2f} s  {s['seconds'] / wall:6.1%}")
    outside = result["outside_stages_s"]
    print(f"  {'outside every stage':<30} {outside:7.2f} s  {outside / wall:6.1%}")
    print("timeline of the run (seconds since start; log arrival, Ray Data log):")
    for event in result["timeline"]:
        print(
            f"  {event['at_s']:6.2f} s (+{event['since_s']:5.2f} s)  {event['event']:<17} "
            f"{event['what']}"
        )
    for name, proto in result["prototypes"].items():
        print(
            f"variant {name}: wall {proto['wall_s']:.2f} s = "
            f"{proto['wall_ratio_to_baseline']:.2f}x the baseline ({proto['speedup']:.2f}x "
            f"faster); overhead (wall - forward at "
            f"{proto['actor_threads']} thread(s)) / wall {proto['overhead_share']:.1%}"
        )
        for event in proto["timeline"]:
            print(
                f"  {event['at_s']:6.2f} s (+{event['since_s']:5.2f} s)  {event['event']:<17} "
                f"{event['what']}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
