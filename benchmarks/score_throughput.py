"""Scoring throughput: the vllm backend versus the torch reference, same model and tokens.

Both backends run in this one process on the same tokenised corpus, alternating rounds so that
machine noise hits both alike; the best round of each is reported with their ratio. Prints the
figures and writes them as JSON.

    python benchmarks/score_throughput.py                       # small random Llama, demo corpus
    python benchmarks/score_throughput.py --model PATH --samples 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = {
    # hidden, layers, heads (head_dim 64), vocab
    "tiny": (128, 2, 2, 1024),
    "small": (512, 8, 8, 8192),
}


def build_model(root: Path, preset: str) -> Path:
    from transformers import AutoModelForCausalLM

    from qtune.demo.corpus import training_conversations
    from qtune.demo.model import build_bpe_tokenizer, save_tiny_model, tiny_config

    target = root / f"bench-{preset}"
    if (target / "config.json").is_file():
        return target
    hidden, layers, heads, vocab = PRESETS[preset]
    conversations = training_conversations(4000, seed=7)
    tokenizer = build_bpe_tokenizer((m["content"] for c in conversations for m in c), vocab)
    config = tiny_config(
        "llama",
        len(tokenizer),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.intermediate_size = hidden * 4
    save_tiny_model(target, "llama", tokenizer, model=AutoModelForCausalLM.from_config(config))
    return target


def corpus_sequences(model: Path, samples: int, max_length: int) -> list[np.ndarray]:
    from qtune.demo.corpus import generate_samples
    from qtune.stages.tokenize import Tokenize

    tokenize = Tokenize(str(model), max_length)
    sequences = []
    for sample in generate_samples(samples, seed=11):
        ids, _, _ = tokenize.encode(sample["messages"], "messages")
        sequences.append(ids.astype(np.int32))
    return sequences


def timed(backend, sequences: list[np.ndarray], batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(sequences), batch):
        backend.score(sequences[start : start + batch])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: build a preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256, help="samples per score() call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/score_throughput.json")
    )
    args = parser.parse_args()

    from qtune.stages.score import ScoringOptions, create_backend

    model = args.model or build_model(Path(".cache"), args.preset)
    sequences = corpus_sequences(model, args.samples, args.max_length)
    tokens = int(sum(len(s) for s in sequences))
    options = ScoringOptions(
        model_path=str(model), max_length=args.max_length, num_threads=args.threads
    )
    backends = {name: create_backend(name, options) for name in ("torch", "vllm")}
    for backend in backends.values():  # warm-up: first requests compile and allocate
        backend.score(sequences[:32])
    seconds: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.rounds):
        for name, backend in backends.items():
            seconds[name].append(timed(backend, sequences, args.batch))
    result = {
        "model": str(model),
        "samples": len(sequences),
        "tokens": tokens,
        "mean_tokens_per_sample": tokens / len(sequences),
        "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "seconds": seconds,
        "tokens_per_second": {name: tokens / min(s) for name, s in seconds.items()},
    }
    result["vllm_over_torch"] = (
        result["tokens_per_second"]["vllm"] / result["tokens_per_second"]["torch"]
    )
    for name, rate in result["tokens_per_second"].items():
        print(
            f"{name:>6}: {rate:12,.0f} tokens/s (best of {args.rounds}: {min(seconds[name]):.2f} s)"
        )
    print(
        f" ratio: vllm / torch = {result['vllm_over_torch']:.2f}x  ({tokens:,} tokens, "
        f"{len(sequences)} samples)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written: {args.out}")
    for backend in backends.values():
        backend.close()


if __name__ == "__main__":
    main()
