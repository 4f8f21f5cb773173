"""GPU throughput of the torch scoring backend on a SmolLM2-1.7B-shaped model, and its MFU.

Needs only torch, transformers and numpy (no vLLM, Ray or polars): it drives
``qtune.stages.score.torch_backend.TorchBackend`` directly, exactly as a scoring actor does. The
model is randomly initialised from SmolLM2-1.7B's shape (nothing is downloaded) and saved once in
bf16. Sequence lengths are drawn like an SFT corpus (log-normal, median ~600 tokens, capped at
``--max-length``). Each setting of ``tokens_per_forward`` runs in alternating rounds; the best
round is reported as tokens/s and model FLOP utilisation (MFU): forward FLOPs per token (2 x
non-embedding parameters, + the full-vocabulary LM head, + causal attention at the sample's
length) over the GPU's dense bf16 peak. Prints the figures and writes them as JSON.

    bash benchmarks/gpu_check.sh            # wraps this script; one run < 8 minutes on an H100/H200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

# SmolLM2-1.7B (HuggingFaceTB/SmolLM2-1.7B config.json): Llama architecture.
SMOLLM2_1_7B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 130000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), by device-name substring.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def build_model(target: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return target
    config = LlamaConfig(**SMOLLM2_1_7B)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return target


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def flops_per_token(length: np.ndarray) -> np.ndarray:
    """Forward FLOPs per token of a sample of ``length`` tokens (matmuls only)."""
    c = SMOLLM2_1_7B
    d, layers, ff, vocab = (
        c["hidden_size"],
        c["num_hidden_layers"],
        c["intermediate_size"],
        c["vocab_size"],
    )
    per_layer = 2 * (4 * d * d) + 2 * (3 * d * ff)  # q, k, v, o + gate, up, down
    head = 2 * d * vocab
    attention = 2 * 2 * layers * d * (length + 1) / 2  # QK^T and AV, causal: mean context L/2
    return layers * per_layer + head + attention


@torch.inference_mode()
def time_split(backend, sequences: list[np.ndarray]) -> dict[str, float]:
    """Shares of one score() call: padding + host-to-device, decoder forward, LM head +
    log-softmax + entropy, device-to-host (synchronised timings, one pass)."""
    from qtune.stages.score.logits import token_logprob_entropy

    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    spent = {"pack + copy in": 0.0, "decoder": 0.0, "head + entropy": 0.0, "copy out": 0.0}
    for batch in backend._batches(lengths):
        synchronize()
        tick = time.perf_counter()
        width = int(lengths[batch].max())
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : lengths[index]] = torch.from_numpy(sequences[index].astype(np.int64))
            attention[row, : lengths[index]] = 1
        ids, attention = ids.to(backend.device), attention.to(backend.device)
        synchronize()
        spent["pack + copy in"] += time.perf_counter() - tick
        tick = time.perf_counter()
        hidden = backend.decoder(input_ids=ids, attention_mask=attention).last_hidden_state
        synchronize()
        spent["decoder"] += time.perf_counter() - tick
        tick = time.perf_counter()
        valid = attention[:, 1:].bool()
        scores = token_logprob_entropy(
            hidden[:, :-1][valid], ids[:, 1:][valid], backend._logits, backend.chunk_rows
        )
        synchronize()
        spent["head + entropy"] += time.perf_counter() - tick
        tick = time.perf_counter()
        scores.cpu()
        spent["copy out"] += time.perf_counter() - tick
    total = sum(spent.values())
    return {k: v / total for k, v in spent.items()}


def corpus(n_tokens: int, max_length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sequences, total = [], 0
    while total < n_tokens:
        length = int(np.clip(rng.lognormal(np.log(600), 0.8), 32, max_length))
        sequences.append(rng.integers(0, SMOLLM2_1_7B["vocab_size"], length).astype(np.int32))
        total += length
    return sequences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qtune-smollm2-1.7b-shape"))
    parser.add_argument("--tokens", type=int, default=2_000_000, help="tokens per round")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=512, help="samples per score() call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--tokens-per-forward", type=int, nargs="+", default=[16384, 65536], metavar="N"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    parser.add_argument(
        "--chunk-rows",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="rows of logits per float32 log-softmax chunk (0: the backend's default)",
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny shape on CPU: test the script")
    args = parser.parse_args()

    from qtune.stages.score import ScoringOptions
    from qtune.stages.score.torch_backend import TorchBackend

    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("no CUDA device: this benchmark measures the GPU path (--dry-run on CPU)")
    if args.dry_run:  # check the script itself on a CPU: a tiny shape, a few tokens
        SMOLLM2_1_7B.update(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=1024,
        )
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    started = time.perf_counter()
    model_dir = build_model(args.model_dir)
    build_s = time.perf_counter() - started
    sequences = corpus(args.tokens, args.max_length, seed=1)
    lengths = np.array([len(s) for s in sequences])
    flops = float(np.sum(lengths * flops_per_token(lengths)))
    backend = TorchBackend(ScoringOptions(model_path=str(model_dir), max_length=args.max_length))
    default_chunk = backend.chunk_rows
    settings = [(t, c or default_chunk) for t in args.tokens_per_forward for c in args.chunk_rows]
    results: dict[tuple[int, int], list[float]] = {k: [] for k in settings}
    peak_memory: dict[tuple[int, int], float] = {}
    backend.score(sequences[:64])  # warm-up: kernels, allocator
    synchronize()
    for _ in range(args.rounds):
        for tpf, chunk in settings:
            # The same model for every setting: only the batch and chunk sizes change.
            backend.options = replace(backend.options, tokens_per_forward=tpf)
            backend.chunk_rows = chunk
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            synchronize()
            tick = time.perf_counter()
            for start in range(0, len(sequences), args.batch):
                backend.score(sequences[start : start + args.batch])
            synchronize()
            results[(tpf, chunk)].append(time.perf_counter() - tick)
            if torch.cuda.is_available():
                peak_memory[(tpf, chunk)] = torch.cuda.max_memory_allocated() / 2**30
    backend.options = replace(backend.options, tokens_per_forward=args.tokens_per_forward[0])
    backend.chunk_rows = default_chunk
    breakdown = time_split(backend, sequences[: args.batch])
    report = {
        "device": name,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "model": "random SmolLM2-1.7B shape, bf16",
        "tokens": int(lengths.sum()),
        "samples": len(sequences),
        "mean_length": float(lengths.mean()),
        "forward_tflop": flops / 1e12,
        "peak_bf16_tflops": peak,
        "model_build_s": build_s,
        "batch_samples": args.batch,
        "settings": {},
    }
    for (tpf, chunk), seconds in results.items():
        best = min(seconds)
        achieved = flops / best / 1e12
        report["settings"][f"{tpf}/{chunk}"] = {
            "tokens_per_forward": tpf,
            "chunk_rows": chunk,
            "seconds": seconds,
            "tokens_per_second": lengths.sum() / best,
            "achieved_tflops": achieved,
            "mfu": achieved / peak if peak else None,
            "peak_memory_gib": peak_memory.get((tpf, chunk)),
        }
        print(
            f"tokens_per_forward {tpf:>6}, chunk rows {chunk:>5}: "
            f"{lengths.sum() / best:>10,.0f} tokens/s, {achieved:6.1f} TFLOP/s"
            + (f", MFU {achieved / peak:.1%} of {peak:.0f}" if peak else "")
            + (f", peak memory {peak_memory[(tpf, chunk)]:.1f} GiB" if peak_memory else "")
        )
    default = report["settings"][f"{settings[0][0]}/{settings[0][1]}"]["tokens_per_second"]
    best_key = max(report["settings"], key=lambda k: report["settings"][k]["tokens_per_second"])
    report["default_setting"] = f"{settings[0][0]}/{settings[0][1]}"
    report["best_setting"] = best_key
    report["best_over_default"] = report["settings"][best_key]["tokens_per_second"] / default
    report["time_split"] = breakdown
    print(
        f"best {best_key} (tokens_per_forward/chunk rows): "
        f"{report['best_over_default']:.2f}x the default; time split of one call: "
        + ", ".join(f"{k} {v:.1%}" for k, v in breakdown.items())
    )
    print(f"{name}: {report['tokens']:,} tokens in {report['samples']:,} samples")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
