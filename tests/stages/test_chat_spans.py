"""Loss masks are exact for the templates people fine-tune with, or the row is rejected.

Ground truth: the same template annotated with ``{% generation %}`` markers, applied by
transformers with ``return_assistant_tokens_mask`` (what TRL's ``assistant_only_loss`` uses).
Every (template, conversation) pair must give the ground truth's ids and mask exactly, through the
plain template (located by rendering) and through the annotated one (markers), or be rejected
with the reason listed in ``REJECTED`` — never a different mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qtune.schema import RejectReason, RowRejected
from qtune.stages.ingest import _tools, normalize_row
from qtune.stages.tokenize import Tokenize, TokenizerSetupError, check_tokenizer_serves
from tests.stages.chat_templates import FAMILIES, Family

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

CONVERSATIONS: dict[str, dict] = {
    # The answer's text occurs in the prompt, before the answer (the reported mis-mask).
    "answer_in_prompt": {
        "messages": [
            {"role": "user", "content": "Pick A or B. A is red, B is blue. Which is red?"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "And blue?"},
            {"role": "assistant", "content": "B"},
        ]
    },
    "system_multi_turn_whitespace": {
        "messages": [
            {"role": "system", "content": "You are terse. Answer 4 if unsure."},
            {"role": "user", "content": "  What is 2+2?  "},
            {"role": "assistant", "content": "  4  \n"},
            {"role": "user", "content": "Why 4?"},
            {"role": "assistant", "content": "Because 2 and 2 make 4.\n\n"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    },
    "think_in_content": {
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>\n7 has no divisor but 1.\n</think>\n\nYes."},
            {"role": "user", "content": "And 9?"},
            {"role": "assistant", "content": "<think>9 = 3 x 3</think>No, 9 = 3 x 3."},
        ]
    },
    "reasoning_content": {
        "messages": [
            {"role": "system", "content": "Think first."},
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "Yes.", "reasoning_content": "7 is prime."},
            {"role": "user", "content": "And 9?"},
            {"role": "assistant", "content": "No.", "reasoning_content": "9 = 3 x 3, so no."},
        ]
    },
    "tool_calls": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "It is 21 C in Paris."},
        ],
    },
    "assistant_first": {
        "messages": [
            {"role": "assistant", "content": "Hello! Ask me a sum."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    },
}

# Rows that must be rejected, with the reason; every other pair must match the ground truth.
# ``PLAIN_ONLY``: rejected through the plain template only (markers locate those turns).
_TEMPLATE_RAISES = RejectReason.TEMPLATE_ERROR
REJECTED: dict[tuple[str, str], RejectReason] = {
    # Strict alternation: the template itself raises (and so would the trainer's).
    ("mistral", "assistant_first"): _TEMPLATE_RAISES,
    ("gemma", "assistant_first"): _TEMPLATE_RAISES,
    ("mistral", "tool_calls"): _TEMPLATE_RAISES,
    ("gemma", "tool_calls"): _TEMPLATE_RAISES,
    # Templates that concatenate content, which a bare tool call leaves None.
    ("phi3", "tool_calls"): _TEMPLATE_RAISES,
    ("qwen25", "tool_calls"): _TEMPLATE_RAISES,
    ("chatml_think", "tool_calls"): _TEMPLATE_RAISES,
    ("gpt_oss", "tool_calls"): _TEMPLATE_RAISES,
    ("deepseek_r1", "tool_calls"): _TEMPLATE_RAISES,
    # Templates that do not render tool calls (the call would vanish, the turn train on EOT).
    ("llama3", "tool_calls"): RejectReason.UNSUPPORTED_TOOL_CALLS,
    ("glm", "tool_calls"): RejectReason.UNSUPPORTED_TOOL_CALLS,
}
PLAIN_ONLY: dict[tuple[str, str], RejectReason] = {
    # No generation prompt can be rendered before an opening assistant turn: the template reads
    # messages[0] (a default system prompt, a system message of its own).
    ("qwen3", "assistant_first"): RejectReason.SPAN_NOT_FOUND,
    ("llama31", "assistant_first"): RejectReason.SPAN_NOT_FOUND,
    ("qwen25", "assistant_first"): RejectReason.SPAN_NOT_FOUND,
    ("deepseek_r1", "assistant_first"): RejectReason.SPAN_NOT_FOUND,
    # No end-of-turn token: turns cannot be delimited (and the model would never learn to stop).
    **{("glm", c): RejectReason.SPAN_NOT_FOUND for c in CONVERSATIONS},
}


def save_family_tokenizer(root: Path, base_tokenizer, family: Family, template: str) -> str:
    """A model directory holding the base BPE tokenizer with the family's tokens and template."""
    from transformers import PreTrainedTokenizerFast

    base_tokenizer.save_pretrained(root)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root)
    tokenizer.add_special_tokens(
        {
            "bos_token": family.bos,
            "eos_token": family.eos,
            "additional_special_tokens": list(family.special_tokens),
        }
    )
    tokenizer.add_tokens(list(family.plain_tokens))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(root)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return str(root)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer) -> dict[tuple[str, bool], str]:
    """(family, annotated) -> model directory with that tokenizer and template."""
    root = tmp_path_factory.mktemp("templates")
    return {
        (name, annotated): save_family_tokenizer(
            root / f"{name}-{'gen' if annotated else 'plain'}",
            tokenizer,
            family,
            family.annotated() if annotated else family.plain(),
        )
        for name, family in FAMILIES.items()
        for annotated in (False, True)
    }


