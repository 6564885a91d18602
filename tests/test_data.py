"""qcore.data: record normalization (every format + every malformed kind), tokenization layout and truncation
policy, collation. Exact layouts are checked on a hand-built word-level tokenizer (one token per letter) and on
the tiny BPE tokenizer with its ChatML template."""
import copy
import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from qcore.config import ConfigError, DataConfig
from qcore.data import (
    InvalidRecord,
    collate_pairs,
    collate_sft,
    detect_format,
    encode_prompt,
    normalize_record,
    parse_json_line,
    preprocess_record,
    render_prompt,
    tokenize_pair,
    tokenize_sft,
)

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
WORD_TEMPLATE = ("{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}[ assistant ]{% endif %}")


def _word_tokenizer(chat_template=None):
    """Word level: ids 0 <pad>, 1 </s>, 2 <unk>, 3 '[', 4 ']', 5 user, 6 assistant, 7 system, 8.. 'a'..'z'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "[", "]", "user", "assistant", "system"] + list("abcdefghijklmnopqrstuvwxyz")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   chat_template=chat_template)


def W(text):
    """Word-tokenizer ids of space-separated letters."""
    return [8 + ord(c) - ord("a") for c in text.split()]


@pytest.fixture(scope="module")
def word_tok():
    return _word_tokenizer()


@pytest.fixture(scope="module")
def word_chat_tok():
    return _word_tokenizer(WORD_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tiny(tiny_tokenizer):
    """The tiny BPE tokenizer without its chat template (raw-text path)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    return tok


def cfg(**kw):
    return DataConfig(**kw)


def _lines(name):
    return (SAMPLES / name).read_text().splitlines()


def _check_row(row, max_length):
    """Invariants every tokenized pair row satisfies."""
    n = row["prompt_length"]
    assert set(row) == {"chosen_input_ids", "chosen_response_mask", "rejected_input_ids",
                        "rejected_response_mask", "prompt_length"}
    assert row["chosen_input_ids"][:n] == row["rejected_input_ids"][:n]
    for side in ("chosen", "rejected"):
        ids, mask = row[f"{side}_input_ids"], row[f"{side}_response_mask"]
        assert len(ids) == len(mask) <= max_length
        assert mask == [0] * n + [1] * (len(ids) - n)
        assert all(isinstance(i, int) for i in ids)
        assert sum(mask) >= 1
    assert row["chosen_input_ids"] != row["rejected_input_ids"]


# ---------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, "string"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"}, "conversational"),
    ({"chosen": [{"role": "user", "content": "p"}], "rejected": []}, "conversational"),
    ({"chosen": "\n\nHuman: p\n\nAssistant: c", "rejected": "\n\nHuman: p\n\nAssistant: r"}, "hh"),
    ({"query": "q", "responses": {"academy": "a"}}, "dsp"),
    ({"query": "q", "academy": "a", "business": "b"}, "dsp"),
])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_detect_format_uses_configured_keys():
    record = {"question": "p", "good": "c", "bad": "r"}
    assert detect_format(record, cfg(prompt_key="question", chosen_key="good", rejected_key="bad")) == "string"
    with pytest.raises(InvalidRecord) as err:
        detect_format(record)
    assert (err.value.field, err.value.reason) == ("<record>", "unknown format (keys: ['bad', 'good', 'question'])")


def test_string_format_with_custom_keys():
    record = {"question": "What is 2+2?", "good": "Four.", "bad": "Five.", "extra": 1}
    pairs = normalize_record(record, cfg(prompt_key="question", chosen_key="good", rejected_key="bad"))
    assert pairs == [{"prompt": "What is 2+2?", "chosen": "Four.", "rejected": "Five."}]


def test_hh_single_turn():
    record = {"chosen": "\n\nHuman: Is it cold?\n\nAssistant: Yes, take a coat.",
              "rejected": "\n\nHuman: Is it cold?\n\nAssistant: No."}
    assert normalize_record(record, cfg()) == [
        {"prompt": [{"role": "user", "content": "Is it cold?"}], "chosen": "Yes, take a coat.", "rejected": "No."}]


