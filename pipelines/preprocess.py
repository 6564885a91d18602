"""Preprocess stage (Ray Data): preference files -> normalized, tokenized pair rows -> train/ and eval/ Parquet.

    python pipelines/preprocess.py --config configs/tiny.yaml [--data.train_files '[a.jsonl, b.parquet]']

Inputs (``data.train_files``; local paths, globs, or pyarrow filesystem URIs such as ``s3://b/x.parquet``):
- JSON Lines (``.jsonl``, ``.ndjson``, ``.json`` holding lines; ``.gz`` etc. by extension), read line by line so
  that a malformed line is one counted reject, not a crash;
- a JSON array (``.json`` whose first character is ``[``);
- Parquet (``.parquet``, ``.pq``);
- a Hugging Face ``save_to_disk`` directory (``state.json`` + Arrow shards); for a ``DatasetDict`` directory
  its ``train`` split is read (every split when it has none);
- any other directory: every file with one of the extensions above, recursively, in sorted order.

Each record keeps its ``source`` (the file, or the HF dataset directory) and ``row``: the 0-based line index in
a JSONL file (blank lines are skipped, not counted, but keep their index), else the 0-based record index.

Per record: ``qcore.data`` parses, normalizes (a DSP record yields several pairs) and tokenizes it inside
``map_batches`` (a callable class: the tokenizer is loaded once per actor). A record that raises
``InvalidRecord`` anywhere (any of its pairs) is rejected as a whole: it goes to ``rejects.jsonl`` (source, row,
field, reason, the raw text cut to 300 characters) and is counted; ``read == kept + rejected`` counts records.
With ``data.fail_fast`` the first invalid record raises :class:`PreprocessError` naming file, row and reason.

Split: a record goes to eval when ``sha256(f"{data.seed}:" + canonical JSON of the record)`` (as a fraction in
[0, 1)) is below ``data.eval_fraction``: deterministic, order-independent, and all pairs of one record (and any
duplicate of it) land on the same side. When that leaves eval empty (tiny data), the record with the smallest
hash goes to eval.

Outputs under ``out_dir``: ``train/`` and ``eval/`` (Parquet; columns ``source, row, pair_index, prompt_json,
chosen, rejected`` + the tokenized pair row of docs/architecture.md), ``rejects.jsonl``, ``stats.json``.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pipelines import common  # noqa: E402
from qcore.config import Config, DataConfig  # noqa: E402

RAW_CHARS = 300  # raw text kept per reject
READ_BATCH = 1024  # records per block out of the reader
TOKENIZE_BATCH = 256
_EXT_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
              ".arrow": "arrow"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


class PreprocessError(ValueError):
    """An invalid record under ``data.fail_fast`` (the message names file, row, field and reason)."""


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


def _child(entry: str, base_path: str, child_path: str) -> str:
    """The child as the user would write it: ``entry`` + the part of ``child_path`` below ``base_path``."""
    return common.join(entry, child_path[len(base_path):])


def list_sources(train_files: list[str]) -> list[dict]:
    """``data.train_files`` -> ``[{"source", "kind", "files": [...]}]`` (kind: jsonl|json|parquet|arrow|hf).

    Paths stay as given (relative local paths are resolved by whoever opens them, so a job's working dir works
    on every node). A missing path raises FileNotFoundError naming it.
    """
    import glob

    import pyarrow.fs as pafs

    if not train_files:
        raise FileNotFoundError("data.train_files is empty: name at least one preference file")
    out: list[dict] = []
    for entry in train_files:
        if "://" not in entry and any(ch in entry for ch in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise FileNotFoundError(f"data.train_files: '{entry}' matches no file")
            out.extend(list_sources(matches))
            continue
        fs, path = common.resolve_fs(entry)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"data.train_files: '{entry}' does not exist")
        if info.type == pafs.FileType.File:
            kind = _kind_of(path)
            if kind is None:
                raise ValueError(f"data.train_files: '{entry}': unknown file type (expected one of "
                                 f"{', '.join(_EXT_KINDS)}, or a directory)")
            out.append({"source": entry, "kind": kind, "files": [entry]})
            continue
        names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
        if "dataset_dict.json" in names:  # HF DatasetDict: its train split (else all)
            splits = json.loads(common.read_text(common.join(entry, "dataset_dict.json")))["splits"]
            for split in (["train"] if "train" in splits else splits):
                out.append(_hf_source(common.join(entry, split)))
        elif "state.json" in names and "dataset_info.json" in names:
            out.append(_hf_source(entry))
        else:
            files = sorted(
                i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File and _kind_of(i.path) and not i.base_name.startswith(("_", "."))
            )
            if not files:
                raise FileNotFoundError(f"data.train_files: directory '{entry}' holds no readable file")
            out.extend({"source": (s := _child(entry, path, f)), "kind": _kind_of(f), "files": [s]} for f in files)
    return out


def _hf_source(entry: str) -> dict:
    state = json.loads(common.read_text(common.join(entry, "state.json")))
    files = [common.join(entry, f["filename"]) for f in state.get("_data_files", [])]
    if not files:
        raise FileNotFoundError(f"data.train_files: '{entry}' is a Hugging Face dataset without data files")
    return {"source": entry, "kind": "hf", "files": files}


HASH_LIMIT = 1 << 30  # local files up to 1 GiB are keyed by content; larger ones and URIs by size + mtime


def fingerprint(train_files: list[str]) -> list[dict]:
    """Each input file's path, size and sha256 (local files <= HASH_LIMIT) or mtime (part of the preprocess key).
    Content, not mtime: `ray job submit --working-dir` unpacks the files anew (new mtimes) for a later job."""
    out = []
    for src in list_sources(train_files):
        for f in src["files"]:
            fs, path = common.resolve_fs(f)
            info = fs.get_file_info(path)
            entry = {"file": f, "size": info.size}
            if "://" not in f and info.size is not None and info.size <= HASH_LIMIT:
                digest = hashlib.sha256()
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(block)
                entry["sha256"] = digest.hexdigest()
            else:
                entry["mtime_ns"] = info.mtime_ns
            out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading: one source -> (row, raw JSON text) without parsing (a malformed line must survive to be counted)
# ----------------------------------------------------------------------------------------------------------------
def _jsonl_lines(stream) -> Iterator[tuple[int, bytes]]:
    carry = b""
    index = 0
    while chunk := stream.read(1 << 20):
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop()
        for line in lines:
            yield index, line
            index += 1
    if carry:
        yield index, carry


def _records_of(src: dict) -> Iterator[tuple[int, bytes]]:
    kind = src["kind"]
    if kind in ("jsonl", "json"):
        fs, path = common.resolve_fs(src["files"][0])
        with fs.open_input_stream(path, compression="detect") as stream:
            head = stream.read(1 << 16)
            rest = _Chain(head, stream)
            if kind == "json" and head.lstrip()[:1] == b"[":
                text = head + stream.read()
                try:
                    records = json.loads(text)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    # a broken array: one reject for the whole file (row 0), raw = its start
                    yield 0, text[:RAW_CHARS]
                    return
                for i, rec in enumerate(records):
                    yield i, _dump(rec)
                return
            for i, line in _jsonl_lines(rest):
                if line.strip():  # blank lines are not records (their index still counts)
                    yield i, line
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        fs, path = common.resolve_fs(src["files"][0])
        row = 0
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH):
                for rec in batch.to_pylist():
                    yield row, _dump(rec)
                    row += 1
        return
    if kind in ("arrow", "hf"):
        import pyarrow as pa

        row = 0
        for file in src["files"]:
            fs, path = common.resolve_fs(file)
            with fs.open_input_file(path) as f:
                try:
                    reader = pa.ipc.open_stream(f)  # what save_to_disk writes
                except pa.ArrowInvalid:
                    f.seek(0)
                    reader = pa.ipc.open_file(f)
                    reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
                for batch in reader:
                    for rec in batch.to_pylist():
                        yield row, _dump(rec)
                        row += 1
        return
    raise ValueError(f"unknown source kind {kind!r}")


def _dump(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False, default=str).encode("utf-8")


class _Chain:
    """A stream whose first bytes were already read (``head``)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.stream.read(n)


