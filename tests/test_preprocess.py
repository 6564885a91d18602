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
    out = preprocess_stage(_cfg([src]), str(tmp_path / "out"))
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
    assert stats["sources"][str(src)] == {"kind": "jsonl", "read": 8, "kept": 2, "rejected": 6, "pairs": 2}
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
    assert src[f"file://{parquet}"] == {"kind": "parquet", "read": 4, "kept": 4, "rejected": 0, "pairs": 4}
    assert src[str(hf_dir)] == {"kind": "hf", "read": 7, "kept": 6, "rejected": 1, "pairs": 6}
    assert src[f"{hf_dict}/train"]["kept"] == 2 and len(src) == 5  # a DatasetDict: its train split only
    assert (out["read"], out["kept"], out["rejected"]) == (21, 20, 1)
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert (reject["source"], reject["row"], reject["field"]) == (str(hf_dir), 6, "chosen")
    rows = _read_rows(tmp_path / "out" / "train") + _read_rows(tmp_path / "out" / "eval")
    assert len(rows) == 20
    conv_rows = [r for r in rows if r["source"] == f"file://{parquet}"]
    assert sorted(r["row"] for r in conv_rows) == [0, 1, 2, 3]
    assert all(isinstance(json.loads(r["prompt_json"]), list) for r in conv_rows)  # messages survive


@pytest.mark.timeout(300)
def test_split_is_deterministic_and_seeded(ray_session, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(40, "s")))

    def eval_rows(name, seed):
        res = preprocess_stage(_cfg([src], **{"data.seed": seed}), str(tmp_path / name))
        assert res["train_pairs"] + res["eval_pairs"] == 40
        return {r["row"] for r in _read_rows(tmp_path / name / "eval")}

    first, again = eval_rows("a", 0), eval_rows("b", 0)
    assert first == again and 0 < len(first) < 40
    # the rule itself: content + seed, not position; another seed gives another split
    recs = _records(40, "s")
    assert {i for i, r in enumerate(recs) if split_key(r, 0) < 0.25} == first
    assert {i for i, r in enumerate(recs) if split_key(r, 1) < 0.25} != first
    assert split_key(dict(reversed(list(recs[0].items()))), 0) == split_key(recs[0], 0)  # key order is irrelevant