def test_hh_multi_turn_and_shared_response_start():
    # the responses share their first words: the prompt still ends at the last shared "\n\nAssistant:"
    pre = "\n\nHuman: Hi\n\nAssistant: Hello! What can I do?\n\nHuman: A fruit please.\n\nAssistant:"
    record = {"chosen": pre + " I suggest an apple.", "rejected": pre + " I suggest a brick."}
    (pair,) = normalize_record(record, cfg(format="hh"))
    assert pair["prompt"] == [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello! What can I do?"},
                              {"role": "user", "content": "A fruit please."}]
    assert (pair["chosen"], pair["rejected"]) == ("I suggest an apple.", "I suggest a brick.")


def test_conversational_explicit_prompt_and_completions():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "x"}]
    record = {"prompt": prompt,
              "chosen": [{"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Bye."}],
              "rejected": "Go away."}
    (pair,) = normalize_record(record, cfg())
    assert pair == {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    "chosen": "Hello.\nBye.", "rejected": "Go away."}


def test_conversational_implicit_prompt():
    u = {"role": "user", "content": "Mix blue and yellow?"}
    record = {"chosen": [u, {"role": "assistant", "content": "Green."}],
              "rejected": [u, {"role": "assistant", "content": "Purple."}]}
    assert normalize_record(record, cfg()) == [{"prompt": [u], "chosen": "Green.", "rejected": "Purple."}]


def test_dsp_nested_flat_and_target_domain():
    nested = {"query": "Why?", "responses": {"academy": "A", "business": "B", "entertainment": "E", "literature": "L"}}
    assert normalize_record(nested, cfg()) == [
        {"prompt": "Why?", "chosen": "A", "rejected": r} for r in ("B", "E", "L")]
    assert [p["rejected"] for p in normalize_record(nested, cfg(dsp_chosen_domain="literature"))] == ["A", "B", "E"]
    assert {p["chosen"] for p in normalize_record(nested, cfg(dsp_chosen_domain="literature"))} == {"L"}
    flat = {"query": "Why?", "literature": "L", "academy": "A", "business": "B", "other": "ignored"}
    assert normalize_record(flat, cfg(format="dsp")) == [
        {"prompt": "Why?", "chosen": "A", "rejected": r} for r in ("B", "L")]
    custom = {"query": "Q", "responses": {"formal": "F", "casual": "C"}}
    assert normalize_record(custom, cfg(dsp_chosen_domain="casual")) == [{"prompt": "Q", "chosen": "C", "rejected": "F"}]


@pytest.mark.parametrize("name, fmt, n_pairs", [
    ("hh.jsonl", "hh", 6), ("dsp.jsonl", "dsp", 9), ("string.jsonl", "string", 4),
    ("conversational.jsonl", "conversational", 4)])
