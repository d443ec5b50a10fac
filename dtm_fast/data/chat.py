"""Chat conversations to token ids with a response-only loss mask.

A conversation is rendered with the tokenizer's chat template (or a named one, see TEMPLATES) and
cut at message boundaries into prompt and response segments; each segment is tokenised on its own,
so a response starts exactly where generation starts at inference (after the generation prompt).
Only response tokens carry a loss. Every response ends with the EOS token: it is appended when the
template does not already emit it, or the model never learns to stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dtm_fast.data.records import Conversation
from dtm_fast.errors import DtmError

logger = logging.getLogger(__name__)

# Jinja chat templates by name, for tokenizers that ship none (base models). They follow the
# conventions of the formats they are named after; none depends on tokenizer attributes other than
# bos_token/eos_token, which apply_chat_template passes in.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama2": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '[INST] <<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}{{ '[INST] ' }}{% endif %}"
        "{{ message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as token ids; `labels[i]` is the token id where position i is a response
    token (it carries loss) and IGNORE_INDEX where it is prompt. Not shifted: position i's label is
    its own token, the trainer shifts."""

    input_ids: list[int]
    labels: list[int]
    location: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def response_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class TokenizeReport:
    """What happened to the records: counts a user should see before training starts."""

    examples: int
    truncated: int
    dropped_too_long: int
    dropped_no_response: int
    tokens: int
    response_tokens: int


def resolve_chat_template(tokenizer: Any, template: str | None) -> str:
    """The Jinja template to render with: a named one, a file, inline Jinja, or the tokenizer's own;
    checked to compile, so a syntax error is reported once, with its line, before any record."""
    if template:
        if template in TEMPLATES:
            return TEMPLATES[template]
        path = Path(template)
        if path.suffix in (".jinja", ".j2", ".txt") or path.is_file():
            if not path.is_file():
                raise DtmError(f"chat_template: {template}: no such file")
            try:
                text = path.read_bytes().decode("utf-8")
            except OSError as error:
                raise DtmError(f"chat_template: {template}: cannot read ({error.strerror})") from None
            except UnicodeDecodeError as error:
                raise DtmError(f"chat_template: {template}: not UTF-8 text (offset {error.start}); save it as "
                               "UTF-8") from None
            return _checked(text, f"chat_template file {template}")
        if "{%" in template or "{{" in template:
            return _checked(template, "the inline chat_template")
        raise DtmError(f"chat_template: unknown template {template!r}; use one of "
                       f"{', '.join(sorted(TEMPLATES))}, a path to a .jinja file, or inline Jinja")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # some tokenizers carry several named templates
        own = own.get("default")
    if not own:
        raise DtmError(
            "the tokenizer has no chat template; name one with chat_template: "
            f"({', '.join(sorted(TEMPLATES))}) or give a path to a .jinja file")
    return _checked(own, "the tokenizer's chat template")


def _checked(template: str, source: str) -> str:
    """`template` if it compiles the way transformers compiles chat templates (its sandbox, its
    extensions); a DtmError naming the source and line otherwise."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers layout: rendering reports the error instead
        return template
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as error:
        raise DtmError(f"{source}: Jinja syntax error on line {error.lineno}: {error.message}") from None
    except jinja2.TemplateError as error:
        raise DtmError(f"{source}: not a usable Jinja template ({error})") from None
    return template


def _render(tokenizer: Any, template: str, messages: Sequence[dict[str, str]], generation_prompt: bool,
            location: str = "") -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as error:  # raise_exception() in the template, a bad filter, ...
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DtmError(f"{location or 'a record'}: the chat template fails on it: {message}") from None


def split_segments(tokenizer: Any, template: str, conversation: Conversation) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_response) segments, in order. Turns after the last
    assistant reply teach nothing and are dropped."""
    messages = list(conversation.messages)
    last_reply = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[:last_reply + 1]
    where = conversation.location
    full_text = _render(tokenizer, template, messages, generation_prompt=False, location=where)
    segments: list[tuple[str, bool]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, template, messages[:index], generation_prompt=True, location=where)
        through_reply = _render(tokenizer, template, messages[:index + 1], generation_prompt=False, location=where)
        if not (through_reply.startswith(prompt_text) and full_text.startswith(through_reply)
                and len(prompt_text) >= cursor):
            raise DtmError(
                f"{conversation.location}: the chat template renders earlier turns differently once later "
                "turns are added, so the reply tokens cannot be located; use first_turn_only: true or "
                "another chat_template")
        segments.append((full_text[cursor:len(prompt_text)], False))
        segments.append((full_text[len(prompt_text):len(through_reply)], True))
        cursor = len(through_reply)
    if cursor < len(full_text):
        segments.append((full_text[cursor:], False))
    return [(text, is_response) for text, is_response in segments if text]


def tokenize_conversation(tokenizer: Any, template: str, conversation: Conversation) -> TokenizedExample:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DtmError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_response in split_segments(tokenizer, template, conversation):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if is_response:
            # the template's own end-of-turn marker may follow the EOS ("<|im_end|>\n"), so look
            # for EOS anywhere in the reply rather than only at its end
            if eos_id not in ids:
                ids = ids + [eos_id]
            labels.extend(ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
        input_ids.extend(ids)
    return TokenizedExample(input_ids, labels, conversation.location)


def tokenize_conversations(tokenizer: Any, conversations: Sequence[Conversation], template: str | None,
                           max_length: int, overlong: str = "truncate") -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenise every conversation; sequences over `max_length` are cut (overlong="truncate") or
    left out (overlong="drop"), and counted either way."""
    if overlong not in ("truncate", "drop"):
        raise DtmError(f"overlong: expected 'truncate' or 'drop', got {overlong!r}")
    if not conversations:
        raise DtmError("no training records: the data portion is empty")
    resolved = resolve_chat_template(tokenizer, template)
    examples: list[TokenizedExample] = []
    truncated = dropped_long = dropped_empty = 0
    for conversation in conversations:
        example = tokenize_conversation(tokenizer, resolved, conversation)
        if len(example) > max_length:
            if overlong == "drop":
                dropped_long += 1
                continue
            truncated += 1
            example = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length],
                                       example.location)
        # the first token is never predicted (nothing precedes it), so a lone response token at
        # position 0 teaches nothing either
        if not any(label != IGNORE_INDEX for label in example.labels[1:]):
            dropped_empty += 1
            continue
        examples.append(example)
    if not examples:
        raise DtmError(f"none of the {len(conversations)} records leaves a response token within "
                       f"max_length {max_length}; raise max_length")
    report = TokenizeReport(
        examples=len(examples), truncated=truncated, dropped_too_long=dropped_long,
        dropped_no_response=dropped_empty, tokens=sum(len(e) for e in examples),
        response_tokens=sum(e.response_tokens for e in examples))
    return examples, report