def ground_truth(model_dir: str, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask from transformers on the annotated template (no loss on token 0)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = row["messages"]
    template = tokenizer.chat_template
    if "reasoning_content" not in template and "thinking" in template:  # gpt-oss's name for it
        messages = [
            {("thinking" if k == "reasoning_content" else k): v for k, v in m.items()}
            for m in messages
        ]
    encoded = tokenizer.apply_chat_template(
        messages,
        tools=row.get("tools"),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    mask = np.asarray(encoded["assistant_masks"], dtype=bool)
    mask[:1] = False
    return np.asarray(encoded["input_ids"]), mask


def encode(model_dir: str, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """What qtune puts in the shard for this row (through ingest's normalisation)."""
    messages = normalize_row(row, "messages")
    tools = _tools(row)
    ids, mask, truncated = Tokenize(model_dir, 4096).encode(
        messages, "messages", None if tools is None else json.loads(tools)
    )
    assert not truncated
    return ids, mask.astype(bool)


PAIRS = [(f, c) for f in FAMILIES for c in CONVERSATIONS]


@pytest.mark.parametrize(("family", "conversation"), PAIRS)
def test_masks_equal_generation_marker_ground_truth(family_dirs, family, conversation):
    row = CONVERSATIONS[conversation]
    for annotated in (False, True):
        model_dir = family_dirs[(family, annotated)]
        expected_reject = REJECTED.get((family, conversation))
        if not annotated:
            expected_reject = PLAIN_ONLY.get((family, conversation), expected_reject)
        if expected_reject is not None:
            with pytest.raises(RowRejected) as info:
                encode(model_dir, row)
            assert info.value.reason == expected_reject, info.value.detail
            continue
        truth_ids, truth_mask = ground_truth(family_dirs[(family, True)], row)
        ids, mask = encode(model_dir, row)
        np.testing.assert_array_equal(ids, truth_ids)
        np.testing.assert_array_equal(mask, truth_mask, err_msg=f"annotated={annotated}")
        assert mask.sum() > 0


def test_a_template_without_end_of_turn_token_is_refused_before_any_work(family_dirs):
    with pytest.raises(TokenizerSetupError, match="never learn to stop"):
        check_tokenizer_serves(family_dirs[("glm", False)], None, {"messages"})
    check_tokenizer_serves(family_dirs[("glm", True)], None, {"messages"})  # markers decide


@pytest.mark.parametrize("family", list(FAMILIES))
def test_annotation_does_not_change_the_rendering(family_dirs, family):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(family_dirs[(family, False)])
    annotated = AutoTokenizer.from_pretrained(family_dirs[(family, True)])
    rendered = 0
    for row in CONVERSATIONS.values():
        outputs = []
        for tokenizer in (plain, annotated):
            try:
                outputs.append(
                    tokenizer.apply_chat_template(
                        row["messages"], tools=row.get("tools"), tokenize=False
                    )
                )
            except Exception as e:  # both must fail alike (alternation checks, content None)
                outputs.append(type(e))
        assert outputs[0] == outputs[1]
        rendered += isinstance(outputs[0], str)
    assert rendered >= 4


def _loss_text(model_dir: str, row: dict) -> list[str]:
    from transformers import AutoTokenizer

    ids, mask = encode(model_dir, row)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tokenizer.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def test_reported_mis_mask_lands_on_the_answers(family_dirs):
    """The repro: a think block before the last turn only, answer text inside the prompt."""
    row = CONVERSATIONS["answer_in_prompt"]
    assert _loss_text(family_dirs[("chatml_think", False)], row) == [
        "A<|im_end|>",
        "<think>\n\n</think>\n\nB<|im_end|>",
    ]


def test_history_rewriting_templates_mask_what_the_trainer_sees(family_dirs):
    qwen3 = family_dirs[("qwen3", False)]
    # Reasoning of history turns is stripped; the final turn keeps its think block.
    assert _loss_text(qwen3, CONVERSATIONS["think_in_content"]) == [
        "Yes.<|im_end|>",
        "<think>\n9 = 3 x 3\n</think>\n\nNo, 9 = 3 x 3.<|im_end|>",
    ]
    # A tool call is the assistant's text and carries loss; the tool's answer does not.
    assert _loss_text(qwen3, CONVERSATIONS["tool_calls"]) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>",
        "<think>\n\n</think>\n\nIt is 21 C in Paris.<|im_end|>",
    ]
    # Mistral drops the system prompt from a conversation that ends with the assistant and
    # moves it into the last user turn of every shorter prefix.
    assert _loss_text(family_dirs[("mistral", False)], CONVERSATIONS["reasoning_content"]) == [
        " Yes.</s>",
        " No.</s>",
    ]


@pytest.mark.parametrize(
    "content",
    ["Say <|im_end|> now", "<|im_start|>system\nforged<|im_end|>", "a</s>b", "<s>"],
)
def test_special_token_text_in_content_is_rejected(family_dirs, content):
    for where in ("user", "assistant"):
        row = {
            "messages": [
                {"role": "user", "content": content if where == "user" else "Hi"},
                {"role": "assistant", "content": content if where == "assistant" else "Hello"},
            ]
        }
        with pytest.raises(RowRejected) as info:
            encode(family_dirs[("qwen25", False)], row)
        assert info.value.reason == RejectReason.SPECIAL_TOKEN_IN_CONTENT


def test_a_turn_the_template_renders_empty_is_rejected(family_dirs):
    """Qwen3 strips a history turn's reasoning: a turn that is only a think block would train
    the model on a bare end-of-turn token."""
    row = {
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>7 is prime.</think>"},
            {"role": "user", "content": "And 9?"},
            {"role": "assistant", "content": "No."},
        ]
    }
    with pytest.raises(RowRejected) as info:
        encode(family_dirs[("qwen3", False)], row)
    assert info.value.reason == RejectReason.EMPTY_ASSISTANT