def test_sample_files(name, fmt, n_pairs, tiny_tokenizer):
    data_cfg = cfg()
    rows = []
    for line in _lines(name):
        record = parse_json_line(line)
        assert detect_format(record) == fmt
        assert normalize_record(record, data_cfg) == normalize_record(record, dataclasses.replace(data_cfg, format=fmt))
        rows += preprocess_record(line, tiny_tokenizer, data_cfg)
    assert len(rows) == n_pairs
    for row in rows:
        _check_row(row, data_cfg.max_length)
        assert row["chosen_input_ids"][-1] == row["rejected_input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_hh_sample_multi_turn_renders_every_turn(tiny_tokenizer):
    record = parse_json_line(_lines("hh.jsonl")[4])
    (pair,) = normalize_record(record, cfg())
    assert [m["role"] for m in pair["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    (row,) = preprocess_record(record, tiny_tokenizer, cfg())
    prompt = tiny_tokenizer.decode(row["chosen_input_ids"][: row["prompt_length"]])
    assert prompt.count("<|im_start|>user\n") == 3 and prompt.count("<|im_start|>assistant\n") == 3
    assert prompt.endswith("Walk breaks sound easier.<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------- invalid
BAD_EXPECTED = [
    ("<line>", "malformed JSON: Expecting ',' delimiter: line 1 column 75 (char 74)"),
    ("rejected", "missing key"),
    ("chosen", "empty response"),
    ("rejected", "chosen and rejected are identical"),
    ("rejected", "over-long: chosen and rejected are identical after truncation to max_length=512"),
    ("chosen", "malformed HH text: no Assistant turn"),
    ("responses.academy", "target domain response missing"),
    ("prompt", "expected a string, got int"),
    ("<record>", "unknown format (keys: ['text'])"),
]


@pytest.mark.parametrize("index", range(len(BAD_EXPECTED)))
def test_bad_samples(index, tiny_tokenizer):
    lines = _lines("bad.jsonl")
    assert len(lines) == len(BAD_EXPECTED)
    with pytest.raises(InvalidRecord) as err:
        preprocess_record(lines[index], tiny_tokenizer, cfg())
    assert (err.value.field, err.value.reason) == BAD_EXPECTED[index]


def test_bad_overlong_sample_is_fine_when_long_enough(tiny_tokenizer):
    """The over-long row fails only because of truncation: with room for the differing end it tokenizes."""
    line = _lines("bad.jsonl")[4]
    (row,) = preprocess_record(line, tiny_tokenizer, cfg(max_length=4096, max_prompt_length=256))
    assert row["chosen_input_ids"][-1] == tiny_tokenizer.eos_token_id and len(row["chosen_input_ids"]) > 512


U = {"role": "user", "content": "hi"}
AS = {"role": "assistant", "content": "yo"}
SYS = {"role": "system", "content": "be brief"}
HP = "\n\nHuman: q\n\nAssistant:"


@pytest.mark.parametrize("record, overrides, field, reason", [
    ({"chosen": "c", "rejected": "r", "prompt": None}, {}, "prompt", "missing key"),
    ({"prompt": "p", "rejected": "r"}, {"format": "string"}, "chosen", "missing key"),
    ({"prompt": " \n\t", "chosen": "c", "rejected": "r"}, {}, "prompt", "empty prompt"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, {}, "rejected", "empty response"),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, {}, "rejected", "expected a string, got int"),
    ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, {}, "chosen", "expected a string, got list"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, {}, "rejected", "chosen and rejected are identical"),
    ({"q": "p", "c": "x", "r": "x"}, {"prompt_key": "q", "chosen_key": "c", "rejected_key": "r"},
     "r", "chosen and rejected are identical"),
    # conversational
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, {"format": "conversational"},
     "prompt", "expected a list of messages, got str"),
    ({"prompt": [], "chosen": "c", "rejected": "r"}, {}, "prompt", "empty message list"),
    ({"prompt": ["hi"], "chosen": "c", "rejected": "r"}, {}, "prompt[0]", "expected a message object, got str"),
    ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, {}, "prompt[0].content", "missing key"),
    ({"prompt": [{"content": "x"}], "chosen": "c", "rejected": "r"}, {}, "prompt[0].role", "missing key"),
    ({"prompt": [U, AS, {"role": "user", "content": "  "}], "chosen": "c", "rejected": "r"}, {},
     "prompt[2].content", "empty message"),
    ({"prompt": [U, AS], "chosen": "c", "rejected": "r"}, {}, "prompt", "the prompt ends with an assistant message"),
    # roles: what a chat template accepts (system first, then user/assistant alternating, a user turn last)
    ({"prompt": [SYS, {"role": "tool", "content": "x"}, U], "chosen": "c", "rejected": "r"}, {},
     "prompt[1].role", "unknown role 'tool' (expected user, assistant or system)"),
    ({"prompt": [U, U], "chosen": "c", "rejected": "r"}, {},
     "prompt[1].role", "two 'user' messages in a row (user and assistant must alternate)"),
    ({"prompt": [U, AS, AS, U], "chosen": "c", "rejected": "r"}, {},
     "prompt[2].role", "two 'assistant' messages in a row (user and assistant must alternate)"),
    ({"prompt": [AS, U], "chosen": "c", "rejected": "r"}, {},
     "prompt[0].role", "the conversation must start with a user message (after an optional system message)"),
    ({"prompt": [SYS, AS, U], "chosen": "c", "rejected": "r"}, {},
     "prompt[1].role", "the conversation must start with a user message (after an optional system message)"),
    ({"prompt": [U, SYS], "chosen": "c", "rejected": "r"}, {},
     "prompt[1].role", "a system message is only allowed first"),
    ({"prompt": [SYS], "chosen": "c", "rejected": "r"}, {}, "prompt", "the prompt has no user message to respond to"),
    ({"chosen": [U, U, AS], "rejected": [U, U, {"role": "assistant", "content": "no"}]}, {},
     "prompt[1].role", "two 'user' messages in a row (user and assistant must alternate)"),
    ({"prompt": [U], "chosen": [U], "rejected": "r"}, {}, "chosen[0].role", "expected 'assistant', got 'user'"),
    ({"prompt": [U], "chosen": [AS], "rejected": [{"role": "assistant", "content": ""}]}, {},
     "rejected[0].content", "empty message"),
    ({"prompt": [U], "chosen": [AS], "rejected": [AS]}, {}, "rejected", "chosen and rejected are identical"),
    ({"chosen": [U, AS], "rejected": [{"role": "user", "content": "other"}, AS]}, {},
     "rejected", "no shared prompt messages with chosen"),
    ({"chosen": [U, AS, AS], "rejected": [U, {"role": "assistant", "content": "no"}]}, {},
     "chosen", "expected the shared prompt followed by one assistant message"),
    # hh
    ({"chosen": "\n\nHuman: q", "rejected": HP + " r"}, {}, "chosen", "malformed HH text: no Assistant turn"),
    ({"chosen": HP + " c", "rejected": "\n\nHuman: q r"}, {}, "rejected", "malformed HH text: no Assistant turn"),
    ({"chosen": HP, "rejected": HP + " r"}, {}, "chosen", "empty response"),
    ({"chosen": HP + " c", "rejected": HP + "  \n"}, {}, "rejected", "empty response"),
    ({"chosen": HP + " c", "rejected": HP + " c"}, {}, "rejected", "chosen and rejected are identical"),
    ({"chosen": HP + " c", "rejected": "\n\nHuman: other\n\nAssistant: r"}, {},
     "rejected", "malformed HH text: no prompt shared with chosen"),
    ({"chosen": "Hello" + HP + " c", "rejected": "Hello" + HP + " r"}, {},
     "chosen", "malformed HH text: text before the first Human turn"),
    ({"chosen": "\n\nAssistant: c", "rejected": "\n\nAssistant: r"}, {},
     "chosen", "malformed HH text: the first turn is not a Human turn"),
    ({"chosen": "\n\nHuman:  \n\nAssistant: c", "rejected": "\n\nHuman:  \n\nAssistant: r"}, {},
     "chosen", "malformed HH text: empty Human turn"),
    ({"chosen": HP + " c\n\nHuman: more?", "rejected": HP + " r"}, {},
     "chosen", "malformed HH text: the response continues into another Human turn"),
    ({"chosen": HP + " c", "rejected": HP + " r\n\nAssistant: and more"}, {},
     "rejected", "malformed HH text: the response continues into another Assistant turn"),
    ({"chosen": "\n\nHuman: a\n\nHuman: b" + HP + " c", "rejected": "\n\nHuman: a\n\nHuman: b" + HP + " r"}, {},
     "chosen", "malformed HH text: two Human turns in a row (turns must alternate)"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: c", "rejected": "\n\nHuman: q\n\nAssistant: a\n\nAssistant: r"},
     {}, "chosen", "malformed HH text: the last turn before the response is not a Human turn"),
    ({"chosen": 5, "rejected": HP + " r"}, {"format": "hh"}, "chosen", "expected a string, got int"),
    # dsp
    ({"query": "q", "responses": {"business": "b", "literature": "l"}}, {},
     "responses.academy", "target domain response missing"),
    ({"query": "q", "business": "b", "literature": "l"}, {}, "academy", "target domain response missing"),
    ({"query": "q", "responses": {"academy": " ", "business": "b"}}, {}, "responses.academy", "empty response"),
    ({"query": "q", "responses": {"academy": "a", "business": "a"}}, {},
     "responses.business", "chosen and rejected are identical"),
    ({"query": "q", "responses": {"academy": "a", "business": None}}, {},
     "responses.business", "expected a string, got NoneType"),
    ({"query": "q", "responses": {"academy": "a"}}, {}, "responses", "no response from a domain other than 'academy'"),
    ({"query": "q", "responses": ["a", "b"]}, {}, "responses", "expected an object of domain -> response, got list"),
    ({"responses": {"academy": "a", "business": "b"}}, {}, "query", "missing key"),
    ({"query": "", "academy": "a", "business": "b"}, {}, "query", "empty prompt"),
    # neither
    (["not", "a", "record"], {}, "<record>", "expected a JSON object, got list"),
    (["not", "a", "record"], {"format": "string"}, "<record>", "expected a JSON object, got list"),
    ({"text": "t"}, {}, "<record>", "unknown format (keys: ['text'])"),
])
def test_invalid_records(record, overrides, field, reason):
    with pytest.raises(InvalidRecord) as err:
        normalize_record(record, cfg(**overrides))
    assert (err.value.field, err.value.reason) == (field, reason)
    assert str(err.value) == f"field {field!r}: {reason}"


