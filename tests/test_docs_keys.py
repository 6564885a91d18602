"""Config keys named in the docs exist in qcore/config.py: `--section.key` flags, Hydra-style `section.key=value`
and backticked `section.key` mentions in README.md, docs/*.md, cluster/ and the profiles' comments. A key that is
renamed or removed in code then fails here, naming the file and the key, instead of in a user's shell."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from qcore.config import config_keys

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted({ROOT / "README.md", ROOT / "cluster" / "README.md", *(ROOT / "docs").glob("*.md"),
               *(ROOT / "cluster").glob("*.yaml"), *(ROOT / "configs").glob("*.yaml")})
SECTIONS = ("model", "adapter", "q", "data", "train", "tune", "eval", "run")
PLACEHOLDERS = {"section.key"}  # the generic form in usage lines ("[--section.key value ...]")
_DOTTED = r"[a-z_]+(?:\.[A-Za-z0-9_]+)+"
_SECTION_DOTTED = r"(?:" + "|".join(SECTIONS) + r")(?:\.[A-Za-z0-9_]+)+"
FLAG = re.compile(r"(?<![\w/.-])--(" + _DOTTED + r")")  # --train.lr (not ---, not a/--b)
ASSIGN = re.compile(r"(?<![\w/.$-])(" + _SECTION_DOTTED + r")=")  # train.lr=3e-4
TICKED = re.compile(r"`(" + _SECTION_DOTTED + r")(?=[`\s:=\[])")  # `train.zero_init` / `train.zero_init: true`


def _keys():
    leaves = {key for key, _, _ in config_keys()}
    # free-form maps: any sub-key is the user's (train.deepspeed.zero_optimization..., tune.space.q.beta ...)
    maps = {key for key, typ, _ in config_keys() if typ.startswith("dict") or typ == "Any"}
    groups = {".".join(key.split(".")[:i]) for key in leaves for i in range(1, key.count(".") + 1)}
    return leaves, maps, groups


def unknown_keys(text: str) -> list[str]:
    """The dotted config keys ``text`` names that qcore/config.py does not define (in order, without repeats)."""
    leaves, maps, groups = _keys()

    def known(key: str, group_ok: bool) -> bool:
        if key in leaves or any(key.startswith(m + ".") for m in maps):
            return True
        return group_ok and key in groups  # `eval.lm_eval` names a section; as a --flag it sets nothing

    bad: list[str] = []
    for pattern, group_ok in ((FLAG, False), (ASSIGN, False), (TICKED, True)):
        for m in pattern.finditer(text):
            key = m.group(1).rstrip(".")
            if key in PLACEHOLDERS or known(key, group_ok) or key in bad:
                continue
            bad.append(key)
    return bad


def test_the_scanner_finds_an_unknown_key_and_accepts_real_ones():
    text = ("python pipelines/full.py --eval.probe_file p.jsonl --eval.prompts_file q.jsonl train.lr=1e-4 "
            "--train.deepspeed.zero_optimization.stage3_param_persistence_threshold 1e6 `eval.lm_eval` "
            "`train.zero_init: true` `train.zero_initt` --tune.space.q.beta x run.seedd=1 ---not.a_flag "
            "qcore/model.py --working-dir . [--section.key value]")
    assert unknown_keys(text) == ["eval.probe_file", "run.seedd", "train.zero_initt"]
    assert unknown_keys("--eval.lm_eval '{...}'") == ["eval.lm_eval"]  # a section, not a key one can set


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_only_existing_config_keys(path):
    bad = unknown_keys(path.read_text())
    assert not bad, f"{path.relative_to(ROOT)} names config keys that qcore/config.py does not have: {bad}"
