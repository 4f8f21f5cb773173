"""Chat templates that reproduce what the real ones do, each with its ground truth.

Every template is written once with ``{G}`` / ``{/G}`` around what the model generates for an
assistant turn (after the role header, through the end-of-turn marker). ``plain()`` drops them
(the template as the model ships it); ``annotated()`` turns them into ``{% generation %}`` markers,
so that ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the ground truth.
Both render the same text (tests check it).

Behaviours reproduced:

- ``qwen3``: think block before the final turn only, reasoning stripped from history turns,
  ``reasoning_content``, ``<think>`` split out of content, tools and tool calls, tool responses as
  a user turn (Qwen3's own template, kept line for line).
- ``llama3``: BOS written by the template on the first message, ``| trim`` on content.
- ``llama31``: a default system prompt (knowledge cut-off and date) when none is given; tool
  calls as JSON, tool output through ``tojson`` (quotes escaped).
- ``mistral``: ``[INST]`` with no assistant header, EOS after the answer, the system prompt moved
  into the *last* user turn (so earlier prefixes render differently), strict alternation.
- ``gemma``: ``model`` role, trimmed content, the system prompt folded into the first user turn.
- ``phi3``: ``<|end|>`` closes turns, EOS appended after the last message only.
- ``qwen25``: ChatML with a default system prompt.
- ``chatml_think``: ChatML that writes an empty think block before the last assistant turn only
  (the repro of the mask that landed on the prompt).
- ``gpt_oss``: different tokens end the last turn (``<|return|>``) and history turns (``<|end|>``);
  reasoning read as ``thinking``.
- ``deepseek_r1``: the generation prompt forces ``<think>\\n``; reasoning stripped from every turn.
- ``glm``: no end-of-turn token at all (refused without markers).
"""

from __future__ import annotations

from dataclasses import dataclass

QWEN3 = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": '
    '<function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- else %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and "
    "not(message.content.startswith('<tool_response>') and "
    "message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = "
    "content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{G}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + "
    "content.lstrip('\\n') }}"
    "{%- else %}{{- content }}{%- endif %}"
    "{%- else %}{{- content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>' }}{/G}{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}"
    "{% if loop.index0 == 0 %}{% set header = bos_token + header %}{% endif %}"
    "{{ header }}"
    "{% if message['role'] == 'assistant' %}{G}{{ message['content'] | trim + '<|eot_id|>' }}{/G}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

LLAMA31 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}"
    "{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{G}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    '{{- \'{"name": "\' + tool_call.name + \'", "parameters": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}' }}{{- '<|eot_id|>' }}{/G}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{G}{{- message['content'] | trim + '<|eot_id|>' }}{/G}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{G}{{- ' ' + message['content']|trim + eos_token }}{/G}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of "
    "an initial optional system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if role == 'model' -%}"
    "{G}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{/G}{{ '\\n' }}"
    "{%- else -%}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{G}{{ message['content'] + '<|end|>' }}{/G}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{G}{{- message.content + '<|im_end|>' }}{/G}"
    "{{- '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# gpt-oss (harmony): ``<|return|>`` ends the conversation, ``<|end|>`` a history turn; the final
# turn's reasoning (``thinking``) is an analysis message the model writes before its answer.
GPT_OSS = (
    "{{- '<|start|>system<|message|>You are ChatGPT.<|end|>' }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + m.content + '<|end|>' }}"
    "{%- elif m.role == 'user' %}{{- '<|start|>user<|message|>' + m.content + '<|end|>' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|start|>assistant' }}{G}"
    "{%- if loop.last and m.thinking is defined %}"
    "{{- '<|channel|>analysis<|message|>' + m.thinking + '<|end|><|start|>assistant' }}"
    "{%- endif %}"
    "{{- '<|channel|>final<|message|>' + m.content }}"
    "{%- if loop.last %}{{- '<|return|>' }}{%- else %}{{- '<|end|>' }}{%- endif %}{/G}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

# DeepSeek-R1 distills (QwQ alike): the generation prompt forces ``<think>\n``, and reasoning is
# stripped from every rendered turn, so no trained turn starts with the generation prompt's end.
DEEPSEEK_R1 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    "{%- endif %}"
    "{{ '<｜Assistant｜>' }}{G}{{ content + '<｜end▁of▁sentence｜>' }}{/G}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

# GLM-4 style: no end-of-turn token (the model stops by writing the next role token). Without
# markers the turns cannot be delimited; with them, the markers say what is trained.
GLM = (
    "[gMASK]<sop>{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{ '<|assistant|>\\n' }}{G}{{ m.content }}{/G}"
    "{%- else %}{{ '<|' + m.role + '|>\\n' + m.content }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
)

CHATML_THINK = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{G}"
    "{% if loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>' }}{/G}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A template and the tokenizer set-up it expects (special tokens, BOS/EOS)."""

    source: str
    special_tokens: tuple[str, ...] = ()
    plain_tokens: tuple[str, ...] = ()  # added, not special (Qwen's <think>, <tool_call>)
    bos: str = "<s>"
    eos: str = "</s>"
    tools: bool = False  # renders tool calls and tool messages

    def plain(self) -> str:
        return self.source.replace("{G}", "").replace("{/G}", "")

    def annotated(self) -> str:
        return self.source.replace("{G}", "{% generation %}").replace("{/G}", "{% endgeneration %}")


FAMILIES: dict[str, Family] = {
    "qwen3": Family(
        QWEN3,
        plain_tokens=("<think>", "</think>", "<tool_call>", "</tool_call>"),
        eos="<|im_end|>",
        tools=True,
    ),
    "llama3": Family(
        LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), eos="<|eot_id|>"
    ),
    "llama31": Family(
        LLAMA31,
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        eos="<|eot_id|>",
        tools=True,
    ),
    "mistral": Family(MISTRAL, ("[INST]", "[/INST]")),
    "gemma": Family(
        GEMMA, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>"
    ),
    "phi3": Family(
        PHI3,
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
        eos="<|endoftext|>",
    ),
    "qwen25": Family(QWEN25, eos="<|im_end|>"),
    "chatml_think": Family(CHATML_THINK, eos="<|im_end|>"),
    "gpt_oss": Family(
        GPT_OSS,
        ("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"),
        eos="<|return|>",
    ),
    "deepseek_r1": Family(
        DEEPSEEK_R1,
        ("<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
        bos="<｜begin▁of▁sentence｜>",
        eos="<｜end▁of▁sentence｜>",
    ),
    "glm": Family(GLM, ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|system|>")),
}