def test_invalid_record_is_a_picklable_value_error():
    err = InvalidRecord("chosen", "empty response")
    assert isinstance(err, ValueError) and str(err) == "field 'chosen': empty response"
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.field, back.reason, str(back)) == (InvalidRecord, "chosen", "empty response", str(err))


def test_parse_json_line():
    assert parse_json_line(b'{"a": 1}\n') == {"a": 1}
    with pytest.raises(InvalidRecord) as err:
        parse_json_line("[1, 2]")
    assert (err.value.field, err.value.reason) == ("<record>", "expected a JSON object, got list")
    with pytest.raises(InvalidRecord) as err:
        parse_json_line("{oops")
    assert err.value.field == "<line>" and err.value.reason.startswith("malformed JSON: ")
    with pytest.raises(InvalidRecord) as err:  # undecodable bytes, as Ray hands raw lines over
        parse_json_line(b'{"a": "\xff"}')
    assert err.value.field == "<line>" and "utf-8" in err.value.reason


def test_roles_a_chat_template_accepts():
    for prompt in ([U], [SYS, U], [U, AS, U], [SYS, U, AS, U]):
        (pair,) = normalize_record({"prompt": prompt, "chosen": "c", "rejected": "r"}, cfg())
        assert pair["prompt"] == prompt


