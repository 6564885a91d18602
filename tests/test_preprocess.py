"""The preprocess stage on a real (shared) Ray: exact reject accounting, fail_fast, every input kind, the split."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.preprocess import PreprocessError, preprocess_stage, split_key
from qcore.config import load_config

pytestmark = [pytest.mark.ray]
ROOT = Path(__file__).resolve().parent.parent

GOOD = [
    {"prompt": "What is 1 + 2?", "chosen": "3.", "rejected": "Here is a long and detailed answer."},
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "No."},
]
LONG = "one two three four five six seven eight nine ten " * 20


def _cfg(files, **over):
    flat = {"data.train_files": json.dumps([str(f) for f in files]), "data.max_length": "64",
            "data.max_prompt_length": "32", "data.eval_fraction": "0.25", "model.path": "tiny"}
    flat.update({k: str(v) for k, v in over.items()})
    argv = [x for k, v in flat.items() for x in (f"--{k}", v)]
    return load_config(ROOT / "configs" / "tiny.yaml", argv)


def _bad_jsonl(path):
    lines = [
        json.dumps(GOOD[0]),                                                       # 0 ok
        '{"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": ',                # 1 malformed JSON
        json.dumps({"prompt": "What is 2 + 3?", "chosen": "5."}),                   # 2 missing key
        json.dumps({"prompt": "What is 2 + 4?", "chosen": "", "rejected": "7."}),   # 3 empty response
        json.dumps({"prompt": "Yes or no?", "chosen": "Yes.", "rejected": "Yes."}),  # 4 chosen == rejected
        json.dumps({"prompt": "Count.", "chosen": LONG + "yes", "rejected": LONG + "no"}),  # 5 over-long
        "",                                                                         # 6 blank: not a record
        json.dumps(GOOD[1]),                                                       # 7 ok
        "[1, 2]",                                                                  # 8 not an object
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _read_rows(directory):
    return pq.read_table(str(directory)).to_pylist()


@pytest.mark.timeout(300)
def test_bad_rows_are_counted_and_named(ray_session, tmp_path, capsys):
    src = _bad_jsonl(tmp_path / "bad.jsonl")
    out = preprocess_stage(_cfg([src], **{"data.max_reject_fraction": 1}), str(tmp_path / "out"))
    assert (out["read"], out["kept"], out["rejected"], out["pairs"]) == (8, 2, 6, 2)
    assert "8 read, 2 kept, 6 rejected" in capsys.readouterr().out

    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r for r in rejects}
    assert sorted(by_row) == [1, 2, 3, 4, 5, 8]
    assert all(r["source"] == str(src) for r in rejects)
    assert by_row[1]["field"] == "<line>" and "malformed JSON" in by_row[1]["reason"]
    assert by_row[1]["raw"].startswith('{"prompt": "What is 2 + 2?"')
    assert (by_row[2]["field"], by_row[2]["reason"]) == ("rejected", "missing key")
    assert (by_row[3]["field"], by_row[3]["reason"]) == ("chosen", "empty response")
    assert by_row[4]["reason"] == "chosen and rejected are identical"
    assert by_row[5]["field"] == "rejected" and by_row[5]["reason"].startswith("over-long")
    assert len(by_row[5]["raw"]) == 300  # truncated raw text
    assert by_row[8]["field"] == "<record>"

    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["read"] == stats["kept"] + stats["rejected"] == 8
    assert stats["sources"][str(src)] == {"kind": "jsonl", "read": 8, "kept": 2, "rejected": 6, "pairs": 2,
                                          "truncated": 0, "damage": None}
    rows = _read_rows(tmp_path / "out" / "train") + _read_rows(tmp_path / "out" / "eval")
    assert sorted(r["row"] for r in rows) == [0, 7]
    for r in rows:
        assert len(r["chosen_input_ids"]) == len(r["chosen_response_mask"]) <= 64
        assert sum(r["chosen_response_mask"][: r["prompt_length"]]) == 0


@pytest.mark.timeout(300)
def test_fail_fast_names_file_row_and_reason(ray_session, tmp_path):
    src = _bad_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(PreprocessError) as info:
        preprocess_stage(_cfg([src], **{"data.fail_fast": "true"}), str(tmp_path / "out"))
    msg = str(info.value)
    assert str(src) in msg and "row 1" in msg and "malformed JSON" in msg, msg


def _records(n, tag):
    return [{"prompt": f"What is {i} + {tag}? Answer briefly.", "chosen": f"{i}.", "rejected": f"No, {i + 1}."}
            for i in range(n)]


@pytest.mark.timeout(300)
def test_jsonl_parquet_hf_and_uri_inputs(ray_session, tmp_path):
    import datasets

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _records(5, "a")))
    array = tmp_path / "b.json"
    array.write_text(json.dumps(_records(3, "b")))
    parquet = tmp_path / "c.parquet"
    conv = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "chosen": [{"role": "assistant", "content": w}],
             "rejected": [{"role": "assistant", "content": "No."}]} for w in ("yes", "maybe", "one", "two")]
    pq.write_table(pa.Table.from_pylist(conv), parquet)
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(_records(6, "d") + [{"prompt": "x", "chosen": "", "rejected": "y"}]) \
        .save_to_disk(str(hf_dir))
    hf_dict = tmp_path / "hfdict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records(2, "e")),
                          "test": datasets.Dataset.from_list(_records(9, "f"))}).save_to_disk(str(hf_dict))
    files = [jsonl, array, f"file://{parquet}", hf_dir, hf_dict]
    out = preprocess_stage(_cfg(files), str(tmp_path / "out"))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    src = stats["sources"]
    assert src[str(jsonl)]["kept"] == 5 and src[str(jsonl)]["kind"] == "jsonl"
    assert src[str(array)]["kept"] == 3 and src[str(array)]["kind"] == "json"
    none = {"truncated": 0, "damage": None}
    assert src[f"file://{parquet}"] == {"kind": "parquet", "read": 4, "kept": 4, "rejected": 0, "pairs": 4, **none}
    assert src[str(hf_dir)] == {"kind": "hf", "read": 7, "kept": 6, "rejected": 1, "pairs": 6, **none}
    assert src[f"{hf_dict}/train"]["kept"] == 2 and len(src) == 5  # a DatasetDict: its train split only
    assert (out["read"], out["kept"], out["rejected"]) == (21, 20, 1)
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert (reject["source"], reject["row"], reject["field"]) == (str(hf_dir), 6, "chosen")
    rows = _read_rows(tmp_path / "out" / "train") + _read_rows(tmp_path / "out" / "eval")
    assert len(rows) == 20
    conv_rows = [r for r in rows if r["source"] == f"file://{parquet}"]
    assert sorted(r["row"] for r in conv_rows) == [0, 1, 2, 3]
    assert all(isinstance(json.loads(r["prompt_json"]), list) for r in conv_rows)  # messages survive


def _same_prompt_records(n_prompts):
    """Each prompt carried by three records in three forms: a string, the string with other whitespace, a
    one-message conversation (the chat template renders all three the same)."""
    recs = []
    for i in range(n_prompts):
        p = f"What is {i} times three? Answer briefly."
        recs.append({"prompt": p, "chosen": f"{3 * i}.", "rejected": "No idea."})
        recs.append({"prompt": "  " + p.replace(" ", " \t ") + "\n", "chosen": f"It is {3 * i}.", "rejected": "Ten."})
        recs.append({"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": f"{i}"}],
                     "rejected": [{"role": "assistant", "content": "Nope."}]})
    return recs


@pytest.mark.timeout(300)
def test_split_is_keyed_by_the_normalized_prompt(ray_session, tmp_path):
    recs = _same_prompt_records(16)
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = preprocess_stage(_cfg([src]), str(tmp_path / "out"))
    assert (res["kept"], res["train_pairs"] + res["eval_pairs"]) == (48, 48)
    sides = {name: {r["row"] // 3 for r in _read_rows(tmp_path / "out" / name)} for name in ("train", "eval")}
    assert not sides["train"] & sides["eval"] and sides["train"] | sides["eval"] == set(range(16))
    assert res["eval_pairs"] == 3 * len(sides["eval"])  # all three records of a prompt on one side
    # the rule itself: seed + normalized prompt, not position or record; another seed gives another split
    plain = [recs[3 * i]["prompt"] for i in range(16)]
    assert {i for i, p in enumerate(plain) if split_key(p, 0) < 0.25} == sides["eval"]
    assert 0 < len(sides["eval"]) < 16
    assert {i for i, p in enumerate(plain) if split_key(p, 1) < 0.25} != sides["eval"]
    assert split_key(recs[1]["prompt"], 0) == split_key(recs[2]["prompt"], 0) == split_key(plain[0], 0)
    assert split_key([{"role": "system", "content": "x"}, *recs[2]["prompt"]], 0) != split_key(plain[0], 0)


# ---------------------------------------------------------------------------------------------------- bad input
def _good(i, tag="g"):
    return {"prompt": f"Question {tag}{i}: what is {i} + 1?", "chosen": f"{i + 1}.", "rejected": "I cannot say."}


def _lines_file(path, lines, newline="\n"):
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def _invalid_utf8_strings(values):
    """An Arrow string array holding the given raw bytes (as a buggy writer leaves it: no UTF-8 check)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.array(offsets, pa.int32()).buffers()[1],
                                                             pa.py_buffer(b"".join(values))])


