"""Deterministic synthetic SFT corpus for the demo and the tests.

The corpus is built so that a tiny model (~1M parameters, byte-level BPE) trained for a couple of
minutes on the clean distribution (:func:`training_conversations`) can learn most of it, and so
that scoring the corpus with that model populates every quadrant of the Error-Uncertainty plane:

- deterministic tasks the model learns (arithmetic, reversing, sorting, counting, and capitals of
  fictional countries it memorises) give low-error, low-entropy samples (Q3);
- planted label noise (a plausible wrong answer, or garbled text) gives high-error samples, either
  confidently contradicted (Q2) or simply unlikely (Q1);
- an open-ended ``chat`` task with many equally valid answers gives high entropy (Q4);
- near duplicates (a trivial edit of an earlier sample's first question) exercise redundancy.

Everything is drawn from one ``random.Random`` per call, so equal arguments give equal output, byte
for byte, on any machine.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

CHAT_FILE = "chat.jsonl"
SHAREGPT_FILE = "sharegpt.json"
ALPACA_FILE = "alpaca.parquet"
COMPLETIONS_FILE = "completions.jsonl"
#: Files written by :func:`write_demo_corpus`, in this order.
FILE_NAMES: tuple[str, ...] = (CHAT_FILE, SHAREGPT_FILE, ALPACA_FILE, COMPLETIONS_FILE)
#: Formats that can hold a system message and several turns.
_MULTI_TURN_FILES = (CHAT_FILE, SHAREGPT_FILE)

ALPACA_SCHEMA = pa.schema(
    [
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("input", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
    ]
)

_DEFAULT_NOISE_RATE = 0.08
_DEFAULT_DUPLICATE_RATE = 0.15
_SYSTEM_RATE = 0.15
_MULTI_TURN_RATE = 0.2
#: Share of noisy answers that are garbled text rather than a plausible wrong answer.
_GARBLE_RATE = 0.35

# Fictional, so the only way to know a capital is to memorise it from the training data.
COUNTRIES: tuple[tuple[str, str], ...] = (
    ("Varnholm", "Eskeridge"),
    ("Quellaria", "Tornby"),
    ("Zephyria", "Lumen Bay"),
    ("Durvania", "Kessport"),
    ("Maldoria", "Ostrin"),
    ("Teluvia", "Brightwater"),
    ("Korrinth", "Ashfall"),
    ("Pellavia", "Marrowgate"),
    ("Ystrel", "Vinterhal"),
    ("Brisgard", "Coldharbour"),
    ("Amberlyn", "Fenwick"),
    ("Sarnadia", "Port Ilsa"),
    ("Ulgrave", "Redcliff"),
    ("Calderon", "Mistholme"),
    ("Nyssaria", "Dunmere"),
    ("Orvinia", "Haldenburg"),
    ("Tessarin", "Goldmoor"),
    ("Wendaria", "Saltmarsh"),
    ("Estovar", "Pinecrest"),
    ("Rhyland", "Ebonford"),
    ("Galvaria", "Starhaven"),
    ("Morvayne", "Thistleby"),
    ("Kelbora", "Ironvale"),
    ("Sylvandor", "Willowmere"),
    ("Ardunia", "Copperton"),
    ("Fennmark", "Glasswick"),
    ("Lorvania", "Ravenholt"),
    ("Istrova", "Brackenfield"),
    ("Corvenna", "Highmoor"),
    ("Dravonia", "Lakeshire"),
)

# No palindromes, so a reversed word always differs from the word.
WORDS: tuple[str, ...] = (
    "apple", "river", "garden", "pencil", "window", "rocket", "silver", "planet", "orange",
    "castle", "forest", "bridge", "candle", "dragon", "island", "jungle", "kitten", "lemon",
    "marble", "needle", "oyster", "pepper", "quartz", "rabbit", "saddle", "tomato", "violet",
    "walnut", "yellow", "zipper", "banana", "cherry", "guitar", "hammer", "basket", "butter",
    "camera", "dinner", "engine", "flower", "ginger", "harbor", "insect", "jacket", "ladder",
    "mirror", "number", "parrot", "puzzle", "ribbon", "summer", "ticket", "tunnel", "velvet",
    "wallet", "winter", "anchor", "button", "cactus", "donkey", "coffee", "letter", "balloon",
    "strawberry",
)  # fmt: skip

_COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "teal", "coral", "indigo", "amber",
    "crimson", "ivory", "olive", "maroon", "navy", "turquoise", "lilac", "beige", "scarlet",
    "silver",
)  # fmt: skip
_CAT_NAMES = (
    "Milo", "Luna", "Oliver", "Bella", "Simba", "Nala", "Felix", "Cleo", "Tiger", "Smokey",
    "Pumpkin", "Mochi", "Ginger", "Shadow", "Pepper", "Biscuit", "Willow", "Jasper", "Olive",
    "Whiskers",
)  # fmt: skip
_FRUITS = (
    "apple", "banana", "mango", "cherry", "peach", "plum", "kiwi", "grape", "lemon", "lime",
    "melon", "papaya", "pear", "apricot", "fig", "guava", "lychee", "orange", "pineapple",
    "raspberry",
)  # fmt: skip
_ANIMALS = (
    "fox", "otter", "badger", "owl", "wolf", "heron", "rabbit", "deer", "tiger", "panda",
    "koala", "lynx", "zebra", "camel", "dolphin", "falcon", "beaver", "giraffe", "hedgehog",
    "penguin",
)  # fmt: skip
_CHAT_PROMPTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Name a colour.", _COLOURS),
    ("Suggest a name for a cat.", _CAT_NAMES),
    ("Name a fruit.", _FRUITS),
    ("Name an animal.", _ANIMALS),
)
_CHAT_FRAMES = ("{x}.", "How about {x}?", "I would pick {x}.", "{x} is a good choice.")

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a helpful assistant that answers in one sentence.",
)

# Edits for near duplicates: (phrase, replacement); the first one found in the question is used.
_SYNONYMS: tuple[tuple[str, str], ...] = (
    ("What is", "What's"),
    ("Compute", "Work out"),
    ("Calculate", "Work out"),
    ("Solve", "Work out"),
    ("Which city is", "What city is"),
    ("Name the", "Tell me the"),
    ("Reverse", "Invert"),
    ("backwards", "in reverse"),
    ("Sort", "Order"),
    ("Put", "Place"),
    ("How many times", "How often"),
    ("Count", "Tally"),
    ("Name a", "Give me a"),
    ("Name an", "Give me an"),
    ("Suggest", "Propose"),
)


@dataclass(frozen=True)
class _Turn:
    """One user question and its assistant answer; ``input`` is Alpaca's optional input field."""

    instruction: str
    input: str
    answer: str

    @property
    def user(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


@dataclass(frozen=True)
class _Sample:
    id: str
    task: str
    system: str | None
    turns: tuple[_Turn, ...]
    noisy: bool
    duplicate_of: str | None

    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for turn in self.turns:
            out.append({"role": "user", "content": turn.user})
            out.append({"role": "assistant", "content": turn.answer})
        return out

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "task": self.task,
            "messages": self.messages(),
            "noisy": self.noisy,
            "duplicate_of": self.duplicate_of,
        }