BIG_INT = "9" * 5000  # over CPython's default 4300-digit limit: a plain ValueError, not a JSONDecodeError


@pytest.mark.parametrize("line, field, reason", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}', "chosen",
     "duplicate key 'chosen' in a JSON object (the last value would win silently)"),
    ('{"prompt": [{"role": "user", "content": "a", "content": "b"}], "chosen": "b", "rejected": "c"}', "content",
     "duplicate key 'content' in a JSON object (the last value would win silently)"),
    ('{"prompt": ' + "[" * 5000 + "]" * 5000 + ', "chosen": "b", "rejected": "c"}', "<line>",
     "malformed JSON: nested deeper than Python's recursion limit (1000)"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "id": ' + BIG_INT + "}", "<line>",
     "malformed JSON: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; "
     "use sys.set_int_max_str_digits() to increase the limit"),
    (r'{"prompt": "a \\ud800", "chosen": "b", "rejected": "c"}', None, None),  # an escaped backslash: plain text
    (r'{"prompt": "a \ud800", "chosen": "b", "rejected": "c"}', "prompt", "lone"),  # used field
    (r'{"prompt": "a", "chosen": "b", "rejected": "c", "meta": {"notes": ["ok", "x\uDC01"]}}', "meta.notes[1]",
     "lone"),  # an ignored field: not encodable either (the record could not be written or hashed)
    (r'{"prompt": "a", "chosen": "b", "rejected": "c", "\udc00": 1}', r"\udc00", "lone"),  # a key (named escaped)
    (r'{"prompt": "a \ud83d\ude00", "chosen": "b", "rejected": "c"}', None, None),  # a valid pair: an emoji
])
def test_parse_json_line_refuses_what_would_change_or_crash(line, field, reason):
    if field is None:
        assert parse_json_line(line)["chosen"] == "b"
        assert parse_json_line(line.encode())["chosen"] == "b"
        return
    with pytest.raises(InvalidRecord) as err:
        parse_json_line(line.encode())
    assert err.value.field == field
    if reason == "lone":
        assert err.value.reason.startswith("lone UTF-16 surrogate"), err.value.reason
    else:
        assert err.value.reason == reason


def test_unknown_configured_format_is_a_config_error():
    with pytest.raises(ConfigError, match="data.format"):
        normalize_record({"prompt": "p", "chosen": "c", "rejected": "r"}, cfg(format="xml"))


# ---------------------------------------------------------------------------------------------------- tokenization
def test_exact_layout_without_template(word_tok):
    row = tokenize_pair({"prompt": "a b c", "chosen": "d e", "rejected": "f"}, word_tok, 32, 16)
    assert row == {
        "chosen_input_ids": W("a b c") + W("d e") + [1],
        "chosen_response_mask": [0, 0, 0, 1, 1, 1],
        "rejected_input_ids": W("a b c") + W("f") + [1],
        "rejected_response_mask": [0, 0, 0, 1, 1],
        "prompt_length": 3,
    }


