"""Tokenisation with response-only loss masks, checked against hand-written expectations."""

import json

import pytest

from dtm_fast.data.chat import IGNORE_INDEX, TEMPLATES, tokenize_conversation, tokenize_conversations
from dtm_fast.data.records import Conversation, load_conversations
from dtm_fast.errors import DtmError


def conversation(*turns, location="test:1"):
    roles = ["user", "assistant"] * len(turns)
    return Conversation([{"role": role, "content": text} for role, text in zip(roles, turns)], location)


def byte_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_only_the_reply_carries_loss(byte_tokenizer):
    example = tokenize_conversation(byte_tokenizer, TEMPLATES["chatml"], conversation("hi", "yo"))
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    reply = "yo<|im_end|>\n"
    # hand count: 3 special tokens + "user\nhi" (7 bytes) + "\n" + "assistant\n" (10 bytes) = 21 tokens
    assert len(byte_ids(byte_tokenizer, prompt)) == 21
    assert example.input_ids == byte_ids(byte_tokenizer, prompt + reply)
    assert example.labels[:21] == [IGNORE_INDEX] * 21
    # the reply: "y", "o", <|im_end|> (the EOS, already emitted by the template), "\n"
    assert example.labels[21:] == example.input_ids[21:]
    assert len(example.labels) - 21 == 4
    assert example.labels[23] == byte_tokenizer.eos_token_id
    assert example.response_tokens == 4


def test_every_reply_of_a_multi_turn_conversation_is_learned(byte_tokenizer):
    example = tokenize_conversation(byte_tokenizer, TEMPLATES["chatml"], conversation("a", "b", "c", "d"))
    learned = byte_tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])
    assert learned == "b<|im_end|>\nd<|im_end|>\n"
    prompt_text = byte_tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX])
    assert prompt_text == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n" \
                          "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"


def test_eos_is_appended_when_the_template_has_none(byte_tokenizer):
    no_eos = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    example = tokenize_conversation(byte_tokenizer, no_eos, conversation("hi", "yo"))
    assert example.input_ids[-1] == byte_tokenizer.eos_token_id
    learned = [t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    assert learned == byte_ids(byte_tokenizer, "yo\n") + [byte_tokenizer.eos_token_id]


def test_trailing_user_turn_is_dropped(byte_tokenizer):
    convo = conversation("q", "a", "unanswered")
    example = tokenize_conversation(byte_tokenizer, TEMPLATES["chatml"], convo)
    assert "unanswered" not in byte_tokenizer.decode(example.input_ids)


def test_named_template_for_a_tokenizer_without_one(bare_tokenizer):
    examples, _ = tokenize_conversations(bare_tokenizer, [conversation("hi", "yo")], "alpaca", max_length=512)
    text = bare_tokenizer.decode(examples[0].input_ids)
    assert text == "### Instruction:\nhi\n\n### Response:\nyo<|im_end|>\n\n"


def test_tokenizer_without_template_and_none_named_is_an_error(bare_tokenizer):
    with pytest.raises(DtmError, match="no chat template"):
        tokenize_conversations(bare_tokenizer, [conversation("hi", "yo")], None, max_length=512)


def test_unknown_template_name_is_an_error(byte_tokenizer):
    with pytest.raises(DtmError, match="unknown template 'vicuna'"):
        tokenize_conversations(byte_tokenizer, [conversation("hi", "yo")], "vicuna", max_length=512)


def test_overlong_sequences_are_truncated_and_counted(byte_tokenizer):
    convos = [conversation("q", "a" * 100), conversation("q", "short")]
    examples, report = tokenize_conversations(byte_tokenizer, convos, None, max_length=40)
    assert report.truncated == 1 and report.dropped_too_long == 0
    assert [len(e) for e in examples][0] == 40
    assert len(examples) == 2


def test_overlong_sequences_can_be_dropped_and_counted(byte_tokenizer):
    convos = [conversation("q", "a" * 100), conversation("q", "short")]
    examples, report = tokenize_conversations(byte_tokenizer, convos, None, max_length=40, overlong="drop")
    assert report.dropped_too_long == 1 and len(examples) == 1


def test_a_prompt_filling_max_length_leaves_no_reply_and_is_dropped(byte_tokenizer):
    convos = [conversation("x" * 200, "a"), conversation("q", "a")]
    examples, report = tokenize_conversations(byte_tokenizer, convos, None, max_length=60)
    assert report.dropped_no_response == 1 and len(examples) == 1


def test_empty_portion_is_an_error(byte_tokenizer):
    with pytest.raises(DtmError, match="empty"):
        tokenize_conversations(byte_tokenizer, [], None, max_length=64)


def test_record_missing_its_field_is_named(tmp_path):
    path = tmp_path / "portion.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    with pytest.raises(DtmError, match=r"portion.jsonl:2: .*'output'"):
        load_conversations(path, fmt="alpaca")


def test_template_syntax_errors_name_the_source_and_line(byte_tokenizer, tmp_path):
    from dtm_fast.data.chat import resolve_chat_template

    with pytest.raises(DtmError, match=r"the inline chat_template: Jinja syntax error on line 2: unexpected '}'"):
        resolve_chat_template(byte_tokenizer, "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    path = tmp_path / "latin1.jinja"
    path.write_bytes(b"{{ 'caf\xe9' }}")
    with pytest.raises(DtmError, match=r"latin1.jinja: not UTF-8 text \(offset 7\)"):
        resolve_chat_template(byte_tokenizer, str(path))
    # what transformers' own template environment accepts is accepted: loop controls, {% generation %}
    fine = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
            "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% if loop.index > 9 %}{% break %}{% endif %}"
            "{% endfor %}")
    assert resolve_chat_template(byte_tokenizer, fine) == fine


def test_a_template_that_raises_names_the_record(byte_tokenizer):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DtmError, match="portion.jsonl:7: the chat template fails on it: no system turns"):
        system_first = Conversation([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "ok"}], "portion.jsonl:7")
        tokenize_conversations(byte_tokenizer, [system_first], strict, 64)
