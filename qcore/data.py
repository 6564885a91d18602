"""Preference records -> normalized pairs -> tokenized pair rows -> collated batches.

Everything here is a pure function of its arguments (no I/O, no globals, no Ray), so the preprocess stage can
call it per row inside Ray Data ``map_batches`` and count the rows that raise :class:`InvalidRecord`.

Record formats (``data.format``; ``"auto"`` picks one with :func:`detect_format`)
-------------------------------------------------------------------------------
- ``string``: ``{prompt_key: str, chosen_key: str, rejected_key: str}`` (keys from :class:`DataConfig`).
- ``conversational`` (TRL style): ``prompt`` is a list of ``{"role", "content"}`` messages; ``chosen`` and
  ``rejected`` are a list of assistant message(s) (several are joined with "\\n") or a plain string. Without a
  prompt key (TRL's "implicit prompt"), chosen and rejected are whole conversations; their longest common
  message prefix is the prompt and each must end with one assistant message.
- ``hh`` (Anthropic HH-RLHF): ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``. The
  prompt is the longest common prefix of the two texts cut right after its last ``"\\n\\nAssistant:"``; the
  rest of each text (whitespace-stripped) is the response. The prompt becomes user/assistant messages (any
  number of turns) so that the tokenizer's chat template applies.
- ``dsp`` (Domain-Specific Preference): ``{"query": str, "responses": {domain: str, ...}}`` (any domain names)
  or the flat ``{"query": str, "academy": str, "business": str, "entertainment": str, "literature": str}``
  (the four DSP domains). One record yields one pair per other domain: chosen = the response of
  ``data.dsp_chosen_domain``, rejected = that other domain's response (in the record's order).

A normalized pair is ``{"prompt": str | list[message], "chosen": str, "rejected": str}``.

Tokenization (:func:`tokenize_pair`)
------------------------------------
The prompt and each response are tokenized separately and their ids concatenated (no BPE merge across the
boundary; the prompt ids are identical for chosen and rejected). With a chat template, the prompt (a plain
string becomes one user message) is rendered with ``add_generation_prompt=True`` and encoded without extra
special tokens (the template writes its own). Without a template, a plain-string prompt is used verbatim and
messages are rendered HH style ("\\n\\nHuman: ...\\n\\nAssistant:"), the response then starting with a space.
The EOS id is appended to each response and counts as a response token.

BOS: where the model expects one (:func:`expected_bos`: its tokenizer adds it when encoding with special
tokens), the prompt ids start with it, unless the chat template already wrote it (Llama-3's does). A base model
without a template (Llama-3.1-8B for HH) thus sees the BOS it was pre-trained with, as TRL gives it.

Truncation policy: let P be the prompt ids and R the longer of the two responses (EOS included). If
len(P) + len(R) > max_length, the prompt is first cut from the LEFT to its last ``max_prompt_length`` tokens
(the end, nearest the response, is kept; a leading BOS is kept in front and counts toward the limit; the prompt
is left whole when it is already that short). Then each response
is cut on the RIGHT to ``max_length - len(P)`` tokens; a response that was cut does not end in EOS (the model
must not learn to stop where the data was cut). The same prompt is used for chosen and rejected, so
``prompt_length`` is one number. A pair is rejected as over-long (:class:`InvalidRecord`) when no response
token fits, or when chosen and rejected become identical after truncation (no preference left to learn).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from qcore.config import ConfigError, DataConfig

FORMATS = ("string", "conversational", "hh", "dsp")
DSP_DOMAINS = ("academy", "business", "entertainment", "literature")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


class InvalidRecord(ValueError):
    """One input record (or pair) cannot be used; ``field`` names the offending key, ``reason`` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"field {field!r}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):  # picklable across Ray workers
        return (InvalidRecord, (self.field, self.reason))