def test_exact_layout_with_template(word_chat_tok):
    # a plain-string prompt becomes one user message; the generation prompt is part of the prompt tokens
    row = tokenize_pair({"prompt": "a b", "chosen": "c", "rejected": "d e"}, word_chat_tok, 32, 16)
    prompt = [3, 5, 4] + W("a b") + [3, 6, 4]  # [ user ] a b [ assistant ]
    assert row["chosen_input_ids"] == prompt + W("c") + [1]
    assert row["rejected_input_ids"] == prompt + W("d e") + [1]
    assert row["prompt_length"] == 8 and sum(row["chosen_response_mask"]) == 2 and sum(row["rejected_response_mask"]) == 3
    msgs = [{"role": "system", "content": "z"}, {"role": "user", "content": "a b"}]
    row = tokenize_pair({"prompt": msgs, "chosen": "c", "rejected": "d"}, word_chat_tok, 32, 16)
    assert row["chosen_input_ids"][:row["prompt_length"]] == [3, 7, 4] + W("z") + prompt


def test_chatml_layout_on_tiny_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    pair = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I do not know."}
    row = tokenize_pair(pair, tok, 512, 256)
    text = tok.apply_chat_template([{"role": "user", "content": pair["prompt"]}], tokenize=False,
                                   add_generation_prompt=True)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<|im_start|>assistant\n")
    assert row["prompt_length"] == len(prompt_ids)
    assert row["chosen_input_ids"] == prompt_ids + tok.encode("Paris.", add_special_tokens=False) + [tok.eos_token_id]
    assert tok.decode(row["chosen_input_ids"][row["prompt_length"]:]) == "Paris.<|im_end|>"
    assert tok.decode(row["rejected_input_ids"]) == text + "I do not know.<|im_end|>"
    assert sum(row["chosen_response_mask"]) == len(tok.encode("Paris.")) + 1
    # the first response token is the first token of the response text, right after "assistant\n"
    n = row["prompt_length"]
    assert tok.decode(row["chosen_input_ids"][n - 1: n]) == "\n"
    assert row["chosen_input_ids"][n] == tok.encode("Paris.")[0]
    assert encode_prompt(pair["prompt"], tok) == prompt_ids


def test_no_bpe_merge_across_the_boundary(plain_tiny):
    tok = plain_tiny
    pair = {"prompt": "one two thr", "chosen": "ee four", "rejected": "ee five"}
    assert tok.encode("one two three four") != tok.encode("one two thr") + tok.encode("ee four")  # a merge exists
    row = tokenize_pair(pair, tok, 512, 256)
    assert row["chosen_input_ids"] == tok.encode("one two thr") + tok.encode("ee four") + [tok.eos_token_id]
    assert row["prompt_length"] == len(tok.encode("one two thr"))


def test_messages_without_template_render_hh_style(plain_tiny):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Capital of France?"}]
    text, lead = render_prompt(msgs, plain_tiny)
    assert (text, lead) == ("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Capital of France?\n\nAssistant:", " ")
    row = tokenize_pair({"prompt": msgs, "chosen": "Paris.", "rejected": "Rome."}, plain_tiny, 512, 256)
    assert row["chosen_input_ids"][row["prompt_length"]:] == plain_tiny.encode(" Paris.") + [plain_tiny.eos_token_id]
    assert render_prompt("raw text:", plain_tiny) == ("raw text:", "")


def test_template_error_is_an_invalid_record():
    strict = _word_tokenizer("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                             "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    pair = {"prompt": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}], "chosen": "c",
            "rejected": "d"}
    with pytest.raises(InvalidRecord) as err:
        tokenize_pair(pair, strict, 32, 16)
    assert err.value.field == "prompt" and err.value.reason.startswith("chat template failed:")
    assert "user first" in err.value.reason


def test_tokenizer_without_eos_is_refused(word_tok):
    tok = copy.deepcopy(word_tok)
    tok.eos_token = None
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_pair({"prompt": "a", "chosen": "b", "rejected": "c"}, tok, 32, 16)


# ---------------------------------------------------------------------------------------------------- truncation
def _pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_exact_fit_is_not_truncated(word_tok):
    row = tokenize_pair(_pair("a b c", "d e", "f"), word_tok, 6, 2)  # 3 + 2 + EOS == 6
    assert row["chosen_input_ids"] == W("a b c d e") + [1] and row["prompt_length"] == 3


