"""Preprocess stage (Ray Data): preference files -> normalized, tokenized pair rows -> train/ and eval/ Parquet.

    python pipelines/preprocess.py --config configs/tiny.yaml [--data.train_files '[a.jsonl, b.parquet]']

Inputs (``data.train_files``; local paths, globs, or pyarrow filesystem URIs such as ``s3://b/x.parquet``):
- JSON Lines (``.jsonl``, ``.ndjson``, ``.json`` holding lines; ``.gz``/``.bz2``/``.zst``/``.lz4`` by extension),
  read line by line (``\\n``, ``\\r\\n`` or a lone ``\\r`` ends a line) so that a malformed line is one counted
  reject, not a crash; a UTF-8 BOM at the start is dropped;
- a JSON array (``.json`` whose first character, after an optional BOM, is ``[``), split into its elements
  without parsing them, so that one bad element is one reject;
- Parquet (``.parquet``, ``.pq``); binary columns are decoded as UTF-8 (a value that is not UTF-8 is a reject);
- a Hugging Face ``save_to_disk`` directory (``state.json`` + Arrow shards); for a ``DatasetDict`` directory
  its ``train`` split is read (every split when it has none);
- any other directory: every file with one of the extensions above, recursively, in sorted order. Files below
  a hidden or underscore name (``_SUCCESS``, Spark's ``_temporary/``, ``.ipynb_checkpoints/``, ``.crc``) and
  files of another type are not read; each is listed in stats.json ``skipped`` with the reason, as is a file
  named twice (it is read once).

Each record keeps its ``source`` (the file, or the HF dataset directory) and ``row``: the 0-based line index in
a JSONL file (blank lines are skipped, not counted, but keep their index), else the 0-based record index.

Per record: ``qcore.data`` parses, normalizes (a DSP record yields several pairs) and tokenizes it inside
``map_batches`` (a callable class: the tokenizer is loaded once per actor). A record that fails anywhere (any of
its pairs; ``InvalidRecord`` or any other exception of parsing, normalization or tokenization) is rejected as a
whole: it goes to ``rejects.jsonl`` (source, row, field, reason, the raw text cut to 300 characters) and is
counted; ``read == kept + rejected`` counts records. Damage to a file (a corrupt Parquet footer, a truncated
compressed stream, an unreadable file, a JSON array cut short) keeps the records read before it and is one
more reject of that source (field ``<file>``, row = the first record not read, the reason naming the file);
stats.json says it under ``sources.<source>.damage``. With ``data.fail_fast`` the first reject raises
:class:`PreprocessError` naming file, row, field and reason.

The stage fails (PreprocessError; no train/eval written, the manifest does not mark it finished) when no record
is kept, or when the rejected share of the records read is above ``data.max_reject_fraction``; rejects.jsonl
and stats.json are written first, for the post-mortem.

Split: a pair goes to eval when ``sha256(f"{data.seed}:" + canonical JSON of its normalized prompt)`` (as a
fraction in [0, 1)) is below ``data.eval_fraction``. The prompt is normalized to messages (a plain string is
one user message) with whitespace runs collapsed, so the same prompt never lands on both sides, whichever
records, formats or files carry it; the rule is deterministic and order-independent. When that leaves eval
empty (tiny data), the prompt with the smallest hash goes to eval (when there are at least two prompts).

Outputs under ``out_dir``: ``train/`` and ``eval/`` (Parquet; columns ``source, row, pair_index, prompt_json,
chosen, rejected`` + the tokenized pair row of docs/architecture.md), ``rejects.jsonl``, ``stats.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pipelines import common  # noqa: E402
from qcore.config import Config, ConfigError, DataConfig  # noqa: E402

RAW_CHARS = 300  # raw text kept per reject
READ_BATCH = 1024  # records per block out of the reader
TOKENIZE_BATCH = 256
CHUNK = 1 << 16  # bytes per read of a (compressed) stream: what a damaged stream loses at most
_EXT_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
              ".arrow": "arrow"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_BOM = b"\xef\xbb\xbf"
FILE_FIELD = "<file>"  # the field of a reject that is damage to the file, not one bad record


class PreprocessError(ValueError):
    """The stage cannot produce usable data: an invalid record under ``data.fail_fast`` (the message names file,
    row, field and reason), no record kept, or too many rejected (the message gives the counts)."""


# ----------------------------------------------------------------------------------------------------------------
# Sources: expand data.train_files into readable units
# ----------------------------------------------------------------------------------------------------------------
def _kind_of(name: str) -> str | None:
    low = name.lower()
    for comp in _COMPRESSED:
        if low.endswith(comp):
            low = low[: -len(comp)]
            break
    for ext, kind in _EXT_KINDS.items():
        if low.endswith(ext):
            return kind
    return None


def _why_not_read(name: str) -> str:
    """Why a file of a directory input is not read (its type)."""
    stem, ext = os.path.splitext(name.lower())
    if _kind_of(stem):
        return f"unsupported compression {ext!r} (read: {', '.join(_COMPRESSED)})"
    return (f"unsupported file type {ext or name!r} (read: {', '.join(_EXT_KINDS)}, optionally compressed "
            f"{'/'.join(_COMPRESSED)})")


def _child(entry: str, base_path: str, child_path: str) -> str:
    """The child as the user would write it: ``entry`` + the part of ``child_path`` below ``base_path``."""
    return common.join(entry, child_path[len(base_path):])


def _identity(fs, path: str) -> str:
    """One file however it is named (relative, absolute, file://, through a symlink)."""
    import pyarrow.fs as pafs

    return os.path.realpath(path) if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def list_sources(train_files: list[str], skipped: list[dict] | None = None) -> list[dict]:
    """``data.train_files`` -> ``[{"source", "kind", "files": [...]}]`` (kind: jsonl|json|parquet|arrow|hf).

    Paths stay as given (relative local paths are resolved by whoever opens them, so a job's working dir works
    on every node). A missing path raises FileNotFoundError naming it. Files a directory holds but that are not
    read, and files named a second time, are appended to ``skipped`` as ``{"file", "reason"}``.
    """
    if not train_files:
        raise FileNotFoundError("data.train_files is empty: name at least one preference file")
    skipped = [] if skipped is None else skipped
    seen: dict[str, str] = {}  # identity -> the source that reads it
    out: list[dict] = []

    def add(src: dict, ident: str) -> None:
        if ident in seen:
            skipped.append({"file": src["source"], "reason": f"named twice: already read as '{seen[ident]}'"})
            return
        seen[ident] = src["source"]
        out.append(src)

    for entry in _expand_globs(train_files):
        _list_entry(str(entry), add, skipped)
    return out


def _expand_globs(train_files: list[str]) -> Iterator[str]:
    import glob

    for entry in train_files:
        entry = str(entry)
        if not common.is_uri(entry) and any(ch in entry for ch in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise FileNotFoundError(f"data.train_files: '{entry}' matches no file")
            yield from matches
        else:
            yield entry


def _list_entry(entry: str, add, skipped: list[dict]) -> None:
    import pyarrow.fs as pafs

    fs, path = common.resolve_fs(entry)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data.train_files: '{entry}' does not exist")
    if info.type == pafs.FileType.File:
        kind = _kind_of(path)
        if kind is None:
            raise ValueError(f"data.train_files: '{entry}': {_why_not_read(info.base_name)}, or a directory")
        add({"source": entry, "kind": kind, "files": [entry]}, _identity(fs, path))
        return
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    if "dataset_dict.json" in names:  # HF DatasetDict: its train split (else all)
        splits = _read_json_file(common.join(entry, "dataset_dict.json"))["splits"]
        for split in (["train"] if "train" in splits else splits):
            sub = common.join(entry, split)
            add(_hf_source(sub), _identity(fs, common.resolve_fs(sub)[1]))
        return
    if "state.json" in names and "dataset_info.json" in names:
        add(_hf_source(entry), _identity(fs, path))
        return
    found = 0
    for i in sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path):
        if i.type == pafs.FileType.Directory:
            continue
        child = _child(entry, path, i.path)
        below = i.path[len(path):].strip("/").split("/")
        if any(part.startswith(("_", ".")) for part in below):
            skipped.append({"file": child, "reason": "hidden or underscore name (bookkeeping such as _SUCCESS, "
                                                     "_temporary/, .ipynb_checkpoints/, .crc)"})
        elif i.type != pafs.FileType.File:
            skipped.append({"file": child, "reason": "not a regular file"})
        elif (kind := _kind_of(i.path)) is None:
            skipped.append({"file": child, "reason": _why_not_read(i.base_name)})
        else:
            found += 1
            add({"source": child, "kind": kind, "files": [child]}, _identity(fs, i.path))
    if not found:
        raise FileNotFoundError(f"data.train_files: directory '{entry}' holds no readable file "
                                f"({_describe_skipped(skipped, entry)})")


def _describe_skipped(skipped: list[dict], entry: str) -> str:
    mine = [s for s in skipped if s["file"].startswith(entry)]
    if not mine:
        return "it is empty"
    shown = "; ".join(f"{s['file']}: {s['reason']}" for s in mine[:3])
    return f"{len(mine)} not read: {shown}{'; ...' if len(mine) > 3 else ''}"


def _read_json_file(uri: str) -> Any:
    try:
        return json.loads(common.read_text(uri))
    except (ValueError, OSError) as err:
        raise ValueError(f"data.train_files: '{uri}': {type(err).__name__}: {err}") from None


def _hf_source(entry: str) -> dict:
    state = _read_json_file(common.join(entry, "state.json"))
    files = [common.join(entry, f["filename"]) for f in state.get("_data_files", [])]
    if not files:
        raise FileNotFoundError(f"data.train_files: '{entry}' is a Hugging Face dataset without data files")
    return {"source": entry, "kind": "hf", "files": files}


HASH_LIMIT = 1 << 30  # local files up to 1 GiB are keyed by content; larger ones and URIs by size + mtime


def fingerprint(train_files: list[str]) -> list[dict]:
    """Each input file's path, size and sha256 (local files <= HASH_LIMIT) or mtime (part of the preprocess key).
    Content, not mtime: `ray job submit --working-dir` unpacks the files anew (new mtimes) for a later job.
    A file that cannot be read gets its error instead (the stage then records it as damage of that source)."""
    out = []
    for src in list_sources(train_files):
        for f in src["files"]:
            fs, path = common.resolve_fs(f)
            info = fs.get_file_info(path)
            entry = {"file": f, "size": info.size}
            if not common.is_uri(f) and info.size is not None and info.size <= HASH_LIMIT:
                digest = hashlib.sha256()
                try:
                    with open(path, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(block)
                    entry["sha256"] = digest.hexdigest()
                except OSError as err:
                    entry["error"] = f"{type(err).__name__}: {err}"
            else:
                entry["mtime_ns"] = info.mtime_ns
            out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading: one source -> (row, raw JSON text, field, reason) without parsing (a malformed record must survive to
# be counted); field/reason are "" for a record, else the reader's own reject of that row
# ----------------------------------------------------------------------------------------------------------------
def _inflate(raw, make, name: str) -> Iterator[bytes]:
    """Decompress a gzip/bz2 stream chunk by chunk (concatenated members too); everything before damage is
    yielded, then OSError says what is wrong."""
    d, fed = make(), False
    while block := raw.read(CHUNK):
        while block:
            fed = True
            out = d.decompress(block)
            if out:
                yield out
            if d.eof:  # a member ended; another may follow
                block, d, fed = d.unused_data, make(), False
            else:
                block = b""
    if fed and not d.eof:
        raise OSError(f"truncated {name} stream: the file ends in the middle of compressed data")


def _chunks(file: str) -> Iterator[bytes]:
    """The decompressed bytes of ``file`` (compression by extension), without a leading UTF-8 BOM."""
    import bz2
    import zlib

    import pyarrow as pa

    fs, path = common.resolve_fs(file)
    low = path.lower()
    with fs.open_input_stream(path, compression=None) as raw:
        if low.endswith(".gz"):
            stream = _inflate(raw, lambda: zlib.decompressobj(wbits=31), "gzip")
        elif low.endswith(".bz2"):
            stream = _inflate(raw, bz2.BZ2Decompressor, "bz2")
        elif low.endswith((".zst", ".lz4")):
            codec = pa.CompressedInputStream(raw, "zstd" if low.endswith(".zst") else "lz4")
            stream = iter(lambda: codec.read(CHUNK), b"")
        else:
            stream = iter(lambda: raw.read(1 << 20), b"")
        first = True
        for chunk in stream:
            if first:
                chunk, first = chunk[len(_BOM):] if chunk.startswith(_BOM) else chunk, False
            yield chunk


def _lines(chunks) -> Iterator[tuple[int, bytes]]:
    """Universal newlines: ``\\n``, ``\\r\\n`` and a lone ``\\r`` each end one line (JSON text holds neither raw)."""
    carry = b""
    index = 0
    for chunk in chunks:
        parts = (carry + chunk).splitlines(keepends=True)
        # an unterminated last part continues in the next chunk; one ending in \r may be half of \r\n
        carry = parts.pop() if parts and not parts[-1].endswith(b"\n") else b""
        for line in parts:
            yield index, line.rstrip(b"\r\n")
            index += 1
    if carry:
        yield index, carry.rstrip(b"\r\n")


_WS = re.compile(r"[ \t\n\r]*")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(")?|[\[\]{},]')


def _skip_value(text: str, i: int) -> tuple[int, bool]:
    """End of the JSON value at ``text[i]`` found by bracket depth alone (for an element the decoder refused:
    malformed, too deep, a huge integer) and whether it is complete (False: the text ends inside it)."""
    opened: list[str] = []
    for m in _TOKEN.finditer(text, i):
        c = m.group()[0]
        if c == '"':
            if m.group(1) is None:
                return len(text), False  # unterminated string
        elif c in "[{":
            opened.append(c)
        elif c in "]}":
            if not opened:  # the array's own "]": the element ended before it
                return m.start(), True
            want = "[" if c == "]" else "{"
            while opened and opened.pop() != want:  # a mismatched closer also closes what it skips
                pass
            if not opened:
                return m.end(), True
        elif not opened:  # a comma ends a scalar element
            return m.start(), True
    return len(text), not opened


def _array_elements(data: bytes) -> Iterator[tuple]:
    """A JSON array file -> one raw record per element; a cut or broken array keeps its complete elements."""
    text = data.decode("utf-8", "surrogateescape")  # invalid bytes survive to be one element's reject
    decoder = json.JSONDecoder()
    i = _WS.match(text).end() + 1  # past "["
    i = _WS.match(text, i).end()
    row = 0
    if text[i:i + 1] == "]":
        i += 1
    else:
        while True:
            try:
                end, complete = decoder.raw_decode(text, i)[1], True
            except (ValueError, RecursionError):
                end, complete = _skip_value(text, i)
            raw = text[i:end].encode("utf-8", "surrogateescape")
            if not complete:
                yield row, raw, FILE_FIELD, f"truncated JSON array: the file ends inside element {row}"
                return
            yield row, raw, "", ""
            row += 1
            i = _WS.match(text, end).end()
            if i >= len(text):
                yield row, b"", FILE_FIELD, f"truncated JSON array: no closing ']' after element {row - 1}"
                return
            if text[i] == "]":
                i += 1
                break
            if text[i] != ",":
                yield (row, text[i:i + RAW_CHARS].encode("utf-8", "surrogateescape"), FILE_FIELD,
                       f"malformed JSON array: expected ',' or ']' after element {row - 1} (character {i}); "
                       f"the rest of the file is not read")
                return
            i = _WS.match(text, i + 1).end()
    rest = text[i:].strip()
    if rest:
        yield (row, rest[:RAW_CHARS].encode("utf-8", "surrogateescape"), FILE_FIELD,
               "malformed JSON array: text after the closing ']' is not read")


def _json_records(file: str, kind: str) -> Iterator[tuple]:
    chunks = _chunks(file)
    head = b""
    for chunk in chunks:
        head += chunk
        if head.strip():
            break
    if kind == "json" and head.lstrip()[:1] == b"[":
        data, damage = [head], None
        try:
            data.extend(chunks)
        except Exception as err:  # noqa: BLE001 - a broken stream: keep the elements read before it
            damage = err
        for rec in _array_elements(b"".join(data)):
            if damage is not None and rec[2] == FILE_FIELD:
                break  # the cut array is the stream's damage, said once below
            yield rec
        if damage is not None:
            raise damage
        return
    for i, line in _lines(_prepend(head, chunks)):
        if line.strip():  # blank lines are not records (their index still counts)
            yield i, line, "", ""


def _prepend(head: bytes, chunks) -> Iterator[bytes]:
    if head:
        yield head
    yield from chunks


def _as_text(value: Any) -> str:
    """json.dumps' fallback for Arrow values: bytes (binary columns) must be UTF-8, others become their str."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")  # UnicodeDecodeError: _bad_field names the column
    return str(value)


def _bad_field(value: Any, path: str = "") -> str:
    """The path of the first bytes value in an Arrow record that is not UTF-8."""
    if isinstance(value, (bytes, bytearray)):
        try:
            bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _bad_field(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
        if found:
            return found
    return ""


def _batch_records(batch, row: int) -> Iterator[tuple]:
    """An Arrow record batch (Parquet / Arrow / HF) -> raw records from ``row`` on; a value that is not UTF-8
    text (a string column holding invalid bytes, or a binary column) is that row's reject."""
    try:
        recs = batch.to_pylist()
    except UnicodeDecodeError:  # invalid UTF-8 in a string column: find the rows (and columns)
        recs = None
    for i in range(batch.num_rows):
        if recs is None:
            one = batch.slice(i, 1)
            try:
                rec = one.to_pylist()[0]
            except UnicodeDecodeError as err:
                col = next((n for n in one.schema.names if not _converts(one.column(n))), "<record>")
                yield row + i, b"", col, f"invalid UTF-8 in Arrow string column {col!r}: {err}"
                continue
        else:
            rec = recs[i]
        try:
            yield row + i, json.dumps(rec, ensure_ascii=False, default=_as_text).encode("utf-8"), "", ""
        except UnicodeDecodeError as err:
            field = _bad_field(rec) or "<record>"
            yield row + i, b"", field, f"binary value of {field!r} is not UTF-8 text: {err}"


def _converts(column) -> bool:
    try:
        column.to_pylist()
        return True
    except UnicodeDecodeError:
        return False


def _arrow_batches(kind: str, file: str) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = common.resolve_fs(file)
    with fs.open_input_file(path) as f:
        if kind == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH)
            return
        try:
            reader = pa.ipc.open_stream(f)  # what save_to_disk writes
        except pa.ArrowInvalid:
            f.seek(0)
            reader = pa.ipc.open_file(f)
            reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
        yield from reader


def _file_records(kind: str, file: str, row: int) -> Iterator[tuple]:
    if kind in ("jsonl", "json"):
        yield from _json_records(file, kind)
        return
    if kind not in ("parquet", "arrow", "hf"):
        raise ValueError(f"unknown source kind {kind!r}")
    for batch in _arrow_batches(kind, file):
        yield from _batch_records(batch, row)
        row += batch.num_rows


_KIND_NAMES = {"jsonl": "JSON Lines", "json": "JSON", "parquet": "Parquet", "arrow": "Arrow", "hf": "Arrow"}


def _read_sources(batch: dict) -> Iterator[dict]:
    """map_batches UDF (batch_size=1): one source descriptor -> blocks of {source, row, raw (bytes), field, reason}.
    An exception while reading a file is damage: the records before it stay, then one reject names the file."""
    for desc in batch["desc"]:
        src = json.loads(desc)
        cols: dict[str, list] = {"source": [], "row": [], "raw": [], "field": [], "reason": []}

        def add(row: int, raw: bytes, field: str, reason: str) -> None:
            for name, value in zip(cols, (src["source"], row, raw, field, reason)):
                cols[name].append(value)

        next_row = 0
        for file in src["files"]:
            try:
                for row, raw, field, reason in _file_records(src["kind"], file, next_row):
                    add(row, raw, field, reason)
                    next_row = row + 1
                    if len(cols["row"]) >= READ_BATCH:
                        yield cols
                        cols = {name: [] for name in cols}
            except Exception as err:  # noqa: BLE001 - any damage becomes a named reject, never a stage crash
                what = _KIND_NAMES[src["kind"]] + " file" + (f" {file}" if file != src["source"] else "")
                detail = f"{type(err).__name__}: {err}"[:RAW_CHARS]
                add(next_row, b"", FILE_FIELD, f"damaged {what} at record {next_row}: {detail}; the {next_row} "
                                               f"records before it are kept, the rest is not read")
                break
        if cols["row"]:
            yield cols


# ----------------------------------------------------------------------------------------------------------------
# Normalize + tokenize (callable class: one tokenizer per actor)
# ----------------------------------------------------------------------------------------------------------------
def _out_schema():
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema([
        ("kind", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("pair_index", pa.int32()),
        ("split_key", pa.float64()), ("prompt_json", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
        ("chosen_input_ids", ids), ("chosen_response_mask", ids), ("rejected_input_ids", ids),
        ("rejected_response_mask", ids), ("prompt_length", pa.int32()), ("truncated", pa.bool_()),
        ("field", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
    ])


PAIR_COLUMNS = ["source", "row", "pair_index", "prompt_json", "chosen", "rejected", "chosen_input_ids",
                "chosen_response_mask", "rejected_input_ids", "rejected_response_mask", "prompt_length"]


def split_key(prompt: str | list[dict], seed: int) -> float:
    """The prompt's position in [0, 1) for the train/eval split: sha256 of the seed and the canonical JSON of the
    normalized prompt (messages; a plain string is one user message; whitespace runs collapsed)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    canon = json.dumps([[m["role"], " ".join(m["content"].split())] for m in messages], separators=(",", ":"))
    digest = hashlib.sha256(f"{seed}:{canon}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _writable(text: Any) -> str:
    """Text that can be written as UTF-8 (an exception's message may quote a lone surrogate)."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


class TokenizeRecords:
    def __init__(self, model_path: str, trust_remote_code: bool, data_cfg: dict, fail_fast: bool):
        from transformers import AutoTokenizer

        from qcore.base_models import resolve_model_path

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path),
                                                       trust_remote_code=trust_remote_code)
        self.cfg = DataConfig(**data_cfg)
        self.fail_fast = fail_fast
        self.schema = _out_schema()

    def _pairs(self, raw: bytes) -> tuple[list[dict], list[dict]]:
        """Parse, normalize, tokenize one record; every failure is an InvalidRecord naming a field."""
        from qcore.data import InvalidRecord, normalize_record, parse_json_line, tokenize_pair

        try:
            pairs = normalize_record(parse_json_line(raw), self.cfg)
        except (InvalidRecord, ConfigError):
            raise
        except Exception as err:  # noqa: BLE001 - a record the parser/normalizer did not foresee is one reject
            raise InvalidRecord("<record>", f"normalization failed: {type(err).__name__}: {err}") from None
        rows = []
        for i, pair in enumerate(pairs):
            try:
                rows.append(tokenize_pair(pair, self.tokenizer, self.cfg.max_length, self.cfg.max_prompt_length))
            except InvalidRecord:
                raise
            except Exception as err:  # noqa: BLE001 - e.g. text the tokenizer refuses (TypeError)
                raise InvalidRecord("<record>", f"tokenization of pair {i} failed: {type(err).__name__}: "
                                                f"{err}") from None
        return pairs, rows

    def _truncated(self, pair: dict, tok: dict) -> bool:
        """Whether the truncation policy cut this pair (a response without its EOS, or a shortened prompt)."""
        from qcore.data import encode_prompt

        eos = self.tokenizer.eos_token_id
        if tok["chosen_input_ids"][-1] != eos or tok["rejected_input_ids"][-1] != eos:
            return True
        # a cut prompt is exactly max_prompt_length long: only then is it worth encoding it again
        return (tok["prompt_length"] == self.cfg.max_prompt_length
                and len(encode_prompt(pair["prompt"], self.tokenizer)) > tok["prompt_length"])

    def __call__(self, batch: dict):
        import pyarrow as pa

        from qcore.data import InvalidRecord

        cols: dict[str, list] = {name: [] for name in self.schema.names}

        def add(**values):
            for name in cols:
                cols[name].append(values.get(name))

        for source, row, raw, field, reason in zip(batch["source"], batch["row"], batch["raw"], batch["field"],
                                                   batch["reason"]):
            row, raw = int(row), bytes(raw)
            try:
                if field:  # the reader's own reject (damage, undecodable Arrow value)
                    raise InvalidRecord(str(field), str(reason))
                pairs, rows = self._pairs(raw)
            except InvalidRecord as err:
                field, reason = _writable(err.field), _writable(err.reason)
                if self.fail_fast:
                    raise PreprocessError(f"{source} row {row}: field {field!r}: {reason}") from None
                add(kind="reject", source=source, row=row, field=field, reason=reason,
                    raw=raw[:RAW_CHARS].decode("utf-8", "replace"), chosen_input_ids=[], chosen_response_mask=[],
                    rejected_input_ids=[], rejected_response_mask=[])
                continue
            key = split_key(pairs[0]["prompt"], self.cfg.seed)  # all pairs of a record share its prompt
            for i, (pair, tok) in enumerate(zip(pairs, rows)):
                add(kind="pair", source=source, row=row, pair_index=i, split_key=key,
                    prompt_json=json.dumps(pair["prompt"], ensure_ascii=False), chosen=pair["chosen"],
                    rejected=pair["rejected"], truncated=self._truncated(pair, tok), **tok)
        return pa.Table.from_pydict(cols, schema=self.schema)


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def stage_config(cfg: Config) -> dict:
    """The config that determines preprocess outputs (fail_fast does not change them; max_reject_fraction
    decides whether the stage succeeds, so it is part of the key)."""
    data = cfg.to_dict()["data"]
    data.pop("fail_fast")
    return {"model": {"path": cfg.model.path, "trust_remote_code": cfg.model.trust_remote_code}, "data": data}


def preprocess_key(cfg: Config) -> tuple[str, dict, dict]:
    """(key, config sections, inputs) of the preprocess stage: inputs are the files' path/size/content hash."""
    config = stage_config(cfg)
    inputs = {"files": fingerprint(cfg.data.train_files)}
    return common.stage_key({"config": config, "inputs": inputs}), config, inputs


def _fail_fast_message(err: BaseException) -> str | None:
    """The PreprocessError text inside a Ray Data / Ray task error (Ray re-wraps the UDF's exception)."""
    if isinstance(err, PreprocessError):
        return str(err)
    found = re.findall(r"PreprocessError: (.+)", str(err))
    return found[-1].strip() if found else None


def _most_common(rejects: list[dict]) -> str:
    counts: dict[tuple[str, str], int] = {}
    for r in rejects:
        counts[(r["field"], r["reason"])] = counts.get((r["field"], r["reason"]), 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"{n} x field {f!r}: {why}" for (f, why), n in top)


def _check_usable(stats: dict, rejects: list[dict], cfg: Config, out_dir: str) -> None:
    """PreprocessError when the data yields nothing to train on, or too much of it was rejected."""
    n_read, n_kept, n_rej = stats["read"], stats["kept"], stats["rejected"]
    where = f"see {common.join(out_dir, 'rejects.jsonl')} and stats.json"
    if n_read == 0:
        raise PreprocessError(f"preprocess: no records in data.train_files ({', '.join(stats['sources'])}): "
                              f"every source is empty")
    if n_kept == 0:
        raise PreprocessError(f"preprocess: no usable record: {n_read} read, 0 kept, {n_rej} rejected "
                              f"(most common: {_most_common(rejects)}); {where}")
    if n_rej / n_read > cfg.data.max_reject_fraction:
        raise PreprocessError(
            f"preprocess: {n_rej} of {n_read} records rejected ({n_rej / n_read:.1%}), more than "
            f"data.max_reject_fraction = {cfg.data.max_reject_fraction} (most common: {_most_common(rejects)}); "
            f"{where}; --data.max_reject_fraction 1 accepts them")


def preprocess_stage(cfg: Config, out_dir: str) -> dict:
    """Read, normalize, tokenize, split and write; returns counts and output paths (see the module doc)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    t0 = time.time()
    skipped: list[dict] = []
    sources = list_sources(cfg.data.train_files, skipped)
    # Warm the model cache on this node once (e.g. the tiny model is built here, not by every actor at once).
    from qcore.base_models import resolve_model_path

    resolve_model_path(cfg.model.path)
    for sub in ("train", "eval", "rejects.jsonl", "stats.json"):
        common.remove(common.join(out_dir, sub))
    common.makedirs(out_dir)

    cpus = int(ray.cluster_resources().get("CPU", 1))
    max_actors = max(1, min(8, cpus // 2))
    data_cfg = cfg.to_dict()["data"]
    raw = ray.data.from_items([{"desc": json.dumps(s)} for s in sources], override_num_blocks=len(sources))
    # Readers are tasks (one per source); a pool of tokenizer actors takes their blocks. The readers' fractional
    # CPU keeps Ray Data from fusing them into the actors, so one big file is still tokenized by every actor.
    raw = raw.map_batches(_read_sources, batch_size=1, batch_format="numpy", num_cpus=0.5)
    tokenized = raw.map_batches(
        TokenizeRecords, batch_size=TOKENIZE_BATCH, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        fn_constructor_kwargs={"model_path": cfg.model.path, "trust_remote_code": cfg.model.trust_remote_code,
                               "data_cfg": data_cfg, "fail_fast": cfg.data.fail_fast},
    )
    try:
        ds = tokenized.materialize()
    except Exception as err:  # noqa: BLE001 - re-raise fail_fast as one clean error
        msg = _fail_fast_message(err)
        if msg is None:
            raise
        raise PreprocessError(msg) from None

    # One pass over the small columns: counts, split keys, rejects.
    per_source = {s["source"]: {"kind": s["kind"], "read": 0, "kept": 0, "rejected": 0, "pairs": 0, "truncated": 0,
                                "damage": None} for s in sources}
    rejects: list[dict] = []
    pair_keys, pair_first = [], []
    small = ["kind", "source", "row", "pair_index", "split_key", "truncated", "field", "reason", "raw"]
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=8192):  # on this process: no task to start
        d = b.select(small).to_pydict()
        for kind, source, row, idx, key, cut, field, reason, raw_text in zip(*(d[c] for c in small)):
            s = per_source[source]
            if kind == "reject":
                s["read"] += 1
                s["rejected"] += 1
                if field == FILE_FIELD:
                    s["damage"] = reason
                rejects.append({"source": source, "row": row, "field": field, "reason": reason, "raw": raw_text})
            else:
                s["pairs"] += 1
                s["truncated"] += bool(cut)
                if idx == 0:
                    s["read"] += 1
                    s["kept"] += 1
                pair_keys.append(key)
                pair_first.append(idx == 0)
    keys = np.asarray(pair_keys, dtype=np.float64)
    first = np.asarray(pair_first, dtype=bool)
    frac = cfg.data.eval_fraction
    threshold, inclusive = frac, False
    if frac > 0 and len(np.unique(keys)) >= 2 and not (keys < frac).any():
        threshold, inclusive = float(keys.min()), True  # tiny data: the smallest-hash prompt goes to eval
    is_eval = (keys <= threshold) if inclusive else (keys < threshold)

    rejects.sort(key=lambda r: (r["source"], r["row"]))
    common.write_text(common.join(out_dir, "rejects.jsonl"),
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    n_read = sum(s["read"] for s in per_source.values())
    n_kept = sum(s["kept"] for s in per_source.values())
    n_rej = len(rejects)
    by_field: dict[str, int] = {}
    for r in rejects:
        by_field[r["field"]] = by_field.get(r["field"], 0) + 1
    stats = {
        "read": n_read, "kept": n_kept, "rejected": n_rej,
        "pairs": int(len(keys)), "train_pairs": int((~is_eval).sum()), "eval_pairs": int(is_eval.sum()),
        "train_records": int((first & ~is_eval).sum()), "eval_records": int((first & is_eval).sum()),
        "truncated": sum(s["truncated"] for s in per_source.values()),
        "rejected_by_field": by_field, "sources": per_source, "skipped": skipped,
        "max_reject_fraction": cfg.data.max_reject_fraction,
        "split": {"eval_fraction": frac, "seed": cfg.data.seed, "threshold": threshold, "inclusive": inclusive,
                  "rule": "sha256(f'{seed}:' + canonical JSON of the normalized prompt) as a fraction < "
                          "eval_fraction"},
        "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
        "model": cfg.model.path, "wall_s": round(time.time() - t0, 3),
    }
    assert n_read == n_kept + n_rej, stats  # every record is accounted for exactly once
    try:
        _check_usable(stats, rejects, cfg, out_dir)
    except PreprocessError as err:
        stats["error"] = str(err)
        common.write_json(common.join(out_dir, "stats.json"), stats)
        raise
    for s in skipped:
        print(f"  not read: {s['file']}: {s['reason']}", flush=True)
    for name, s in per_source.items():
        if s["damage"]:
            print(f"  damaged: {name}: {s['damage']}", flush=True)

    def _select(table: pa.Table, want_eval: bool) -> pa.Table:
        k = table["split_key"]
        ev = pc.less_equal(k, threshold) if inclusive else pc.less(k, threshold)
        mask = pc.and_(pc.equal(table["kind"], "pair"), ev if want_eval else pc.invert(ev))
        return table.filter(mask).select(PAIR_COLUMNS)

    paths = {"train_dir": common.join(out_dir, "train"), "eval_dir": common.join(out_dir, "eval")}
    schema = _out_schema()
    pair_schema = pa.schema([schema.field(c) for c in PAIR_COLUMNS])
    for name, want_eval, count in (("train_dir", False, int((~is_eval).sum())), ("eval_dir", True, int(is_eval.sum()))):
        fs, path = common.resolve_fs(paths[name])
        fs.create_dir(path, recursive=True)
        if count:
            ds.map_batches(_select, fn_kwargs={"want_eval": want_eval}, batch_format="pyarrow") \
                .write_parquet(path, filesystem=fs)
        else:  # an empty split is still a readable Parquet directory (0 rows, the right schema)
            with fs.open_output_stream(f"{path}/empty.parquet") as f:
                pq.write_table(pair_schema.empty_table(), f)

    stats["wall_s"] = round(time.time() - t0, 3)
    common.write_json(common.join(out_dir, "stats.json"), stats)
    print(f"{n_read} read, {n_kept} kept, {n_rej} rejected "
          f"({stats['pairs']} pairs: {stats['train_pairs']} train, {stats['eval_pairs']} eval; "
          f"{stats['truncated']} truncated)", flush=True)
    return {
        "out_dir": out_dir, **paths,
        "stats_path": common.join(out_dir, "stats.json"), "rejects_path": common.join(out_dir, "rejects.jsonl"),
        **{k: stats[k] for k in ("read", "kept", "rejected", "pairs", "train_pairs", "eval_pairs", "truncated")},
    }


def main(argv: list[str] | None = None) -> dict:
    cfg = common.cli_config("Preprocess preference data with Ray Data", argv)
    common.init_ray(cfg)
    key, config, inputs = preprocess_key(cfg)
    out_dir = common.join(common.run_dir(cfg), "preprocess", key)
    manifest = common.Manifest(common.run_dir(cfg))
    result = common.run_stage(manifest, "preprocess", key, config, inputs, out_dir,
                              lambda: preprocess_stage(cfg, out_dir), resume=cfg.run.resume)
    for name in ("train_dir", "eval_dir", "stats_path", "rejects_path"):
        print(f"  {name:13s}{result[name]}")
    return result


if __name__ == "__main__":
    main()