def _read_sources(batch: dict) -> Iterator[dict]:
    """map_batches UDF (batch_size=1): one source descriptor -> blocks of {source, row, raw (bytes)}."""
    for desc in batch["desc"]:
        src = json.loads(desc)
        rows, raws = [], []
        for row, raw in _records_of(src):
            rows.append(row)
            raws.append(raw)
            if len(rows) >= READ_BATCH:
                yield {"source": [src["source"]] * len(rows), "row": rows, "raw": raws}
                rows, raws = [], []
        if rows:
            yield {"source": [src["source"]] * len(rows), "row": rows, "raw": raws}


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
        ("rejected_response_mask", ids), ("prompt_length", pa.int32()),
        ("field", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
    ])


PAIR_COLUMNS = ["source", "row", "pair_index", "prompt_json", "chosen", "rejected", "chosen_input_ids",
                "chosen_response_mask", "rejected_input_ids", "rejected_response_mask", "prompt_length"]


def split_key(record: Any, seed: int) -> float:
    """The record's position in [0, 1) for the train/eval split: sha256 of the seed and its canonical JSON."""
    canon = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    digest = hashlib.sha256(f"{seed}:{canon}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class TokenizeRecords:
    def __init__(self, model_path: str, trust_remote_code: bool, data_cfg: dict, fail_fast: bool):
        from transformers import AutoTokenizer

        from qcore.base_models import resolve_model_path

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path),
                                                       trust_remote_code=trust_remote_code)
        self.cfg = DataConfig(**data_cfg)
        self.fail_fast = fail_fast
        self.schema = _out_schema()

    def __call__(self, batch: dict):
        import pyarrow as pa

        from qcore.data import InvalidRecord, normalize_record, parse_json_line, tokenize_pair

        cols: dict[str, list] = {name: [] for name in self.schema.names}

        def add(**values):
            for name in cols:
                cols[name].append(values.get(name))

        for source, row, raw in zip(batch["source"], batch["row"], batch["raw"]):
            row = int(row)
            try:
                record = parse_json_line(bytes(raw))
                pairs = normalize_record(record, self.cfg)
                rows = [tokenize_pair(p, self.tokenizer, self.cfg.max_length, self.cfg.max_prompt_length)
                        for p in pairs]
            except InvalidRecord as err:
                if self.fail_fast:
                    raise PreprocessError(f"{source} row {row}: field {err.field!r}: {err.reason}") from None
                add(kind="reject", source=source, row=row, field=err.field, reason=err.reason,
                    raw=bytes(raw)[:RAW_CHARS].decode("utf-8", "replace"), chosen_input_ids=[], chosen_response_mask=[], rejected_input_ids=[],
                    rejected_response_mask=[])
                continue
            key = split_key(record, self.cfg.seed)
            for i, (pair, tok) in enumerate(zip(pairs, rows)):
                add(kind="pair", source=source, row=row, pair_index=i, split_key=key,
                    prompt_json=json.dumps(pair["prompt"], ensure_ascii=False), chosen=pair["chosen"],
                    rejected=pair["rejected"], **tok)
        return pa.Table.from_pydict(cols, schema=self.schema)


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def stage_config(cfg: Config) -> dict:
    """The config that determines preprocess outputs (fail_fast does not change them)."""
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