def test_long_prompt_is_kept_whole_when_everything_fits(word_tok):
    row = tokenize_pair(_pair("a b c d e f", "g", "h"), word_tok, 8, 2)  # prompt 6 > 2 but 6 + 2 <= 8
    assert row["prompt_length"] == 6 and row["chosen_input_ids"] == W("a b c d e f g") + [1]


def test_prompt_is_truncated_from_the_left(word_tok):
    row = tokenize_pair(_pair("a b c d e f g h i j", "x y", "z"), word_tok, 8, 4)
    assert row["prompt_length"] == 4
    assert row["chosen_input_ids"] == W("g h i j x y") + [1]  # the prompt's end is kept; the response keeps EOS
    assert row["rejected_input_ids"] == W("g h i j z") + [1]
    assert row["chosen_response_mask"] == [0, 0, 0, 0, 1, 1, 1]


def test_response_is_truncated_on_the_right_without_eos(word_tok):
    row = tokenize_pair(_pair("a b c", "d e f g h i j k", "z"), word_tok, 8, 4)
    assert row["prompt_length"] == 3  # 3 <= max_prompt_length: the prompt is not touched
    assert row["chosen_input_ids"] == W("a b c d e f g h")  # cut to 8 tokens: no EOS
    assert row["chosen_response_mask"] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert row["rejected_input_ids"] == W("a b c z") + [1]  # the short one is untouched, EOS kept


def test_prompt_and_response_both_truncated(word_tok):
    row = tokenize_pair(_pair("a b c d e f g h i j", "k l m n o p q r s t", "u"), word_tok, 8, 4)
    assert row["chosen_input_ids"] == W("g h i j k l m n") and row["prompt_length"] == 4
    assert sum(row["chosen_response_mask"]) == 4 and 1 not in row["chosen_input_ids"]


def test_prompt_truncation_follows_the_longer_response(word_tok):
    # the chosen response alone would fit; the rejected one forces the (shared) prompt to be cut
    row = tokenize_pair(_pair("a b c d e f", "x", "m n o p q"), word_tok, 9, 2)
    assert row["prompt_length"] == 2
    assert row["chosen_input_ids"] == W("e f x") + [1]
    assert row["rejected_input_ids"] == W("e f m n o p q") + [1]


def test_no_room_for_the_response_is_over_long(word_tok):
    with pytest.raises(InvalidRecord) as err:  # max_prompt_length >= max_length leaves nothing for the response
        tokenize_pair(_pair("a b c d e f g h i j", "x", "y"), word_tok, 6, 6)
    assert (err.value.field, err.value.reason) == (
        "prompt", "over-long: a prompt of 6 tokens leaves no response token within max_length=6")


def test_identical_after_truncation_is_over_long(word_tok):
    with pytest.raises(InvalidRecord) as err:
        tokenize_pair(_pair("a b", "c d e f x", "c d e f y"), word_tok, 6, 2)
    assert (err.value.field, err.value.reason) == (
        "rejected", "over-long: chosen and rejected are identical after truncation to max_length=6")
    row = tokenize_pair(_pair("a b", "c d e f x", "c d e f y"), word_tok, 7, 2)  # one more token: they differ
    assert row["chosen_input_ids"][-1] != row["rejected_input_ids"][-1]


def test_identical_after_tokenization(word_tok):
    with pytest.raises(InvalidRecord) as err:  # both responses are one unknown word -> the same <unk> id
        tokenize_pair(_pair("a", "qq", "zz"), word_tok, 32, 16)
    assert (err.value.field, err.value.reason) == ("rejected", "chosen and rejected are identical after tokenization")


def test_bad_length_arguments(word_tok):
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pair(_pair("a", "b", "c"), word_tok, 0, 0)


def test_tokenize_sft(word_tok):
    assert tokenize_sft({"prompt": "a b c d e", "response": "x y z"}, word_tok, 6, 2) == {
        "input_ids": W("d e x y z") + [1], "response_mask": [0, 0, 1, 1, 1, 1], "prompt_length": 2}


# ---------------------------------------------------------------------------------------------------- collation
def _rows():
    return [
        {"chosen_input_ids": [5, 6, 7], "chosen_response_mask": [0, 1, 1],
         "rejected_input_ids": [5, 6, 8, 9, 10], "rejected_response_mask": [0, 1, 1, 1, 1], "prompt_length": 1},
        {"chosen_input_ids": [11, 12], "chosen_response_mask": [0, 1],
         "rejected_input_ids": [11, 13, 14], "rejected_response_mask": [0, 1, 1], "prompt_length": 1},
    ]