def _bad_input_dir(root):
    """A Spark-style output directory with one damaged file per case; returns {file name: expected}."""
    import gzip

    root.mkdir()
    U = {"role": "user", "content": "Tell me a fact."}
    A = {"role": "assistant", "content": "Water is wet."}
    SYS = {"role": "system", "content": "Be brief."}
    HP = "\n\nHuman: Name a colour.\n\nAssistant:"
    conv = lambda prompt: json.dumps({"prompt": prompt, "chosen": "A fact.", "rejected": "No."})  # noqa: E731
    long_prompt = "Please think about this carefully. " * 12 + "What is 2 + 2?"
    # Spark: part files of JSON lines named .json, a _SUCCESS marker, .crc checksums, an unfinished _temporary/
    _lines_file(root / "part-00000-5c1e-c000.json", [json.dumps(_good(i, "spark")) for i in range(4)])
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".part-00000-5c1e-c000.json.crc").write_bytes(b"crc\x00\x01")
    (root / "_temporary" / "0" / "_temporary").mkdir(parents=True)
    _lines_file(root / "_temporary" / "0" / "_temporary" / "part-00001.json", [json.dumps(_good(0, "tmp"))])
    (root / ".ipynb_checkpoints").mkdir()
    _lines_file(root / ".ipynb_checkpoints" / "records-checkpoint.jsonl", [json.dumps(_good(0, "ckpt"))])
    (root / "notes.txt").write_text("not data\n")
    (root / "table.csv").write_text("prompt,chosen,rejected\nq,a,b\n")
    (root / "old.jsonl.xz").write_bytes(b"\xfd7zXZ\x00")
    # per-record failures (JSON Lines)
    _lines_file(root / "records.jsonl", [
        json.dumps(_good(0, "r")),                                                           # 0 kept
        r'{"prompt": "Say hi \ud800", "chosen": "Hi.", "rejected": "No."}',                  # 1 surrogate, used
        r'{"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No.", "meta": {"note": "\udc00"}}',  # 2 ignored
        r'{"prompt": "Smile \ud83d\ude00", "chosen": "Hi.", "rejected": "No."}',             # 3 kept: a valid pair
        '{"prompt": "Deep", "chosen": "a", "rejected": "b", "x": ' + "[" * 3000 + "]" * 3000 + "}",  # 4
        '{"prompt": "Big", "chosen": "a", "rejected": "b", "id": ' + "7" * 5000 + "}",      # 5 int digit limit
        '{"prompt": "Dup", "chosen": "a", "rejected": "b", "chosen": "c"}',                  # 6 duplicate key
        json.dumps({"prompt": long_prompt, "chosen": "Four.", "rejected": "Five."}),         # 7 kept, truncated
    ])
    _lines_file(root / "roles.jsonl", [
        conv([SYS, {"role": "tool", "content": "x"}, U]),                                    # 0
        conv([U, U]),                                                                        # 1
        conv([U, A]),                                                                        # 2
        conv([A, U]),                                                                        # 3
        conv([U, SYS]),                                                                      # 4
        conv([SYS, U, A, U]),                                                                # 5 kept
        json.dumps({"chosen": HP + " Red.\n\nHuman: and another?", "rejected": HP + " Blue."}),   # 6
        json.dumps({"chosen": HP + " Red.", "rejected": HP + " Blue.\n\nAssistant: Green."}),     # 7
        json.dumps({"chosen": HP + " Red.", "rejected": HP + " Blue."}),                     # 8 kept
    ])
    # file-level damage
    text = "".join(json.dumps(_good(i, f"gz{i * 7919 % 1000}")) + "\n" for i in range(400)).encode()
    packed = gzip.compress(text)
    (root / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])  # a download cut mid-stream
    (root / "mislabelled.jsonl.gz").write_bytes(text[:300])  # not gzip at all: unreadable as named
    pq.write_table(pa.Table.from_pylist([_good(i, "pq") for i in range(5)]), root / "broken.parquet")
    data = bytearray((root / "broken.parquet").read_bytes())
    data[-4:] = b"XXXX"  # the footer's magic: what a partial copy or a disk error leaves
    (root / "broken.parquet").write_bytes(bytes(data))
    binary = [b"Say yes.", b"Say \xff no.", b"Say maybe."]
    pq.write_table(pa.table({"prompt": pa.array(binary, pa.binary()),
                             "chosen": pa.array([b"Yes.", b"No.", b"Maybe."], pa.binary()),
                             "rejected": ["No.", "Yes.", "No."]}), root / "binary.parquet")
    pq.write_table(pa.table({"prompt": ["Say one.", "Say two.", "Say three."],
                             "chosen": _invalid_utf8_strings([b"One.", b"Tw\xc3o.", b"Three."]),
                             "rejected": ["No.", "No.", "No."]}), root / "badutf8.parquet")
    # layouts that must not change a record
    (root / "bom_pretty.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([_good(i, "bom") for i in range(3)],
                                                                         indent=2).encode())
    _lines_file(root / "cr.jsonl", [json.dumps(_good(i, "cr")) for i in range(3)], newline="\r")
    (root / "cut_array.json").write_text(json.dumps([_good(i, "arr") for i in range(4)])[:-25])
    (root / "elements.json").write_text("[" + ", ".join([
        json.dumps(_good(0, "el")), '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}", '{"n": ' + "5" * 5000 + "}",
        '{"prompt": [1, }', json.dumps(_good(1, "el"))]) + "]")
    return root


def _by_row(rejects, source):
    return {r["row"]: (r["field"], r["reason"]) for r in rejects if r["source"] == source}


@pytest.mark.timeout(300)
def test_bad_input_is_counted_named_and_never_crashes(ray_session, tmp_path, capsys):
    """One stage run over a directory of damaged files (one per case) plus files named twice."""
    root = _bad_input_dir(tmp_path / "in")
    files = [root, root / "cr.jsonl", f"file://{root}/bom_pretty.json"]  # the last two: already in the directory
    out = preprocess_stage(_cfg(files, **{"data.max_reject_fraction": 1}), str(tmp_path / "out"))
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    src = stats["sources"]
    S = lambda name: f"{root}/{name}"  # noqa: E731
    counts = {Path(k).name: (v["read"], v["kept"], v["rejected"]) for k, v in src.items()}

    # what is not read: listed with the reason; a file named twice is read once
    skipped = {Path(s["file"]).name: s["reason"] for s in stats["skipped"]}
    for name in ("_SUCCESS", ".part-00000-5c1e-c000.json.crc", "part-00001.json", "records-checkpoint.jsonl"):
        assert skipped[name].startswith("hidden or underscore name"), (name, skipped)
    assert skipped["notes.txt"].startswith("unsupported file type '.txt'")
    assert skipped["table.csv"].startswith("unsupported file type '.csv'")
    assert skipped["old.jsonl.xz"].startswith("unsupported compression '.xz'")
    assert skipped["cr.jsonl"] == f"named twice: already read as '{S('cr.jsonl')}'"
    assert skipped["bom_pretty.json"] == f"named twice: already read as '{S('bom_pretty.json')}'"
    assert len(stats["skipped"]) == 9 and len(src) == 12
    assert "not read: " + S("table.csv") in capsys.readouterr().out

    assert counts["part-00000-5c1e-c000.json"] == (4, 4, 0)
    # per-record failures: rejects with field and reason, the rest kept
    assert counts["records.jsonl"] == (8, 3, 5)
    rec = _by_row(rejects, S("records.jsonl"))
    assert sorted(rec) == [1, 2, 4, 5, 6]
    assert rec[1][0] == "prompt" and rec[1][1].startswith("lone UTF-16 surrogate")
    assert rec[2][0] == "meta.note" and rec[2][1].startswith("lone UTF-16 surrogate")
    assert rec[4][0] == "<line>" and rec[4][1].startswith("malformed JSON: nested deeper than Python's recursion")
    assert rec[5][0] == "<line>" and "Exceeds the limit (4300 digits)" in rec[5][1]
    assert rec[6] == ("chosen", "duplicate key 'chosen' in a JSON object (the last value would win silently)")
    assert src[S("records.jsonl")]["truncated"] == 1  # the long prompt, row 7
    # roles
    assert counts["roles.jsonl"] == (9, 2, 7)
    roles = _by_row(rejects, S("roles.jsonl"))
    assert roles == {
        0: ("prompt[1].role", "unknown role 'tool' (expected user, assistant or system)"),
        1: ("prompt[1].role", "two 'user' messages in a row (user and assistant must alternate)"),
        2: ("prompt", "the prompt ends with an assistant message"),
        3: ("prompt[0].role", "the conversation must start with a user message (after an optional system message)"),
        4: ("prompt[1].role", "a system message is only allowed first"),
        6: ("chosen", "malformed HH text: the response continues into another Human turn"),
        7: ("rejected", "malformed HH text: the response continues into another Assistant turn"),
    }
    assert src[S("roles.jsonl")]["truncated"] == 1  # row 5: four messages, 66 prompt tokens > max_prompt_length 32
    assert stats["truncated"] == out["truncated"] == 2
    # file-level damage: the records before it kept, one reject naming the file and the reason
    read, kept, rejected = counts["cut.jsonl.gz"]
    assert 0 < kept < 400 and (read, rejected) == (kept + 1, 1)
    (row, (field, reason)), = _by_row(rejects, S("cut.jsonl.gz")).items()
    assert (row, field) == (kept, "<file>") and "truncated gzip stream" in reason, reason
    assert src[S("cut.jsonl.gz")]["damage"] == reason
    assert counts["mislabelled.jsonl.gz"] == (1, 0, 1)
    assert "incorrect header check" in src[S("mislabelled.jsonl.gz")]["damage"]
    assert counts["broken.parquet"] == (1, 0, 1)
    assert "Parquet magic bytes not found" in src[S("broken.parquet")]["damage"]
    assert _by_row(rejects, S("broken.parquet"))[0][0] == "<file>"
    # Arrow values that are not text: decoded when UTF-8, a reject naming the column when not
    assert counts["binary.parquet"] == (3, 2, 1)
    assert _by_row(rejects, S("binary.parquet"))[1][0] == "prompt"
    assert counts["badutf8.parquet"] == (3, 2, 1)
    assert _by_row(rejects, S("badutf8.parquet"))[1][0] == "chosen"
    assert "invalid UTF-8 in Arrow string column 'chosen'" in _by_row(rejects, S("badutf8.parquet"))[1][1]
    # layouts that change nothing: BOM + pretty-printed array, CR-only newlines; a cut array keeps its elements
    assert counts["bom_pretty.json"] == (3, 3, 0) and counts["cr.jsonl"] == (3, 3, 0)
    assert counts["cut_array.json"] == (4, 3, 1)
    assert _by_row(rejects, S("cut_array.json")) == {
        3: ("<file>", "truncated JSON array: the file ends inside element 3")}
    assert counts["elements.json"] == (5, 2, 3)
    el = _by_row(rejects, S("elements.json"))
    assert sorted(el) == [1, 2, 3] and all(f == "<line>" and r.startswith("malformed JSON") for f, r in el.values())

    assert (out["read"], out["kept"], out["rejected"]) == (stats["read"], stats["kept"], stats["rejected"])
    assert stats["read"] == sum(v["read"] for v in src.values()) == stats["kept"] + stats["rejected"]
    rows = _read_rows(tmp_path / "out" / "train") + _read_rows(tmp_path / "out" / "eval")
    assert len(rows) == stats["kept"] and not any("b'" in r["prompt_json"] + r["chosen"] for r in rows)
    by_src = {(Path(r["source"]).name, r["row"]): r for r in rows}
    assert json.loads(by_src[("binary.parquet", 0)]["prompt_json"]) == "Say yes."
    assert by_src[("binary.parquet", 2)]["chosen"] == "Maybe."
    assert json.loads(by_src[("records.jsonl", 3)]["prompt_json"]) == "Smile \U0001F600"
    assert [r for (name, r) in sorted(by_src) if name == "cr.jsonl"] == [0, 1, 2]
    assert json.loads(by_src[("bom_pretty.json", 0)]["prompt_json"]) == _good(0, "bom")["prompt"]
    assert sorted(r for (name, r) in by_src if name == "cut.jsonl.gz") == list(range(kept))


@pytest.mark.timeout(300)
def test_damage_under_fail_fast_names_the_file(ray_session, tmp_path):
    root = _bad_input_dir(tmp_path / "in")
    with pytest.raises(PreprocessError) as info:
        preprocess_stage(_cfg([root / "broken.parquet"], **{"data.fail_fast": "true"}), str(tmp_path / "out"))
    msg = str(info.value)
    assert str(root / "broken.parquet") in msg and "row 0" in msg and "Parquet magic bytes" in msg, msg


@pytest.mark.timeout(300)
def test_data_that_yields_nothing_stops_the_stage(ray_session, tmp_path):
    """Zero kept (a dsp_chosen_domain typo; an empty file) and a reject share over data.max_reject_fraction fail
    the stage with the counts; the manifest never marks such a run finished, so a rerun runs it again."""
    from pipelines import common
    from pipelines.preprocess import preprocess_key

    dsp = ROOT / "data" / "samples" / "dsp.jsonl"
    cfg = _cfg([dsp], **{"data.dsp_chosen_domain": "acadmy"})
    key, config, inputs = preprocess_key(cfg)
    manifest = common.Manifest(str(tmp_path / "run"))
    out_dir = str(tmp_path / "run" / "preprocess" / key)
    with pytest.raises(PreprocessError) as info:
        common.run_stage(manifest, "preprocess", key, config, inputs, out_dir, lambda: preprocess_stage(cfg, out_dir))
    assert str(info.value).startswith(
        "preprocess: no usable record: 3 read, 0 kept, 3 rejected (most common: 2 x field 'responses.acadmy': "
        "target domain response missing; 1 x field 'acadmy': target domain response missing); see "), info.value
    assert manifest.cached("preprocess", key) is None
    assert manifest.data["stages"]["preprocess"]["status"] == "failed"
    assert not (tmp_path / "run" / "preprocess" / key / "train").exists()
    stats = json.loads((tmp_path / "run" / "preprocess" / key / "stats.json").read_text())
    assert stats["kept"] == 0 and stats["error"] == str(info.value)  # written for the post-mortem

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(PreprocessError, match=r"no records in data.train_files \(.*empty.jsonl\): every source"):
        preprocess_stage(_cfg([empty]), str(tmp_path / "out_empty"))

    bad = _bad_jsonl(tmp_path / "bad.jsonl")  # 8 read, 2 kept, 6 rejected: 75% > the default 0.5
    with pytest.raises(PreprocessError) as info:
        preprocess_stage(_cfg([bad]), str(tmp_path / "out_share"))
    assert "6 of 8 records rejected (75.0%), more than data.max_reject_fraction = 0.5" in str(info.value)
    assert "--data.max_reject_fraction 1 accepts them" in str(info.value)
