"""BOS where the model expects one (qcore.data.expected_bos / prepend_bos), for every kind of tokenizer users have:
a base model without a chat template whose tokenizer adds BOS (Llama-3.1-8B base), an instruct template that
writes its own BOS (Llama-3-Instruct), and a tokenizer that names a BOS but never adds it (SmolLM2, GPT-2)."""
import pytest

from qcore.base_models import CHATML_TEMPLATE, build_tiny_tokenizer
from qcore.data import encode_prompt, expected_bos, prepend_bos, tokenize_pair, tokenize_sft

PAIR = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I think it is a city."}


@pytest.fixture(scope="module")
def base_tok():
    return build_tiny_tokenizer(chat_template=False, add_bos=True)


@pytest.fixture(scope="module")
def instruct_tok():
    return build_tiny_tokenizer()  # ChatML template, no BOS added (like SmolLM2)


@pytest.fixture(scope="module")
def bos_template_tok():
    tok = build_tiny_tokenizer(chat_template=False, add_bos=True)
    tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE  # writes its own BOS, as Llama-3-Instruct's does
    return tok


def _plain(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_expected_bos_reads_the_tokenizer(base_tok, instruct_tok):
    assert expected_bos(base_tok) == base_tok.bos_token_id
    assert instruct_tok.bos_token_id is not None and expected_bos(instruct_tok) is None


def test_template_less_base_model_gets_exactly_one_bos(base_tok):
    bos = base_tok.bos_token_id
    row = tokenize_pair(PAIR, base_tok, max_length=64, max_prompt_length=32)
    prompt = [bos] + _plain(base_tok, PAIR["prompt"])
    assert row["prompt_length"] == len(prompt)
    for side in ("chosen", "rejected"):
        ids = row[f"{side}_input_ids"]
        assert ids[: len(prompt)] == prompt and ids.count(bos) == 1
        assert ids[len(prompt):-1] == _plain(base_tok, PAIR[side]) and ids[-1] == base_tok.eos_token_id
    assert encode_prompt(PAIR["prompt"], base_tok) == prompt  # generation, evaluation, replay, serving use this
    sft = tokenize_sft({"prompt": PAIR["prompt"], "response": "Paris."}, base_tok, 64, 32)
    assert sft["input_ids"][: len(prompt)] == prompt
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "capital of France?"}]
    ids = encode_prompt(messages, base_tok)  # HH-style rendering without a template, BOS in front
    assert ids[0] == bos and ids[1:] == _plain(base_tok, "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: capital of "
                                                         "France?\n\nAssistant:")


def test_left_truncation_keeps_the_bos(base_tok):
    bos = base_tok.bos_token_id
    long_prompt = "please explain the quick brown fox and the lazy dog " * 4
    row = tokenize_pair({**PAIR, "prompt": long_prompt}, base_tok, max_length=30, max_prompt_length=10)
    plain = _plain(base_tok, long_prompt)
    assert row["prompt_length"] == 10
    assert row["chosen_input_ids"][:10] == [bos] + plain[-9:]  # BOS + the prompt's last 9 tokens


def test_template_writing_its_own_bos_is_not_doubled(bos_template_tok):
    bos = bos_template_tok.bos_token_id
    row = tokenize_pair(PAIR, bos_template_tok, max_length=64, max_prompt_length=32)
    assert row["chosen_input_ids"][0] == bos and row["chosen_input_ids"].count(bos) == 1
    assert encode_prompt(PAIR["prompt"], bos_template_tok).count(bos) == 1


def test_tokenizer_that_never_adds_bos_is_left_alone(instruct_tok):
    row = tokenize_pair(PAIR, instruct_tok, max_length=64, max_prompt_length=32)
    text = instruct_tok.apply_chat_template([{"role": "user", "content": PAIR["prompt"]}], tokenize=False,
                                            add_generation_prompt=True)
    assert row["chosen_input_ids"][: row["prompt_length"]] == _plain(instruct_tok, text)
    assert prepend_bos([5, 6], instruct_tok) == [5, 6]