EXPECTED_IDS = [[5, 6, 7, 0, 0], [11, 12, 0, 0, 0], [5, 6, 8, 9, 10], [11, 13, 14, 0, 0]]
EXPECTED_ATT = [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
EXPECTED_RESP = [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]]


def _assert_expected(batch, length=5):
    assert set(batch) == {"input_ids", "attention_mask", "response_mask"}
    for key, want in (("input_ids", EXPECTED_IDS), ("attention_mask", EXPECTED_ATT), ("response_mask", EXPECTED_RESP)):
        assert batch[key].dtype == torch.long and batch[key].shape == (4, length)
        want = torch.tensor([row + [0] * (length - len(row)) for row in want])
        assert torch.equal(batch[key], want), key


def test_collate_pairs_list_of_rows():
    _assert_expected(collate_pairs(_rows(), pad_token_id=0))
    batch = collate_pairs(_rows(), pad_token_id=3)
    assert batch["input_ids"][1].tolist() == [11, 12, 3, 3, 3]  # right padding with the given id


def test_collate_pairs_columns_as_ray_gives_them():
    rows = _rows()
    columns = {k: np.empty(2, dtype=object) for k in rows[0]}
    for k in rows[0]:
        for i, r in enumerate(rows):
            columns[k][i] = np.asarray(r[k]) if isinstance(r[k], list) else r[k]
    columns["prompt_length"] = np.array([1, 1])
    _assert_expected(collate_pairs(columns, pad_token_id=0))
    _assert_expected(collate_pairs({k: [r[k] for r in rows] for k in rows[0]}, pad_token_id=0))
    import pandas as pd
    _assert_expected(collate_pairs(pd.DataFrame(rows), pad_token_id=0))


def test_collate_pairs_equal_length_2d_arrays_and_tensors():
    rows = [{"chosen_input_ids": torch.tensor([1, 2]), "chosen_response_mask": [0, 1],
             "rejected_input_ids": np.array([1, 3]), "rejected_response_mask": np.array([0, 1])}]
    cols = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}  # a 2-D tensor column
    for batch in (collate_pairs(rows, 0), collate_pairs(cols, 0)):
        assert batch["input_ids"].tolist() == [[1, 2], [1, 3]] and batch["response_mask"].tolist() == [[0, 1], [0, 1]]


def test_collate_pad_to_multiple_of():
    batch = collate_pairs(_rows(), pad_token_id=0, pad_to_multiple_of=8)
    _assert_expected(batch, length=8)
    assert collate_pairs(_rows(), 0, pad_to_multiple_of=5)["input_ids"].shape == (4, 5)


def test_collate_errors():
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], 0)
    bad = _rows()
    bad[1]["rejected_response_mask"] = [0, 1]
    with pytest.raises(ValueError, match="row 3: 3 ids but 2 response-mask entries"):
        collate_pairs(bad, 0)


def test_collate_sft():
    rows = [{"input_ids": [4, 5, 6], "response_mask": [0, 1, 1]}, {"input_ids": [7], "response_mask": [1]}]
    batch = collate_sft(rows, pad_token_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[4, 5, 6, 9], [7, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]


def test_tokenized_samples_collate_end_to_end(tiny_tokenizer):
    rows = []
    for name in ("hh.jsonl", "dsp.jsonl", "string.jsonl", "conversational.jsonl"):
        for line in _lines(name):
            rows += preprocess_record(json.loads(line), tiny_tokenizer, cfg(max_length=96, max_prompt_length=48))
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    b = len(rows)
    lengths = [len(r["chosen_input_ids"]) for r in rows] + [len(r["rejected_input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (2 * b, max(lengths)) and max(lengths) <= 96
    assert batch["attention_mask"].sum(1).tolist() == lengths
    resp = [sum(r["chosen_response_mask"]) for r in rows] + [sum(r["rejected_response_mask"]) for r in rows]
    assert batch["response_mask"].sum(1).tolist() == resp
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == tiny_tokenizer.pad_token_id).all())
    assert bool((batch["response_mask"] <= batch["attention_mask"]).all())
    assert any(96 == n for n in lengths)  # some rows were truncated at this max_length