# ----------------------------------------------------------------------------------------------------------------
# Parsing and normalization
# ----------------------------------------------------------------------------------------------------------------
class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):  # json.loads would keep the last value without a word
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)
# A lone surrogate can only come from a \uD800-\uDFFF escape (the UTF-8 decoder refuses encoded ones).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _escaped(text: str) -> str:
    """``text`` with lone surrogates written as ``\\udXXX`` (encodable, e.g. as a field name)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(value: Any) -> str | None:
    """The path of the first string (or key) in ``value`` holding a lone UTF-16 surrogate, else None (no
    recursion: the value may be nested as deep as the JSON decoder allows)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                return path or "<record>"
        elif isinstance(obj, dict):
            for key, item in obj.items():
                name = _escaped(key)  # the path names the field in rejects.jsonl, so it must be writable text
                child = f"{path}.{name}" if path else name
                stack.append((child, key))
                stack.append((child, item))
        elif isinstance(obj, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(obj))
    return None


def parse_json_line(line: str | bytes) -> dict:
    """One JSONL line -> a record dict, else InvalidRecord: field ``<line>`` for malformed JSON (incl. invalid
    UTF-8, nesting deeper than the recursion limit, integers over CPython's digit limit); the key for a duplicate
    key (JSON would silently keep the last value) and the field holding a lone UTF-16 surrogate (not text that
    can be encoded, tokenized or written)."""
    try:
        text = line if isinstance(line, str) else bytes(line).decode("utf-8")
        record = _DECODER.decode(text.strip())
    except _DuplicateKey as err:
        raise InvalidRecord(_escaped(err.key), f"duplicate key {err.key!r} in a JSON object (the last value would "
                                               f"win silently)") from None
    except RecursionError:
        raise InvalidRecord("<line>", f"malformed JSON: nested deeper than Python's recursion limit "
                                      f"({sys.getrecursionlimit()})") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, the int digit limit, invalid UTF-8
        raise InvalidRecord("<line>", f"malformed JSON: {err}") from None
    if not isinstance(record, dict):
        raise InvalidRecord("<record>", f"expected a JSON object, got {type(record).__name__}")
    if (isinstance(line, str) or _SURROGATE_ESCAPE.search(text)) and (where := _lone_surrogate(record)) is not None:
        raise InvalidRecord(where, "lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair): not valid "
                                   "Unicode text")
    return record


def detect_format(record: Mapping[str, Any], data_cfg: DataConfig | None = None) -> str:
    """Guess the record's format (for ``data.format: auto``) from its keys and value types.

    ``responses`` -> dsp; the prompt key with a list -> conversational, with anything else -> string;
    ``query`` plus a DSP domain key -> dsp; no prompt but chosen as a list -> conversational (implicit prompt),
    as a string -> hh.
    """
    cfg = data_cfg or DataConfig()
    if not isinstance(record, Mapping):
        raise InvalidRecord("<record>", f"expected a JSON object, got {type(record).__name__}")
    if "responses" in record:
        return "dsp"
    if cfg.prompt_key in record:
        return "conversational" if isinstance(record[cfg.prompt_key], list) else "string"
    if "query" in record and any(d in record for d in (*DSP_DOMAINS, cfg.dsp_chosen_domain)):
        return "dsp"
    if cfg.chosen_key in record:
        return "conversational" if isinstance(record[cfg.chosen_key], list) else "hh"
    raise InvalidRecord("<record>", f"unknown format (keys: {sorted(map(str, record))})")


