"""Where each assistant turn lies in a chat template's rendering: the characters that carry loss.

What the loss covers is defined once (DESIGN section 2): for every assistant turn, the text the
model generates after its role header, up to and including the turn's end-of-turn token — never a
role header, a system prompt or user text, and not the whitespace a template emits after the
end-of-turn token (that is the next turn's boundary). For a Qwen3-style final turn the think block
the model generates is part of it; a turn the template rewrites in the history (reasoning
stripped) is covered as the trainer sees it there. The ground truth is the same template annotated
with ``{% generation %}`` markers, and a template that has them is used as it is.

A template without markers is located by rendering. The end-of-turn token is learnt once per
template from probe conversations (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``,
``<|end|>``; gpt-oss ends a conversation with ``<|return|>`` and a history turn with ``<|end|>``);
a template that writes none is refused (the model would never learn to stop). Then, per turn k:

- start: where the rendering of the conversation before it with the generation prompt ends, when
  that is a prefix of the full rendering; or, when the template renders earlier turns differently
  once more follows (Mistral moves the system prompt into the last user turn), right after the text
  it writes after the previous message's content; or, when the generation prompt forces text the
  trained turn does not hold (QwQ and DeepSeek-R1 end it with ``<think>\\n``), where the turn's
  content starts, provided a role header separates it from the conversation before it;
- end: the turn as the template renders it when it is the last message, through its end-of-turn
  token, when the full rendering holds exactly that at the start; or, when the history rendering
  differs (Qwen3 strips the think block), the first end-of-turn token after the start, provided no
  message contains that text and the turn's own content lies before it.

Contents are located by substituting a probe for one message and comparing renderings. Anything
else raises ``RowRejected`` (``span_not_found``): the row is rejected, never guessed — a text
search over the conversation can match the answer inside the prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from qtune.schema import RejectReason, RowRejected

# Rendered where a message's content goes, to find that content's characters by difference.
_PROBE = "\ue000qtune\ue001"
_PROBE_QUESTION = "qtune probe question"
_PROBE_ANSWER = "qtune probe answer"
_PROBE_FOLLOW_UP = "qtune probe follow-up"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

Span = tuple[int, int]


class UnsupportedTemplate(ValueError):
    """A chat template whose assistant turns cannot be delimited (no end-of-turn token)."""


def has_generation_markers(template: str | None) -> bool:
    """Whether a template marks assistant text with ``{% generation %}`` (the ground truth)."""
    return bool(template) and _GENERATION_TAG.search(template) is not None


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-level slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, min(len(a), len(b), limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class TurnEnd:
    """How a template closes an assistant turn, learnt from probe conversations."""

    marker: str  # closes the conversation's last turn
    history_marker: str  # closes a turn that more messages follow (usually the same)
    tail: str  # what the template appends after the last turn's marker (a newline, an EOS)
    # A turn renders differently once more follows (Qwen3 strips its think block): the turn as
    # the last message is no guide to a history turn.
    rewrites_history: bool = False


class ChatRenderer:
    """Renders conversations exactly as ``tokenizer.apply_chat_template`` does (same template,
    same special-token variables) and locates the assistant spans of the full rendering."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._turn_end: TurnEnd | None = None
        self._turn_end_error: str | None = None
        specials = sorted(_special_tokens(tokenizer), key=len, reverse=True)
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None

    # --- rendering --------------------------------------------------------------------------

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
    ) -> str:
        return self._render(messages, add_generation_prompt, tools, False)[0]

    def _render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict] | None,
        track_generation: bool,
    ) -> tuple[str, list[Span]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        tokenizer = self.tokenizer
        # apply_chat_template refuses an empty conversation; the prefix before an assistant turn
        # that opens the conversation is one, so render as it does, without that check.
        rendered, indices = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=tokenizer.get_chat_template(None, tools),
            return_assistant_tokens_mask=track_generation,
            add_generation_prompt=add_generation_prompt,
            **tokenizer.special_tokens_map,
        )
        return rendered[0], (list(indices[0]) if track_generation else [])

    def _try_render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: list[dict] | None
    ) -> str | None:
        try:
            return self.render(messages, add_generation_prompt, tools)
        except Exception:  # jinja raises many types; a template may index messages[0]
            return None

    def template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Normalised turns (MESSAGE_TYPE) -> what the template receives: absent fields left out
        (``content`` stays, None for a bare tool call, as OpenAI sends it), tool calls as the
        OpenAI-style list, reasoning under the name the template reads (``reasoning_content``;
        ``thinking`` for gpt-oss-style templates)."""
        template = self.tokenizer.get_chat_template(None, None) or ""
        rename = "reasoning_content" not in template and "thinking" in template
        out = []
        for turn in messages:
            message = {k: v for k, v in turn.items() if v is not None or k == "content"}
            if "tool_calls" in message:
                message["tool_calls"] = json.loads(message["tool_calls"])
            if rename and "reasoning_content" in message:
                message["thinking"] = message.pop("reasoning_content")
            out.append(message)
        return out

    # --- checks -----------------------------------------------------------------------------

    def check_content(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> None:
        """Reject text that spells a special token: it would tokenise as the control token and
        could forge turn boundaries (a forged turn inside an answer would carry loss)."""
        if self._special is None:
            return
        for where, text in _texts(messages, tools):
            found = self._special.search(text)
            if found:
                raise RowRejected(
                    RejectReason.SPECIAL_TOKEN_IN_CONTENT,
                    f"{where} contains the special token {found.group()!r}",
                )

    def turn_end(self) -> TurnEnd:
        """The template's end-of-turn tokens, learnt once from probe conversations: what follows
        a probe answer both when it ends the conversation and when a user turn follows, cut at a
        token boundary. Raises UnsupportedTemplate."""
        if self._turn_end is not None:
            return self._turn_end
        if self._turn_end_error is not None:
            raise UnsupportedTemplate(self._turn_end_error)
        answer = {"role": "assistant", "content": _PROBE_ANSWER}
        follow_up = {"role": "user", "content": _PROBE_FOLLOW_UP}
        error = "it does not render a probe conversation (user, assistant, user)"
        for opening in ([], [{"role": "system", "content": "qtune probe system"}]):
            prompt = [*opening, {"role": "user", "content": _PROBE_QUESTION}]
            try:
                last = self.render([*prompt, answer], False)
                history = self.render([*prompt, answer, follow_up], False)
            except Exception as e:  # jinja raises many types
                error = f"it fails on a probe conversation ({type(e).__name__}: {e})"
                continue
            at_last, at_history = last.find(_PROBE_ANSWER), history.find(_PROBE_ANSWER)
            if min(at_last, at_history) < 0:
                continue
            after_last = last[at_last + len(_PROBE_ANSWER) :]
            after_history = history[at_history + len(_PROBE_ANSWER) :]
            shared = self._common_token_prefix(after_last, after_history).rstrip()
            rewrites = last[:at_last] != history[:at_history]
            if shared:
                self._turn_end = TurnEnd(shared, shared, after_last[len(shared) :], rewrites)
                return self._turn_end
            # Different tokens close the last turn and a history turn (gpt-oss).
            closing = [self._leading_special(a) for a in (after_last, after_history)]
            if all(closing):
                marker, history_marker = closing
                self._turn_end = TurnEnd(marker, history_marker, after_last[len(marker) :], True)
                return self._turn_end
            error = (
                "it writes no end-of-turn token after an assistant turn, so the model would "
                f"never learn to stop (after a probe answer: {after_last[:40]!r} at the end, "
                f"{after_history[:40]!r} before a user turn); use a template that closes turns "
                "with a token, or mark the trained text with {% generation %}"
            )
            break
        self._turn_end_error = f"the chat template cannot be used for loss masks: {error}"
        raise UnsupportedTemplate(self._turn_end_error)

    def _leading_special(self, text: str) -> str | None:
        found = self._special.match(text) if self._special is not None else None
        return found.group() if found else None

    def _common_token_prefix(self, a: str, b: str) -> str:
        """The longest common prefix of two texts that ends on a token boundary of both (a
        character prefix could end inside a special token: ``<|end|>\\n<|`` )."""
        encoded = self.tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
        ids_a = encoded["input_ids"]
        ids_b = self.tokenizer(b, add_special_tokens=False)["input_ids"]
        n = 0
        while n < min(len(ids_a), len(ids_b)) and ids_a[n] == ids_b[n]:
            n += 1
        return a[: encoded["offset_mapping"][n - 1][1]] if n else ""

    # --- spans ------------------------------------------------------------------------------

    def assistant_spans(
        self, messages: list[dict[str, Any]], tools: list[dict] | None = None
    ) -> tuple[str, list[Span]]:
        """The full rendering and the character span of every assistant turn. Raises RowRejected.

        ``messages``: normalised turns (MESSAGE_TYPE fields; absent ones None or left out).
        """
        messages = self.template_messages(messages)
        self.check_content(messages, tools)
        if has_generation_markers(self.tokenizer.get_chat_template(None, tools)):
            text, spans = self._render(messages, False, tools, True)
            spans = [(a, b) for a, b in spans if b > a]
            markers = None
        else:
            try:
                markers = self.turn_end()
            except UnsupportedTemplate as e:
                raise RowRejected(RejectReason.SPAN_NOT_FOUND, str(e)) from e
            text, spans = self._locate(messages, tools, markers)
        self._check_tools_rendered(messages, tools, text, spans)
        if markers is None:
            try:
                markers = self.turn_end()
            except UnsupportedTemplate:
                return text, spans  # the markers say what is trained
        for n, (start, end) in enumerate(spans):
            said = text[start:end]
            for marker in {markers.marker, markers.history_marker}:
                said = said.removesuffix(marker)
            if not said.strip():
                raise RowRejected(
                    RejectReason.EMPTY_ASSISTANT,
                    f"the chat template renders assistant turn {n + 1} empty (only its "
                    "end-of-turn token would carry loss)",
                )
        return text, spans

    def _locate(
        self, messages: list[dict[str, Any]], tools: list[dict] | None, turn_end: TurnEnd
    ) -> tuple[str, list[Span]]:
        text = self.render(messages, False, tools)
        spans: list[Span] = []
        last = len(messages) - 1
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._try_render(messages[:k], True, tools)
            if k == last:
                through = text
            elif turn_end.rewrites_history:
                through = None  # its rendering as the last message differs from the history's
            else:
                through = self._try_render(messages[: k + 1], False, tools)
            start = self._turn_start(messages, tools, text, k, before)
            end = self._turn_end_at(messages, tools, text, k, start, before, through, turn_end)
            if spans and start < spans[-1][1]:
                raise RowRejected(
                    RejectReason.SPAN_NOT_FOUND,
                    f"assistant turn {k} overlaps the previous one in the rendering",
                )
            spans.append((start, end))
        return text, spans

    def _turn_start(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None,
        text: str,
        k: int,
        before: str | None,
    ) -> int:
        if before is not None and text.startswith(before):
            return len(before)
        if k > 0 and before is not None:
            # Earlier turns render differently once more follows: anchor on the previous
            # message's content and the text the template puts after it before generating.
            previous = self._content_region(messages, tools, k - 1, text, False)
            probed = self._content_region(messages[:k], tools, k - 1, before, True)
            if previous is not None and probed is not None:
                closing = before[probed[1] :]
                if text.startswith(closing, previous[1]):
                    return previous[1] + len(closing)
        if before is not None:
            # The generation prompt forces text the trained turn does not hold (``<think>\n``):
            # the turn starts with its content, after the role header that follows the
            # conversation before it.
            history = self._try_render(messages[:k], False, tools) if k else ""
            content = self._content_region(messages, tools, k, text, False)
            if history is not None and content is not None:
                shared = _common_prefix(history, text)
                if content[0] > shared and before[:shared] == text[:shared]:
                    return content[0]
        raise RowRejected(
            RejectReason.SPAN_NOT_FOUND,
            f"assistant turn {k}: the chat template renders no generation prompt that the "
            "conversation's rendering continues"
            + (" (the conversation starts with the assistant)" if k == 0 else ""),
        )

    def _turn_end_at(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None,
        text: str,
        k: int,
        start: int,
        before: str | None,
        through: str | None,
        turn_end: TurnEnd,
    ) -> int:
        if before is not None and through is not None and through.startswith(before):
            core = _cut_turn(through[len(before) :], turn_end)
            if core and text.startswith(core, start):
                return start + len(core)
        # The template renders this turn differently in the history than as the last message:
        # the turn ends at the first end-of-turn token, a text no message contains.
        marker = turn_end.history_marker
        if not any(marker in value for _, value in _texts(messages, tools)):
            end = text.find(marker, start)
            content = self._content_region(messages, tools, k, text, False)
            if end >= 0 and content is not None and start <= content[0] and content[1] <= end:
                return end + len(marker)
        raise RowRejected(
            RejectReason.SPAN_NOT_FOUND,
            f"assistant turn {k}: cannot tell where it ends in the chat template's rendering",
        )

    def _content_region(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None,
        i: int,
        text: str,
        add_generation_prompt: bool,
    ) -> Span | None:
        """Characters of ``text`` (the rendering of ``messages``) that depend on message i's
        content: what differs when a probe is rendered in its place."""
        probed = [dict(m) for m in messages]
        probed[i]["content"] = _PROBE
        other = self._try_render(probed, add_generation_prompt, tools)
        if other is None:
            return None
        head = _common_prefix(text, other)
        tail = _common_suffix(text, other, min(len(text), len(other)) - head)
        return head, len(text) - tail

    def _check_tools_rendered(
        self, messages: list[dict[str, Any]], tools: list[dict] | None, text: str, spans: list[Span]
    ) -> None:
        """Tool calls must be rendered inside the loss spans and tool results somewhere: a
        template that drops them would train the model on an empty turn or an unexplained
        answer."""
        covered = "".join(text[a:b] for a, b in spans)
        for i, message in enumerate(messages):
            for call in message.get("tool_calls") or []:
                name = call.get("function", call).get("name", "")
                if name not in covered:
                    raise RowRejected(
                        RejectReason.UNSUPPORTED_TOOL_CALLS,
                        f"messages[{i}]: the chat template does not render the tool call "
                        f"{name!r} in the assistant turn",
                    )
            if message["role"] == "tool" and (message.get("content") or "").strip() not in text:
                # Templates may render a tool's output as JSON (quotes escaped): rendered means
                # the output changes the rendering.
                region = self._content_region(messages, tools, i, text, False)
                if region is None or region[1] <= region[0]:
                    raise RowRejected(
                        RejectReason.UNSUPPORTED_TOOL_CALLS,
                        f"messages[{i}]: the chat template does not render tool messages",
                    )


def _cut_turn(turn: str, turn_end: TurnEnd) -> str:
    """A turn rendered as the last message -> its text through the end-of-turn token (the first
    one: where generation stops). A turn closed otherwise (a gpt-oss tool call's ``<|call|>``)
    is whole, without what the template appends to a conversation's end."""
    at = turn.find(turn_end.marker)
    if at >= 0:
        return turn[: at + len(turn_end.marker)]
    if turn_end.tail and turn.endswith(turn_end.tail):
        return turn[: len(turn) - len(turn_end.tail)]
    return turn


def _special_tokens(tokenizer: Any) -> set[str]:
    tokens = set(tokenizer.all_special_tokens)
    tokens.update(str(t) for t in tokenizer.added_tokens_decoder.values() if t.special)
    return {t for t in tokens if t}


def _texts(messages: list[dict[str, Any]], tools: list[dict] | None):
    """(where, text) of every string a row brings into the rendering."""
    for i, message in enumerate(messages):
        for key, value in message.items():
            if key == "role" or value is None:
                continue
            if isinstance(value, str):
                yield f"messages[{i}].{key}", value
            else:
                yield f"messages[{i}].{key}", json.dumps(value, ensure_ascii=False)
    if tools:
        yield "tools", json.dumps(tools, ensure_ascii=False)