# --- task generators: each returns a correct turn and a plausible wrong answer -----------------


def _gen_add(rng: random.Random) -> tuple[_Turn, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        op, result = "+", a + b
    else:
        a, b = max(a, b), min(a, b)  # no negative results
        op, result = "-", a - b
    expr = f"{a} {op} {b}"
    template = rng.randrange(4)
    if template == 3:
        instruction, inp = "Solve the following.", expr
    else:
        instruction = ("What is {e}?", "Compute {e}.", "Calculate {e}.")[template].format(e=expr)
        inp = ""
    wrong = rng.choice([result + d for d in range(-10, 11) if d and result + d >= 0])
    return _Turn(instruction, inp, f"{expr} = {result}."), f"{expr} = {wrong}."


def _gen_reverse(rng: random.Random) -> tuple[_Turn, str]:
    word = rng.choice(WORDS)
    rev = word[::-1]
    template = rng.randrange(3)
    if template == 2:
        instruction, inp = "Reverse the following word.", word
    else:
        instruction = ('Reverse the word "{w}".', 'Write the word "{w}" backwards.')[template]
        instruction, inp = instruction.format(w=word), ""
    if rng.random() < 0.5:
        wrong_rev = word  # not reversed at all
    else:  # reversed, but two different letters swapped
        chars = list(rev)
        pairs = [
            (i, j)
            for i in range(len(chars))
            for j in range(i + 1, len(chars))
            if chars[i] != chars[j]
        ]
        i, j = rng.choice(pairs)
        chars[i], chars[j] = chars[j], chars[i]
        wrong_rev = "".join(chars)
    answer = 'The reverse of "{w}" is "{r}".'
    return _Turn(instruction, inp, answer.format(w=word, r=rev)), answer.format(w=word, r=wrong_rev)


def _gen_capital(rng: random.Random) -> tuple[_Turn, str]:
    country, capital = rng.choice(COUNTRIES)
    instruction = rng.choice(
        (
            "What is the capital of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital of {c}.",
        )
    ).format(c=country)
    wrong = rng.choice([cap for _, cap in COUNTRIES if cap != capital])
    answer = "The capital of {c} is {x}."
    return _Turn(instruction, "", answer.format(c=country, x=capital)), answer.format(
        c=country, x=wrong
    )


def _join(numbers: Sequence[int]) -> str:
    return ", ".join(str(x) for x in numbers)


def _gen_sort(rng: random.Random) -> tuple[_Turn, str]:
    numbers = rng.sample(range(1, 50), rng.randint(3, 5))
    ordered = sorted(numbers)
    template = rng.randrange(3)
    if template == 2:
        instruction, inp = "Sort the following numbers in ascending order.", _join(numbers)
    else:
        instruction = (
            "Sort these numbers from smallest to largest: {n}.",
            "Put these numbers in ascending order: {n}.",
        )[template].format(n=_join(numbers))
        inp = ""
    wrong = list(ordered)
    if rng.random() < 0.5:  # two neighbours swapped
        i = rng.randrange(len(wrong) - 1)
        wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:  # one number replaced by one that was not in the list
        wrong[rng.randrange(len(wrong))] = rng.choice([x for x in range(1, 50) if x not in numbers])
    answer = "The sorted list is {n}."
    return _Turn(instruction, inp, answer.format(n=_join(ordered))), answer.format(n=_join(wrong))


def _gen_count(rng: random.Random) -> tuple[_Turn, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.8:
        letter = rng.choice(word)
    else:
        letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
    count = word.count(letter)
    template = rng.randrange(3)
    if template == 2:
        instruction = f'How many times does the letter "{letter}" appear in the word below?'
        inp = word
    else:
        instruction = (
            'How many times does the letter "{l}" appear in "{w}"?',
            'Count the letter "{l}" in the word "{w}".',
        )[template].format(l=letter, w=word)
        inp = ""
    wrong = rng.choice([k for k in range(count - 2, count + 3) if k >= 0 and k != count])

    def answer(k: int) -> str:
        return f'The letter "{letter}" appears {k} time{"" if k == 1 else "s"} in "{word}".'

    return _Turn(instruction, inp, answer(count)), answer(wrong)


def _gen_chat(rng: random.Random) -> tuple[_Turn, str]:
    index = rng.randrange(len(_CHAT_PROMPTS))
    prompt, options = _CHAT_PROMPTS[index]
    frame = rng.choice(_CHAT_FRAMES)
    pick = rng.choice(options)
    # Wrong: an answer to a different question (a fruit when asked for a colour, ...).
    _, other_options = _CHAT_PROMPTS[
        rng.choice([i for i in range(len(_CHAT_PROMPTS)) if i != index])
    ]
    wrong = rng.choice([x for x in other_options if x not in options])
    fmt = frame.format
    return _Turn(prompt, "", _cap(fmt(x=pick))), _cap(fmt(x=wrong))


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_GENERATORS: dict[str, Callable[[random.Random], tuple[_Turn, str]]] = {
    "add": _gen_add,
    "reverse": _gen_reverse,
    "capital": _gen_capital,
    "sort": _gen_sort,
    "count": _gen_count,
    "chat": _gen_chat,
}
#: Task names, in the order samples draw them from.
TASKS: tuple[str, ...] = tuple(_GENERATORS)


def _garble(rng: random.Random, text: str) -> str:
    """Text of about the same length that is no longer a valid answer."""
    if rng.random() < 0.5:  # the answer's own characters, shuffled
        chars = list(text)
        for _ in range(10):
            rng.shuffle(chars)
            shuffled = "".join(chars).strip()
            if shuffled and shuffled != text:
                return shuffled
    alphabet = "abcdefghijklmnopqrstuvwxyz     .,"
    while True:  # random letters of about the same length
        garbled = "".join(rng.choice(alphabet) for _ in range(max(4, len(text)))).strip() + "."
        if garbled != text:
            return garbled


# --- near duplicates ------------------------------------------------------------------------


def _near_duplicate_instruction(rng: random.Random, text: str) -> str:
    """A trivially edited copy of ``text`` (whitespace, punctuation or a synonym); never equal."""
    kind = rng.choice(("whitespace", "punctuation", "synonym"))
    edited = text
    if kind == "synonym":
        for phrase, replacement in _SYNONYMS:
            if phrase in text:
                edited = text.replace(phrase, replacement, 1)
                break
    elif kind == "punctuation":
        edited = text[:-1] if text.endswith(("?", ".")) else text + "."
    if edited == text:  # whitespace, or no edit of the chosen kind applied
        spaces = [i for i, c in enumerate(text) if c == " "]
        if spaces:
            i = rng.choice(spaces)
            edited = text[:i] + " " + text[i:]
        else:
            edited = text + " "
    return edited


def _near_duplicate(rng: random.Random, original: _Sample, new_id: str) -> _Sample:
    first = original.turns[0]
    edited = replace(first, instruction=_near_duplicate_instruction(rng, first.instruction))
    return replace(
        original, id=new_id, turns=(edited, *original.turns[1:]), duplicate_of=original.id
    )


# --- sample generation ----------------------------------------------------------------------


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {value!r}")


def _new_sample(rng: random.Random, sample_id: str, noisy: bool) -> _Sample:
    task = rng.choice(TASKS)
    system = rng.choice(_SYSTEM_PROMPTS) if rng.random() < _SYSTEM_RATE else None
    n_turns = rng.choice((2, 3)) if rng.random() < _MULTI_TURN_RATE else 1
    drawn = [_GENERATORS[task](rng) for _ in range(n_turns)]
    turns = [turn for turn, _ in drawn]
    if noisy:  # exactly one assistant turn carries a wrong answer
        k = rng.randrange(n_turns)
        turn, wrong = drawn[k]
        if rng.random() < _GARBLE_RATE:
            wrong = _garble(rng, turn.answer)
        turns[k] = replace(turn, answer=wrong)
    return _Sample(sample_id, task, system, tuple(turns), noisy, None)


def _generate(
    n: int, rng: random.Random, id_prefix: str, noise_rate: float, duplicate_rate: float
) -> list[_Sample]:
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    _check_rate("noise_rate", noise_rate)
    _check_rate("duplicate_rate", duplicate_rate)
    # Exact counts rather than per-sample coin flips, so small corpora honour the rates too.
    n_dup = min(round(n * duplicate_rate), max(n - 1, 0))
    dup_positions = set(rng.sample(range(1, n), n_dup)) if n_dup else set()
    originals = [i for i in range(n) if i not in dup_positions]
    noisy_positions = set(rng.sample(originals, round(len(originals) * noise_rate)))

    samples: list[_Sample] = []
    original_indices: list[int] = []  # indices into samples of non-duplicates
    for i in range(n):
        sample_id = f"{id_prefix}-{i:06d}"
        if i in dup_positions:
            source = samples[rng.choice(original_indices)]
            samples.append(_near_duplicate(rng, source, sample_id))
        else:
            original_indices.append(i)
            samples.append(_new_sample(rng, sample_id, i in noisy_positions))
    return samples


def _corpus(n: int, seed: int, noise_rate: float, duplicate_rate: float) -> list[_Sample]:
    # A string seed keeps this stream apart from training_conversations' for equal seeds.
    rng = random.Random(f"qtune-demo-corpus:{seed}")
    return _generate(n, rng, f"demo{seed}", noise_rate, duplicate_rate)


def generate_samples(
    n: int,
    seed: int = 0,
    *,
    noise_rate: float = _DEFAULT_NOISE_RATE,
    duplicate_rate: float = _DEFAULT_DUPLICATE_RATE,
) -> list[dict]:
    """Return ``n`` canonical demo samples with their planted ground truth.

    Each sample is ``{"id": str, "task": str, "messages": [{"role", "content"}, ...],
    "noisy": bool, "duplicate_of": str | None}``. Roles are ``system`` (optional, first),
    then alternating ``user``/``assistant`` (one to three turns). ``task`` is one of
    :data:`TASKS`; all turns of a sample share it.

    Exactly ``round(n * duplicate_rate)`` samples are near duplicates: a copy of an earlier
    non-duplicate sample whose first question got a trivial edit (whitespace, punctuation or a
    synonym); ``duplicate_of`` names that sample and the copy keeps its ``noisy`` flag. Of the
    other samples, ``round(len * noise_rate)`` have exactly one wrong assistant answer (a
    plausible wrong value, or garbled text) and ``noisy=True``.

    Ids are ``"demo<seed>-<index:06d>"``, unique within a call.
    """
    return [s.to_dict() for s in _corpus(n, seed, noise_rate, duplicate_rate)]


def training_conversations(n: int, seed: int = 1) -> list[list[dict]]:
    """Return ``n`` clean conversations (``messages`` lists) for training the demo model.

    Same task distribution as :func:`generate_samples` (system messages and multi-turn
    included) but with no label noise and no near duplicates, drawn from a random stream that is
    separate from the corpus stream even for equal seeds.
    """
    return [s["messages"] for s in clean_samples(n, seed)]


def clean_samples(n: int, seed: int = 1) -> list[dict]:
    """The samples behind :func:`training_conversations` (same stream), with their ``task``:
    held-out sets use it to judge answers per task."""
    rng = random.Random(f"qtune-demo-train:{seed}")
    return [s.to_dict() for s in _generate(n, rng, "train", 0.0, 0.0)]


def _is_single_turn(messages: Sequence[dict]) -> bool:
    return [m["role"] for m in messages] == ["user", "assistant"]


def assign_files(samples: Sequence[dict]) -> list[str]:
    """File name each sample goes to in :func:`write_demo_corpus`, in the order given.

    Single-turn samples without a system message go round-robin to all four files; the others
    (system message or several turns) alternate between ``chat.jsonl`` and ``sharegpt.json``.
    Within a file, rows keep the order of ``samples``, so the demo can join its results back to
    the ground truth of :func:`generate_samples` called with the same arguments.
    """
    single = multi = 0
    out = []
    for sample in samples:
        if _is_single_turn(sample["messages"]):
            out.append(FILE_NAMES[single % len(FILE_NAMES)])
            single += 1
        else:
            out.append(_MULTI_TURN_FILES[multi % len(_MULTI_TURN_FILES)])
            multi += 1
    return out


def _json_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _write_text(path: Path, lines: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(line + "\n" for line in lines)


def write_demo_corpus(out_dir: Path, n_samples: int = 3000, seed: int = 0) -> list[Path]:
    """Write ``generate_samples(n_samples, seed)`` (default rates) as four files in ``out_dir``.

    Returns the paths in :data:`FILE_NAMES` order; ``out_dir`` is created if missing and the
    files are overwritten. Equal arguments give identical bytes. Which sample goes to which file
    is :func:`assign_files`. Formats:

    - ``chat.jsonl``: ``{"id", "task", "messages": [{"role", "content"}]}`` per line;
    - ``sharegpt.json``: a JSON array of ``{"id", "task", "conversations":
      [{"from": "system"|"human"|"gpt", "value"}]}``, one element per line;
    - ``alpaca.parquet``: string columns ``instruction``, ``input`` (``""`` when the question
      has no separate input), ``output``, ``task``; single-turn samples only;
    - ``completions.jsonl``: ``{"prompt": "Question: ...\\nAnswer:", "completion": " ...",
      "task"}`` per line; single-turn samples only, and no id (ids are content hashes
      downstream).

    A sample's user text is the same in every format: an Alpaca input is joined to its
    instruction with a blank line.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = _corpus(n_samples, seed, _DEFAULT_NOISE_RATE, _DEFAULT_DUPLICATE_RATE)
    dicts = [s.to_dict() for s in samples]
    targets = assign_files(dicts)

    chat: list[str] = []
    sharegpt: list[str] = []
    alpaca: dict[str, list[str]] = {name: [] for name in ALPACA_SCHEMA.names}
    completions: list[str] = []
    share_roles = {"system": "system", "user": "human", "assistant": "gpt"}
    for sample, as_dict, target in zip(samples, dicts, targets, strict=True):
        if target == CHAT_FILE:
            chat.append(
                _json_line({"id": sample.id, "task": sample.task, "messages": as_dict["messages"]})
            )
        elif target == SHAREGPT_FILE:
            conversations = [
                {"from": share_roles[m["role"]], "value": m["content"]} for m in as_dict["messages"]
            ]
            sharegpt.append(
                _json_line({"id": sample.id, "task": sample.task, "conversations": conversations})
            )
        elif target == ALPACA_FILE:
            (turn,) = sample.turns
            alpaca["instruction"].append(turn.instruction)
            alpaca["input"].append(turn.input)
            alpaca["output"].append(turn.answer)
            alpaca["task"].append(sample.task)
        else:
            (turn,) = sample.turns
            completions.append(
                _json_line(
                    {
                        "prompt": f"Question: {turn.user}\nAnswer:",
                        "completion": f" {turn.answer}",
                        "task": sample.task,
                    }
                )
            )

    paths = [out_dir / name for name in FILE_NAMES]
    chat_path, sharegpt_path, alpaca_path, completions_path = paths
    _write_text(chat_path, chat)
    with sharegpt_path.open("w", encoding="utf-8", newline="\n") as f:
        f.write("[\n" + ",\n".join(sharegpt) + "\n]\n" if sharegpt else "[]\n")
    # No rows -> no row group: a Parquet file holding one empty row group fails to load.
    with pq.ParquetWriter(alpaca_path, ALPACA_SCHEMA, compression="zstd") as writer:
        if alpaca["task"]:
            writer.write_table(pa.Table.from_pydict(alpaca, schema=ALPACA_SCHEMA))
    _write_text(completions_path, completions)
    logger.info(
        "wrote demo corpus to %s: %d chat, %d sharegpt, %d alpaca, %d completions rows",
        out_dir,
        len(chat),
        len(sharegpt),
        len(alpaca["task"]),
        len(completions),
    )
    return paths