def normalize_record(record: Mapping[str, Any], data_cfg: DataConfig) -> list[dict]:
    """A raw record -> its normalized pairs ``{"prompt", "chosen", "rejected"}`` (several for DSP)."""
    fmt = data_cfg.format
    if fmt == "auto":
        fmt = detect_format(record, data_cfg)
    elif fmt not in FORMATS:
        raise ConfigError(f"config key 'data.format' = {fmt!r}: must be auto|{'|'.join(FORMATS)}")
    if not isinstance(record, Mapping):
        raise InvalidRecord("<record>", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "string":
        pairs = [_normalize_string(record, data_cfg)]
    elif fmt == "conversational":
        pairs = [_normalize_conversational(record, data_cfg)]
    elif fmt == "hh":
        pairs = [_normalize_hh(record, data_cfg)]
    else:
        pairs = _normalize_dsp(record, data_cfg)
    return pairs


def _get(record: Mapping[str, Any], key: str) -> Any:
    if key not in record or record[key] is None:
        raise InvalidRecord(key, "missing key")
    return record[key]


def _get_in(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if obj.get(key) is None:
        raise InvalidRecord(f"{where}.{key}", "missing key")
    return obj[key]


def _text(value: Any, field: str, what: str) -> str:
    """A non-empty string, else InvalidRecord: wrong type or 'empty <what>'."""
    if not isinstance(value, str):
        raise InvalidRecord(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRecord(field, f"empty {what}")
    return value


def _distinct(chosen: str, rejected: str, field: str) -> None:
    if chosen == rejected:
        raise InvalidRecord(field, "chosen and rejected are identical")


def _normalize_string(record, cfg: DataConfig) -> dict:
    prompt = _text(_get(record, cfg.prompt_key), cfg.prompt_key, "prompt")
    chosen = _text(_get(record, cfg.chosen_key), cfg.chosen_key, "response")
    rejected = _text(_get(record, cfg.rejected_key), cfg.rejected_key, "response")
    _distinct(chosen, rejected, cfg.rejected_key)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _messages(value: Any, field: str) -> list[dict]:
    """A validated list of {"role", "content"} messages (other keys dropped)."""
    if not isinstance(value, list):
        raise InvalidRecord(field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise InvalidRecord(field, "empty message list")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidRecord(where, f"expected a message object, got {type(msg).__name__}")
        role = _text(_get_in(msg, "role", where), f"{where}.role", "role")
        out.append({"role": role, "content": _text(_get_in(msg, "content", where), f"{where}.content", "message")})
    return out


def _completion(value: Any, field: str) -> str:
    """A conversational response: a string or a list of assistant messages (joined by newlines)."""
    if isinstance(value, str):
        return _text(value, field, "response")
    msgs = _messages(value, field)
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            raise InvalidRecord(f"{field}[{i}].role", f"expected 'assistant', got {msg['role']!r}")
    return "\n".join(m["content"] for m in msgs)


_ROLES = ("system", "user", "assistant")


def _check_prompt_messages(prompt: list[dict], field: str) -> list[dict]:
    """The roles a chat template accepts: an optional leading system message, then user and assistant turns
    alternating from a user turn, ending with a user turn (the response answers it)."""
    for i, msg in enumerate(prompt):
        role, where = msg["role"], f"{field}[{i}].role"
        if role not in _ROLES:
            raise InvalidRecord(where, f"unknown role {role!r} (expected user, assistant or system)")
        if role == "system" and i > 0:
            raise InvalidRecord(where, "a system message is only allowed first")
        prev = prompt[i - 1]["role"] if i else None
        if role != "system" and prev in (None, "system") and role != "user":
            raise InvalidRecord(where, "the conversation must start with a user message (after an optional "
                                       "system message)")
        if role == prev:
            raise InvalidRecord(where, f"two {role!r} messages in a row (user and assistant must alternate)")
    if prompt[-1]["role"] == "assistant":
        raise InvalidRecord(field, "the prompt ends with an assistant message")
    if prompt[-1]["role"] != "user":
        raise InvalidRecord(field, "the prompt has no user message to respond to")
    return prompt


def _normalize_conversational(record, cfg: DataConfig) -> dict:
    if cfg.prompt_key in record:
        prompt = _check_prompt_messages(_messages(_get(record, cfg.prompt_key), cfg.prompt_key), cfg.prompt_key)
        chosen = _completion(_get(record, cfg.chosen_key), cfg.chosen_key)
        rejected = _completion(_get(record, cfg.rejected_key), cfg.rejected_key)
    else:  # implicit prompt: the shared leading messages of two whole conversations
        full_c = _messages(_get(record, cfg.chosen_key), cfg.chosen_key)
        full_r = _messages(_get(record, cfg.rejected_key), cfg.rejected_key)
        n = 0
        while n < min(len(full_c), len(full_r)) - 1 and full_c[n] == full_r[n]:
            n += 1
        if n == 0:
            raise InvalidRecord(cfg.rejected_key, "no shared prompt messages with chosen")
        for msgs, key in ((full_c, cfg.chosen_key), (full_r, cfg.rejected_key)):
            if len(msgs) != n + 1 or msgs[-1]["role"] != "assistant":
                raise InvalidRecord(key, "expected the shared prompt followed by one assistant message")
        prompt = _check_prompt_messages(full_c[:n], cfg.prompt_key)
        chosen, rejected = full_c[n]["content"], full_r[n]["content"]
    _distinct(chosen, rejected, cfg.rejected_key)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _hh_prompt_messages(prompt_text: str, field: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> [user a, assistant b, user c]."""
    parts = _HH_TURN.split("\n\n" + prompt_text.lstrip("\n"))
    if parts[0].strip():
        raise InvalidRecord(field, "malformed HH text: text before the first Human turn")
    roles, contents = parts[1::2], parts[2::2]
    if not roles or roles[0] != "Human":
        raise InvalidRecord(field, "malformed HH text: the first turn is not a Human turn")
    messages = []
    for role, content in zip(roles[:-1], contents[:-1]):  # the last one is the empty generation turn
        if not content.strip():
            raise InvalidRecord(field, f"malformed HH text: empty {role} turn")
        if messages and messages[-1]["role"] == _HH_ROLES[role]:
            raise InvalidRecord(field, f"malformed HH text: two {role} turns in a row (turns must alternate)")
        messages.append({"role": _HH_ROLES[role], "content": content.strip()})
    if messages[-1]["role"] != "user":
        raise InvalidRecord(field, "malformed HH text: the last turn before the response is not a Human turn")
    return messages


def _normalize_hh(record, cfg: DataConfig) -> dict:
    chosen_text = _text(_get(record, cfg.chosen_key), cfg.chosen_key, "response")
    rejected_text = _text(_get(record, cfg.rejected_key), cfg.rejected_key, "response")
    for text, key in ((chosen_text, cfg.chosen_key), (rejected_text, cfg.rejected_key)):
        if HH_ASSISTANT not in text:
            raise InvalidRecord(key, "malformed HH text: no Assistant turn")
    common = os.path.commonprefix([chosen_text, rejected_text])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise InvalidRecord(cfg.rejected_key, "malformed HH text: no prompt shared with chosen")
    cut += len(HH_ASSISTANT)
    prompt = _hh_prompt_messages(chosen_text[:cut], cfg.chosen_key)
    responses = []
    for text, key in ((chosen_text, cfg.chosen_key), (rejected_text, cfg.rejected_key)):
        response = text[cut:].strip()
        if not response:
            raise InvalidRecord(key, "empty response")
        if turn := _HH_TURN.search(response):  # two turns glued into one response
            raise InvalidRecord(key, f"malformed HH text: the response continues into another {turn[1]} turn")
        responses.append(response)
    _distinct(responses[0], responses[1], cfg.rejected_key)
    return {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}


def _normalize_dsp(record, cfg: DataConfig) -> list[dict]:
    query = _text(_get(record, "query"), "query", "prompt")
    target = cfg.dsp_chosen_domain
    if "responses" in record:
        responses = record["responses"]
        if not isinstance(responses, Mapping):
            raise InvalidRecord("responses", f"expected an object of domain -> response, got "
                                             f"{type(responses).__name__}")
        prefix = "responses."
    else:  # flat layout: the four DSP domains (and the target) as top-level keys
        responses = {d: record[d] for d in (*DSP_DOMAINS, target) if d in record}
        prefix = ""
    if responses.get(target) is None:
        raise InvalidRecord(f"{prefix}{target}", "target domain response missing")
    chosen = _text(responses[target], f"{prefix}{target}", "response")
    pairs = []
    for domain, response in responses.items():
        if domain == target:
            continue
        rejected = _text(response, f"{prefix}{domain}", "response")
        _distinct(chosen, rejected, f"{prefix}{domain}")
        pairs.append({"prompt": query, "chosen": chosen, "rejected": rejected})
    if not pairs:
        raise InvalidRecord(prefix.rstrip(".") or "<record>", f"no response from a domain other than {target!r}")
    return pairs


# ----------------------------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------------------------
def render_prompt(prompt: str | list[dict], tokenizer) -> tuple[str, str]:
    """The prompt as text, and the text that starts each response (" " in the template-less HH rendering)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template may reject a conversation (roles, ...)
            raise InvalidRecord("prompt", f"chat template failed: {err}") from None
        return text, ""
    if isinstance(prompt, str):
        return prompt, ""
    turns = "".join(f"\n\n{_PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt)
    return turns + HH_ASSISTANT, " "


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def expected_bos(tokenizer) -> int | None:
    """The BOS id the model expects at the start of every sequence, or None.

    The tokenizer tells: a model trained with a BOS prefix ships a tokenizer that adds it when encoding with
    special tokens (Llama-3 base and instruct, Llama-2, Mistral, Gemma); one that does not (GPT-2, SmolLM2,
    Qwen) gets none, even when it names a ``bos_token``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) and ids[0] == bos else None


def prepend_bos(ids: list[int], tokenizer) -> list[int]:
    """``ids`` with the expected BOS in front, unless there is none or they already start with it (a chat
    template that writes its own BOS, as Llama-3's does). Every path that encodes a prompt without special
    tokens goes through here: training, evaluation, generation, replay, lm-eval, serving."""
    bos = expected_bos(tokenizer)
    if bos is None or (ids and ids[0] == bos):
        return list(ids)
    return [bos, *ids]


def encode_prompt(prompt: str | list[dict], tokenizer) -> list[int]:
    """Prompt ids exactly as :func:`tokenize_pair` builds them (untruncated, BOS included where the model expects
    one): use it for generation."""
    return prepend_bos(_encode(tokenizer, render_prompt(prompt, tokenizer)[0]), tokenizer)


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: responses must end with one")
    return int(eos)


def _truncate(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
              bos: int | None = None):
    """The module docstring's truncation policy; raises InvalidRecord('prompt', 'over-long: ...'). A leading
    ``bos`` survives the left cut (it counts toward max_prompt_length)."""
    if max_length < 1 or max_prompt_length < 0:
        raise ValueError(f"max_length ({max_length}) must be >= 1 and max_prompt_length ({max_prompt_length}) >= 0")
    longest = max(len(r) for r in responses)
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        keep_bos = bos is not None and max_prompt_length > 0 and prompt_ids[0] == bos
        tail = max_prompt_length - keep_bos
        prompt_ids = ([bos] if keep_bos else []) + (prompt_ids[len(prompt_ids) - tail:] if tail else [])
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise InvalidRecord("prompt", f"over-long: a prompt of {len(prompt_ids)} tokens leaves no response token "
                                      f"within max_length={max_length}")
    return prompt_ids, [r[:budget] for r in responses]


def tokenize_pair(pair: Mapping[str, Any], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """A normalized pair -> the tokenized pair row of docs/architecture.md (lists of int + prompt_length)."""
    text, lead = render_prompt(pair["prompt"], tokenizer)
    prompt_ids = prepend_bos(_encode(tokenizer, text), tokenizer)
    eos = _eos_id(tokenizer)
    chosen = _encode(tokenizer, lead + pair["chosen"]) + [eos]
    rejected = _encode(tokenizer, lead + pair["rejected"]) + [eos]
    truncated = len(prompt_ids) + max(len(chosen), len(rejected)) > max_length
    prompt_ids, (chosen, rejected) = _truncate(prompt_ids, [chosen, rejected], max_length, max_prompt_length,
                                               expected_bos(tokenizer))
    if chosen == rejected:
        why = f"over-long: chosen and rejected are identical after truncation to max_length={max_length}" if truncated \
            else "chosen and rejected are identical after tokenization"
        raise InvalidRecord("rejected", why)
    n = len(prompt_ids)
    return {
        "chosen_input_ids": prompt_ids + chosen,
        "chosen_response_mask": [0] * n + [1] * len(chosen),
        "rejected_input_ids": prompt_ids + rejected,
        "rejected_response_mask": [0] * n + [1] * len(rejected),
        "prompt_length": n,
    }


def tokenize_sft(example: Mapping[str, Any], tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """``{"prompt", "response"}`` -> ``{"input_ids", "response_mask", "prompt_length"}`` (same policy as pairs)."""
    text, lead = render_prompt(example["prompt"], tokenizer)
    response = _encode(tokenizer, lead + example["response"]) + [_eos_id(tokenizer)]
    prompt_ids = prepend_bos(_encode(tokenizer, text), tokenizer)
    prompt_ids, (response,) = _truncate(prompt_ids, [response], max_length, max_prompt_length, expected_bos(tokenizer))
    return {"input_ids": prompt_ids + response, "response_mask": [0] * len(prompt_ids) + [1] * len(response),
            "prompt_length": len(prompt_ids)}


def preprocess_record(record: Mapping[str, Any] | str | bytes, tokenizer, data_cfg: DataConfig) -> list[dict]:
    """Raw record (or JSONL line) -> tokenized pair rows: parse, normalize, tokenize. Raises InvalidRecord."""
    if isinstance(record, (str, bytes)):
        record = parse_json_line(record)
    return [tokenize_pair(p, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
            for p in normalize_record(record, data_cfg)]


# ----------------------------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------------------------
def _as_rows(rows: Any) -> list[Mapping[str, Any]]:
    """A list of row dicts, or columns (dict of lists / numpy arrays, a pandas DataFrame) -> a list of rows."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        rows = rows.to_dict("list")
    if isinstance(rows, Mapping):
        keys = list(rows)
        n = len(rows[keys[0]]) if keys else 0
        return [{k: rows[k][i] for k in keys} for i in range(n)]
    return list(rows)


def _ids(seq: Any) -> np.ndarray:
    if isinstance(seq, torch.Tensor):
        seq = seq.cpu().numpy()
    return np.asarray(seq, dtype=np.int64).reshape(-1)


def _pad_stack(seqs: Sequence[np.ndarray], value: int, length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.from_numpy(seq)
    return out


def _collate(ids: list[np.ndarray], masks: list[np.ndarray], pad_token_id: int, pad_to_multiple_of: int | None):
    if not ids:
        raise ValueError("cannot collate an empty batch")
    for i, (a, m) in enumerate(zip(ids, masks)):
        if len(a) != len(m):
            raise ValueError(f"row {i}: {len(a)} ids but {len(m)} response-mask entries")
    length = max(len(a) for a in ids)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    return {
        "input_ids": _pad_stack(ids, pad_token_id, length),
        "attention_mask": _pad_stack([np.ones(len(a), np.int64) for a in ids], 0, length),
        "response_mask": _pad_stack(masks, 0, length),
    }


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: correct under left AND right padding (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def collate_pairs(rows: Any, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B tokenized pair rows -> input_ids / attention_mask / response_mask, each LongTensor [2B, L].

    Rows 0..B-1 are the chosen sequences, B..2B-1 the rejected ones; right padded with ``pad_token_id``.
    ``rows``: a list of row dicts or a dict of columns (lists / numpy arrays, as Ray's ``iter_batches`` gives).
    """
    rows = _as_rows(rows)
    ids = [_ids(r[f"{side}_input_ids"]) for side in ("chosen", "rejected") for r in rows]
    masks = [_ids(r[f"{side}_response_mask"]) for side in ("chosen", "rejected") for r in rows]
    return _collate(ids, masks, pad_token_id, pad_to_multiple_of)


def collate_sft(rows: Any, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B rows of :func:`tokenize_sft` (``input_ids``, ``response_mask``) -> the same three tensors, [B, L]."""
    rows = _as_rows(rows)
    return _collate([_ids(r["input_ids"]) for r in rows], [_ids(r["response_mask"]) for r in rows],
                    pad_token_id, pad_to_multiple_of)

