"""What exact loss spans cost: qtune's Tokenize against one ``apply_chat_template`` + tokenize.

The trainer renders and tokenises each conversation once; qtune also renders prefixes of it to
locate every assistant turn (``qtune/stages/chat_spans.py``). This measures, in one process and
one run (the machine is shared and noisy: read the ratios), rows/s of both on conversations of 1,
3 and 10 user/assistant exchanges, for a template located by prefixes (ChatML with a default system
prompt), one that rewrites history (Qwen3) and one with ``{% generation %}`` markers.

    .venv/bin/python benchmarks/tokenize_throughput.py [--rows 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def conversation(turns: int, seed: int) -> list[dict]:
    messages = [{"role": "system", "content": "You answer sums briefly."}]
    for t in range(turns):
        a, b = seed % 97 + t, seed % 89 + 2 * t
        messages += [
            {"role": "user", "content": f"What is {a} + {b}? Show the working."},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}. The sum of {a} and {b}."},
        ]
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()

    from qtune.demo.model import build_bpe_tokenizer
    from qtune.stages.tokenize import Tokenize
    from tests.stages.chat_templates import FAMILIES
    from tests.stages.test_chat_spans import save_family_tokenizer

    corpus = [m["content"] for s in range(200) for m in conversation(3, s)]
    base = build_bpe_tokenizer(corpus, vocab_size=600)
    root = Path(tempfile.mkdtemp(prefix="qtune-tokbench-"))
    cases = {
        "qwen25 (prefixes)": save_family_tokenizer(
            root / "qwen25", base, FAMILIES["qwen25"], FAMILIES["qwen25"].plain()
        ),
        "qwen3 (history rewritten)": save_family_tokenizer(
            root / "qwen3", base, FAMILIES["qwen3"], FAMILIES["qwen3"].plain()
        ),
        "qwen25 + generation markers": save_family_tokenizer(
            root / "qwen25-gen", base, FAMILIES["qwen25"], FAMILIES["qwen25"].annotated()
        ),
    }
    results = []
    header = ("template", "turns", "qtune rows/s", "trainer rows/s", "ratio")
    print("{:30s} {:>5s} {:>13s} {:>15s} {:>6s}".format(*header))
    for name, model_dir in cases.items():
        tokenize = Tokenize(model_dir, 1 << 16)
        tokenizer = tokenize.tokenizer
        for turns in (1, 3, 10):
            rows = [conversation(turns, s) for s in range(args.rows)]
            tokenize.encode(rows[0], "messages")  # warm: template compiled, end-of-turn learnt
            started = time.perf_counter()
            for messages in rows:
                tokenize.encode(messages, "messages")
            qtune = len(rows) / (time.perf_counter() - started)
            started = time.perf_counter()
            for messages in rows:
                tokenizer.apply_chat_template(messages, tokenize=True)
            trainer = len(rows) / (time.perf_counter() - started)
            print(f"{name:30s} {turns:5d} {qtune:13.0f} {trainer:15.0f} {trainer / qtune:6.2f}")
            results.append(
                {"template": name, "turns": turns, "qtune_rows_s": qtune, "trainer_rows_s": trainer}
            )
    out = Path(__file__).parent / "results" / "tokenize_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
