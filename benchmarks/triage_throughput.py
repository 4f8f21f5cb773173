"""Triage throughput at scale: decisions + token pruning + shard writing from a scored cache.

Builds (once, in a child process, cached under .cache/) a synthetic scored cache of N samples
with ~200 response tokens each, then times `run_triage` on it in this process and reports
samples/s, response tokens/s and this process's peak RSS. Prints the figures and writes JSON.

    python benchmarks/triage_throughput.py                 # 1,000,000 samples
    python benchmarks/triage_throughput.py --samples 100000 --scope batch
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import time
from pathlib import Path


def _build(root: Path, samples: int) -> None:
    from qtune.demo.synthetic_cache import write_synthetic_cache

    write_synthetic_cache(root, samples, response_tokens=200, prompt_tokens=40, rejected=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--scope", choices=["global", "batch"], default="global")
    parser.add_argument("--sample-ratio", type=float, default=0.25)
    parser.add_argument("--token-ratio", type=float, default=0.5)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/triage_throughput.json")
    )
    args = parser.parse_args()

    root = Path(".cache") / f"bench-triage-{args.samples}"
    if not (root / "scores/epoch_000/_summary.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=_build, args=(root, args.samples)
        )
        child.start()
        child.join()
        if child.exitcode:
            raise SystemExit(f"building the synthetic cache failed ({child.exitcode})")
        print(f"built synthetic cache in {time.perf_counter() - started:.0f} s: {root}")

    from qtune.pipeline.config import load_config
    from qtune.pipeline.triage_job import run_triage

    cfg = load_config(
        None,
        [
            "input.path=unused",
            "model.path=unused",
            f"output.dir={root}",
            f"qtuning.scope={args.scope}",
            f"qtuning.sample_ratio={args.sample_ratio}",
            f"qtuning.token_ratio={args.token_ratio}",
            "output.num_shards=16",
        ],
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    summary = run_triage(cfg, out_dir=root / "published")
    seconds = time.perf_counter() - started
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cache_bytes = sum(p.stat().st_size for p in (root / "scores/epoch_000").glob("*.parquet"))
    result = {
        "samples": summary.scored,
        "response_tokens": summary.response_tokens,
        "scope": args.scope,
        "kept": summary.kept,
        "kept_loss_tokens": summary.kept_loss_tokens,
        "seconds": seconds,
        "timings": summary.timings,
        "samples_per_second": summary.scored / seconds,
        "response_tokens_per_second": summary.response_tokens / seconds,
        "decisions_seconds": summary.timings["triage_s"],
        "peak_rss_mib": peak_rss_mib,
        "rss_before_mib": rss_before / 1024,
        "cache_gib": cache_bytes / 2**30,
    }
    print(f"samples:           {summary.scored:,} ({result['cache_gib']:.2f} GiB scored cache)")
    print(f"wall time:         {seconds:.1f} s  ({json.dumps(summary.timings)})")
    print(f"samples/s:         {result['samples_per_second']:,.0f}")
    print(f"response tokens/s: {result['response_tokens_per_second']:,.0f}")
    print(f"triage decisions:  {result['decisions_seconds']:.2f} s for {summary.scored:,} samples")
    print(f"peak RSS:          {peak_rss_mib:,.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