def preprocess_stage(cfg: Config, out_dir: str) -> dict:
    """Read, normalize, tokenize, split and write; returns counts and output paths (see the module doc)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    t0 = time.time()
    sources = list_sources(cfg.data.train_files)
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
    per_source = {s["source"]: {"kind": s["kind"], "read": 0, "kept": 0, "rejected": 0, "pairs": 0} for s in sources}
    rejects: list[dict] = []
    pair_keys, pair_first = [], []
    small = ["kind", "source", "row", "pair_index", "split_key", "field", "reason", "raw"]
    for b in ds.iter_batches(batch_format="pyarrow", batch_size=8192):  # on this process: no task to start
        d = b.select(small).to_pydict()
        for kind, source, row, idx, key, field, reason, raw_text in zip(
                d["kind"], d["source"], d["row"], d["pair_index"], d["split_key"], d["field"], d["reason"], d["raw"]):
            s = per_source[source]
            if kind == "reject":
                s["read"] += 1
                s["rejected"] += 1
                rejects.append({"source": source, "row": row, "field": field, "reason": reason, "raw": raw_text})
            else:
                s["pairs"] += 1
                if idx == 0:
                    s["read"] += 1
                    s["kept"] += 1
                pair_keys.append(key)
                pair_first.append(idx == 0)
    keys = np.asarray(pair_keys, dtype=np.float64)
    first = np.asarray(pair_first, dtype=bool)
    frac = cfg.data.eval_fraction
    threshold, inclusive = frac, False
    if frac > 0 and first.sum() >= 2 and not (keys[first] < frac).any():
        threshold, inclusive = float(keys.min()), True  # tiny data: the smallest-hash record goes to eval
    is_eval = (keys <= threshold) if inclusive else (keys < threshold)

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
        "rejected_by_field": by_field, "sources": per_source,
        "split": {"eval_fraction": frac, "seed": cfg.data.seed, "threshold": threshold, "inclusive": inclusive,
                  "rule": "sha256(f'{seed}:' + canonical JSON of the record) as a fraction < eval_fraction"},
        "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
        "model": cfg.model.path, "wall_s": round(time.time() - t0, 3),
    }
    assert n_read == n_kept + n_rej, stats  # every record is accounted for exactly once
    common.write_json(common.join(out_dir, "stats.json"), stats)
    print(f"{n_read} read, {n_kept} kept, {n_rej} rejected "
          f"({stats['pairs']} pairs: {stats['train_pairs']} train, {stats['eval_pairs']} eval)", flush=True)
    return {
        "out_dir": out_dir, **paths,
        "stats_path": common.join(out_dir, "stats.json"), "rejects_path": common.join(out_dir, "rejects.jsonl"),
        **{k: stats[k] for k in ("read", "kept", "rejected", "pairs", "train_pairs", "eval_pairs")},
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
