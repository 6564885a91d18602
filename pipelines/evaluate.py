"""Evaluate stage: the base model and every adapter (and every dial setting), judged on held-out data.

    python pipelines/evaluate.py --config configs/tiny.yaml --adapter qadapter=runs/x/train/qadapter/adapter \
        --adapter dpo=runs/x/train/dpo/adapter --data-dir runs/x/preprocess/<key> [--out-dir DIR] [--eval.X ...]

A *policy* is (method, adapter dir or None, alpha_0, alpha_tilde). The policies evaluated are:
- ``base``: the pre-trained model (no adapter; its logits are the policy), always;
- one per adapter in ``adapters``: a Q-Adapter at its trained alpha_0/alpha_tilde (its qadapter.json), any other
  objective (dpo | sft | replay) as the plain adapter-on policy softmax(Q) (alpha_0 = 0, alpha_tilde = 1);
- the dial: the Q-Adapter at each ``cfg.eval.dial`` setting ({alpha_0, alpha_tilde}), without retraining.

The new preference is measured by the judges named in ``cfg.eval.judges`` (each writes its own columns):
- ``pairs`` (any data, no generation): on the held-out pair split that preprocess wrote (``<data_dir>/eval``, the
  first ``eval.max_pairs`` pairs by (source, row, pair_index)), the length-normalized log-likelihood (mean
  per-token log-prob over the response tokens, EOS included) of chosen and of rejected under the policy's own
  distribution: pi_custom = softmax((Q + alpha_0 log pi_pre) / alpha_tilde). pair_accuracy: share of pairs with
  chosen above rejected (a tie, equal within qcore.metrics.PAIR_TIE_TOL of float rounding, 0.5); pair_margin: the
  mean difference.
- ``oracle``: the embedded default's conciseness oracle on each greedy answer: pref_score (mean), win_rate
  (paired against the base's answer to the same prompt, ties 0.5).
- ``reward_model``: a local sequence-classification reward model (``eval.reward_model``) scores each answer:
  rm_reward (mean), rm_win_rate (paired against the base's answer).
- ``llm_judge``: a local instruct model or an OpenAI-compatible endpoint compares each answer with the base's,
  in both orders (qcore.judges.LLMJudge): judge_win_rate.
Answers are generated (greedy, two-pass ``QAdapterModel.generate``) only when a generation judge is named; then
``kl_to_base`` is the mean per-token KL(pi_policy || pi_base) over all generated tokens (``eval.kl``), recorded
during decoding. Held-out prompts: ``eval.prompts_file`` when set, else the prompts of the run's own eval split
(never another run's files); none found = one line in ``notes``, the generation judges' columns stay empty.

Composition: with ``eval.compose.adapters`` (methods of this run, NAME=DIR or DIRs), those adapters are loaded on
one base and decoded from pi_w = softmax((z_base + sum_i w_i (Q_i - z_base) + alpha_0 log pi_pre) / alpha_tilde)
for each weight vector of ``eval.compose.grid`` (``compose_sweep``, one Ray task): per adapter, the pairs judge on
its held-out pairs (``eval.compose.pairs``; the run's split for a method of this run), and with the oracle judge
pref_score / win_rate of greedy answers to the held-out prompts; results.json "compose" {"names" (in order),
"rows": [{"weights", "pairs": {name: {pair_accuracy, pair_margin, ci}}, "pref_score", "win_rate", "ci"}], ...}.

Forgetting: with ``eval.lm_eval.tasks``, every policy runs through lm-evaluation-harness
(``pipelines.forgetting.lm_eval_policies``); per task its score, and retention = policy score / base score; the
mean retention over tasks is the capability axis of the report's Pareto plot. No tasks = one line in ``notes``.

Statistics: every per-policy number carries a percentile-bootstrap interval over its items (``eval.confidence``,
``eval.bootstrap_samples`` resamples, seeded by ``run.seed``) and its sample size n, under ``ci``; every
difference against the base is a paired bootstrap (the same item indices for both), under ``vs_base``, with
``within_noise`` when its interval contains 0 (win rates: against 0.5, the base's own win rate).

Work rows (one per held-out pair and per held-out prompt) flow through Ray Data ``map_batches`` with a callable
class on an actor pool (``eval.num_actors``, ``eval.batch_size`` rows per call). Each actor loads the base once
with every policy's adapter (PEFT named adapters) and evaluates every policy on each batch: a pair batch runs
each distinct pass once (adapter off: for the base policy and every alpha_0 != 0; each adapter: for every policy on
it, e.g. a Q-Adapter and its dial points), with the one-policy path's numbers bit for bit; the answers of all
policies to a prompt batch decode in one mixed-adapter decoder batch, rows leaving it at EOS
(``qcore.generation.generate_policies``; the same tokens up to float rounding of the larger batch).

Outputs in ``out_dir``: results.json ({"methods": {name: metrics}, "dial": [...], "notes": [...], ...}),
pair_scores.jsonl (per policy and pair), generations.jsonl (per policy and prompt, when answers were generated),
compose_generations.jsonl (per weight vector and prompt, eval.compose with the oracle).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from qcore.config import Config, EvalConfig  # noqa: E402

log = logging.getLogger("qadapter.evaluate")

OBJECTIVES = ("qadapter", "dpo", "sft", "replay")
JUDGES = EvalConfig.JUDGES
GENERATION_JUDGES = ("oracle", "reward_model", "llm_judge")
# Each judge's columns; the first is its preference measure (the y axis of the Pareto plot for the first judge).
JUDGE_COLUMNS = {"pairs": ("pair_accuracy", "pair_margin"), "oracle": ("win_rate", "pref_score"),
                 "reward_model": ("rm_win_rate", "rm_reward"), "llm_judge": ("judge_win_rate",)}
WIN_RATES = ("win_rate", "rm_win_rate", "judge_win_rate")  # paired against the base: the base itself is 0.5
PAIR_COLUMNS = ("chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask",
                "prompt_length", "prompt_json")


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[dict]:
    """JSON lines from a local path or a pyarrow URI; a bad line fails naming the file and the line."""
    from pipelines.common import read_text

    rows = []
    for n, line in enumerate(read_text(str(path)).splitlines(), 1):
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON: {err}") from None
    return rows


def resolve_prompts_file(explicit: str) -> str:
    """``eval.prompts_file``: a URI, an absolute path, or relative to the working directory, else to the repo."""
    from pipelines.common import exists

    if "://" in explicit:
        if exists(explicit):
            return explicit
    else:
        for p in (Path(explicit), Path(_ROOT) / explicit):
            if p.exists():
                return str(p.resolve())
    raise FileNotFoundError(f"config key 'eval.prompts_file' = {explicit!r}: file not found")


def load_prompts(path: str, max_prompts: int) -> list[Any]:
    prompts = []
    for n, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}:{n}: a held-out prompt row needs a 'prompt' key, got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        prompts.append(row["prompt"])
    return prompts[:max_prompts] if max_prompts and max_prompts > 0 else prompts


def read_eval_pairs(data_dir: Optional[str]) -> Optional[list[dict]]:
    """The held-out pair rows preprocess wrote (``<data_dir>/eval``, Parquet, local or URI), in a fixed order
    (source, row, pair_index); None when there is no such split. A missing column fails naming it."""
    import pyarrow.dataset as pads

    from pipelines.common import exists, resolve_fs

    if not data_dir:
        return None
    eval_dir = f"{str(data_dir).rstrip('/')}/eval"
    if not exists(eval_dir):
        return None
    fs, root = resolve_fs(eval_dir)
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table()
    missing = [c for c in PAIR_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{eval_dir}: the held-out pair split lacks the columns {missing} (rerun preprocess)")
    order = [c for c in ("source", "row", "pair_index") if c in table.column_names]
    if order and table.num_rows:
        table = table.sort_by([(c, "ascending") for c in order])
    return table.select(list(PAIR_COLUMNS)).to_pylist()


def split_prompts(pair_rows: list[dict], max_prompts: int) -> list[Any]:
    """The distinct prompts of the held-out pairs, in order (a record's several pairs share one prompt)."""
    seen, out = set(), []
    for r in pair_rows:
        if r["prompt_json"] not in seen:
            seen.add(r["prompt_json"])
            out.append(json.loads(r["prompt_json"]))
    return out[:max_prompts] if max_prompts and max_prompts > 0 else out


def _last_user(messages: list[dict]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def resolve_adapter_dir(path: str) -> str:
    """An adapter dir (adapter_config.json inside), or a dir holding exactly one such dir (e.g. ``adapter/``).

    A local path or a storage URI (s3://...), returned in the same form: whoever loads the adapter takes it
    through ``pipelines.common.local_copy`` on its own node (an evaluation actor may run on another node)."""
    import pyarrow.fs as pafs

    from pipelines import common

    path = str(path).rstrip("/")
    for cand in (path, common.join(path, "adapter"), common.join(path, "checkpoint/adapter")):
        if common.exists(common.join(cand, "adapter_config.json")):
            return cand
    fs, root = common.resolve_fs(path)
    found = []
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        found = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root)) if i.type == pafs.FileType.Directory
                 and fs.get_file_info(f"{i.path}/adapter_config.json").type == pafs.FileType.File]
    if len(found) == 1:
        return common.join(path, found[0])
    raise FileNotFoundError(f"adapter '{path}': no adapter_config.json in it (or in exactly one subfolder)")


def _local_qadapter_json_dir(adapter_dir: str) -> str:
    """A local directory holding the adapter's qadapter.json (for a URI only that file is downloaded)."""
    from pipelines import common
    from qcore.model import QADAPTER_FILE

    if not common.is_uri(adapter_dir):
        return adapter_dir
    return os.path.dirname(common.local_copy(common.join(adapter_dir, QADAPTER_FILE)))


def adapter_objective(adapter_dir: str) -> str:
    """The training objective recorded in the adapter's qadapter.json (never guessed from a name)."""
    from qcore.model import read_objective

    return read_objective(_local_qadapter_json_dir(adapter_dir))


def saved_q_config(adapter_dir: str):
    """The QConfig saved with an adapter (qadapter.json), whatever shape ``read_qadapter_json`` returns."""
    from qcore.model import read_qadapter_json

    got = read_qadapter_json(_local_qadapter_json_dir(adapter_dir))
    return got[0] if isinstance(got, tuple) else got


def build_policies(cfg: Config, adapters: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """-> (unique policies to run, the table entries: {"name", "kind": method|dial, "method", "policy_id"}).

    Policies are deduplicated by (adapter, alpha_0, alpha_tilde): a dial setting equal to the trained one is
    evaluated once and reported in both tables."""
    policies: dict[tuple, dict] = {}
    entries: list[dict] = []

    def add(name: str, kind: str, method: str, adapter: Optional[str], a0: float, at: float, objective: str):
        key = (adapter, round(float(a0), 12), round(float(at), 12))
        if key not in policies:
            policies[key] = {"policy_id": f"p{len(policies)}", "method": method, "adapter": adapter,
                             "alpha_0": float(a0), "alpha_tilde": float(at), "objective": objective}
        entries.append({"name": name, "kind": kind, "method": method, "policy_id": policies[key]["policy_id"],
                        "alpha_0": float(a0), "alpha_tilde": float(at), "objective": objective,
                        "adapter": adapter})

    add("base", "method", "base", None, 0.0, 1.0, "base")
    resolved = {}
    for name, path in adapters.items():
        if name == "base":
            raise ValueError("'base' is implicit: do not pass an adapter named 'base'")
        adir = resolve_adapter_dir(path)
        obj = adapter_objective(adir)
        resolved[name] = (adir, obj)
        if obj == "qadapter":
            qc = saved_q_config(adir)
            add(name, "method", name, adir, qc.alpha_0, qc.alpha_tilde, obj)
        else:
            add(name, "method", name, adir, 0.0, 1.0, obj)
    if cfg.eval.dial:
        dial_method = next((n for n, (_, o) in resolved.items() if n == "qadapter"), None) or next(
            (n for n, (_, o) in resolved.items() if o == "qadapter"), None)
        if dial_method is None:
            log.warning("eval.dial is set but no Q-Adapter adapter was given: the dial is skipped")
        else:
            adir, obj = resolved[dial_method]
            for i, setting in enumerate(cfg.eval.dial):
                unknown = set(setting) - {"alpha_0", "alpha_tilde"}
                if unknown:
                    raise ValueError(f"config key 'eval.dial[{i}]': unknown keys {sorted(unknown)}")
                qc = saved_q_config(adir)
                a0 = float(setting.get("alpha_0", qc.alpha_0))
                at = float(setting.get("alpha_tilde", qc.alpha_tilde))
                if at <= 0 or a0 < 0:
                    raise ValueError(f"config key 'eval.dial[{i}]': need alpha_0 >= 0 and alpha_tilde > 0")
                add(f"{dial_method}@a0={a0:g},at={at:g}", "dial", dial_method, adir, a0, at, obj)
    return list(policies.values()), entries


# ----------------------------------------------------------------------------------------------------------------
# The Ray Data actor
# ----------------------------------------------------------------------------------------------------------------
def response_lengths(new_ids, eos_ids: list[int]):
    """[B, N] generated ids -> [B] number of generated tokens up to and including the first EOS."""
    import torch

    n = new_ids.shape[1]
    if not eos_ids or n == 0:
        return torch.full((new_ids.shape[0],), n, dtype=torch.long)
    is_eos = torch.isin(new_ids, torch.tensor(eos_ids, dtype=torch.long))
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], n, dtype=torch.long))
    return torch.clamp(first + 1, max=n)


def _custom_logp(q, base, ids, alpha_0: float, alpha_tilde: float, chunk_size: int):
    """[B, L] log pi_policy of each next token from the Q logits (and the base logits where alpha_0 != 0)."""
    from qcore.losses import token_logprobs, token_stats

    if alpha_0 != 0:
        return token_stats(q, base, ids, alpha_0, alpha_tilde, chunk_size).logp_custom
    return token_logprobs(q if alpha_tilde == 1 else q.float() / alpha_tilde, ids, chunk_size)


def policy_logprobs(model, batch: dict, alpha_0: float, alpha_tilde: float, chunk_size: int = 128):
    """Per row of a collated batch, (sum, count) of log pi_policy(a_t | s_t) over its response tokens, for the
    model's active adapter. pi_policy = softmax((Q + alpha_0 log pi_pre) / alpha_tilde) (qcore.losses.token_stats'
    logp_custom); with alpha_0 = 0 it is softmax(Q / alpha_tilde) and the adapter-off pass is skipped."""
    return policies_logprobs(model, batch, [(model.peft_model.active_adapter, alpha_0, alpha_tilde)], chunk_size)[0]


def _fused_policy_logp(h, base_h, head, labels, alpha_0: float, alpha_tilde: float, chunk: int):
    """[M] log pi_policy at packed positions from final hidden states (qcore.ops' fused kernels)."""
    from qcore.ops import fused_token_logprobs, fused_token_stats

    if alpha_0 == 0 and alpha_tilde == 1:
        return fused_token_logprobs(h, head.weight, labels, head.bias, chunk)
    return fused_token_stats(h, base_h if base_h is not None else h, head.weight, labels, alpha_0, alpha_tilde,
                             head.bias, chunk).logp_custom


def policies_logprobs(model, batch: dict, policies: list[tuple], chunk_size: int = 128) -> list[tuple]:
    """``policy_logprobs`` for several policies of one base at once: policies [(adapter name | None, alpha_0,
    alpha_tilde)], None = the base model itself. Each distinct pass runs once over the batch: the adapter-off pass
    serves the base policy and every policy with alpha_0 != 0, an adapter's pass every policy on it (a Q-Adapter
    and its dial points).

    As the training step does (qcore.fused): each pair's prompt runs once for its chosen and rejected rows, and the
    LM head and the softmaxes run only at the response positions (on the default's pairs ~0.4x the rows of full
    logits); a model whose logits are not a plain linear head gets full logits."""
    import torch

    from qcore.fused import hidden_at, plain_lm_head
    from qcore.losses import fused_chunk_rows, loss_mask, scored_positions

    ids = batch["input_ids"].to(model.device)
    att = batch["attention_mask"].to(model.device)
    n = ids.shape[0]
    hf_model = model.peft_model.get_base_model()
    head = plain_lm_head(hf_model)
    out: list = [None] * len(policies)
    if head is not None:
        pos = scored_positions("dpo", ids, batch["response_mask"].to(ids.device), "standard")  # every row
        counts = torch.bincount(pos.rows, minlength=n).float()
        chunk = fused_chunk_rows(chunk_size)

        def pass_hidden():
            with model.training_attention():  # the attention the logits path's passes use
                return hidden_at(hf_model, ids, att, pos)[0]

        def put(j, h, base_h, a0, at):
            logp = _fused_policy_logp(h, base_h, head, pos.labels, a0, at, chunk).float()
            out[j] = (torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add_(0, pos.rows, logp), counts)
    else:
        mask = loss_mask(batch["response_mask"], "standard").to(ids.device).float()

        def put(j, logits, base, a0, at):
            out[j] = ((_custom_logp(logits, base, ids, a0, at, chunk_size).float() * mask).sum(1), mask.sum(1))

    with torch.no_grad():
        base = None
        if any(a is None or a0 != 0 for a, a0, _ in policies):
            if head is None:
                base = model.base_logits(ids, att)
            else:
                with model.adapter_disabled(), model.eval_mode():
                    base = pass_hidden()
        for j, (a, _, at) in enumerate(policies):
            if a is None:
                put(j, base, None, 0.0, at)
        active = model.peft_model.active_adapter
        try:
            for name in dict.fromkeys(a for a, _, _ in policies if a is not None):
                model.peft_model.set_adapter(name)
                if head is None:
                    q, _ = model.q_and_base_logits(ids, att, need_base=False)  # the one-policy path's Q pass
                else:
                    with model.lora_in_compute_dtype():
                        q = pass_hidden()
                for j, (a, a0, at) in enumerate(policies):
                    if a == name:
                        put(j, q, base, a0, at)
                del q
        finally:
            model.peft_model.set_adapter(active)
    return out


class PolicyEvaluator:
    """Ray Data callable class. With ``policies`` (the evaluate stage): rows are held-out items, and every batch is
    scored / answered by every policy at once, all adapters loaded on one base (``_load_all``; pairs: each
    distinct pass once, ``policies_logprobs``; answers: one mixed-adapter decoder batch, ``generate_all``).
    Without (replay, tests): one policy at a time, ``_load`` reloading only when the adapter changes."""

    def __init__(self, base_path: str, dtype: str = "float32", max_new_tokens: int = 64, chunk_size: int = 128,
                 trust_remote_code: bool = False, use_gpu: bool = False, num_threads: int = 0,
                 kl_mode: str = "generation", want_kl: bool = True, policies: Optional[list[dict]] = None):
        import torch
        from transformers import AutoTokenizer

        from qcore.base_models import resolve_model_path

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.base_path = resolve_model_path(base_path)
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        if kl_mode not in ("generation", "forward"):
            raise ValueError(f"kl_mode must be 'generation' or 'forward', got {kl_mode!r}")
        self.kl_mode = kl_mode
        self.want_kl = want_kl
        self.chunk_size = chunk_size
        self.trust_remote_code = trust_remote_code
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self.model = None
        self.loaded: object = ()  # the adapter currently loaded (None = no adapter)
        self.loads = 0
        self.policies = policies
        self.bank = None  # the model holding every policy's adapter (policies given), loaded on first use

    def _eos_ids(self) -> list[int]:
        from transformers import AutoConfig, GenerationConfig

        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        try:
            gen = GenerationConfig.from_pretrained(self.base_path)
            e = gen.eos_token_id
        except Exception:  # noqa: BLE001 - no generation_config.json
            e = AutoConfig.from_pretrained(self.base_path, trust_remote_code=self.trust_remote_code).eos_token_id
        if e is not None:
            ids.update([e] if isinstance(e, int) else e)
        return sorted(ids)

    def _load(self, adapter: Optional[str]):
        if self.loaded == adapter and self.model is not None:
            return
        from pipelines.common import is_uri, local_copy
        from qcore.model import QAdapterModel

        self.model = None
        local = local_copy(adapter) if adapter and is_uri(adapter) else adapter  # downloaded on this node, once
        self.model = QAdapterModel.from_pretrained(
            self.base_path, adapter_path=local, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
            is_trainable=False).to(self.device).eval()
        self.loaded = adapter
        self.loads += 1

    def _load_all(self):
        """The base with every distinct adapter of ``self.policies`` (PEFT named adapters "a0", "a1", ...); ->
        [(adapter name | None, alpha_0, alpha_tilde)] per policy, in order."""
        if self.bank is None:
            from pipelines.common import is_uri, local_copy
            from qcore.compose import load_adapters
            from qcore.model import QAdapterModel

            dirs = list(dict.fromkeys(p["adapter"] for p in self.policies if p["adapter"]))
            self.names = {d: f"a{i}" for i, d in enumerate(dirs)}
            if dirs:
                local = {self.names[d]: local_copy(d) if is_uri(d) else d for d in dirs}
                bank = load_adapters(self.base_path, local, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
            else:  # the base policy alone: its rows run adapter off
                bank = QAdapterModel.from_pretrained(self.base_path, dtype=self.dtype, is_trainable=False,
                                                     trust_remote_code=self.trust_remote_code)
            self.bank = bank.to(self.device).eval()
            self.loads += 1
        return [(self.names[p["adapter"]] if p["adapter"] else None, float(p["alpha_0"]), float(p["alpha_tilde"]))
                for p in self.policies]

    def pair_scores_all(self, rows) -> list[tuple]:
        """``pair_scores`` for every policy of ``self.policies`` (each distinct pass once): one tuple per policy."""
        from qcore.data import collate_pairs

        specs = self._load_all()
        batch = collate_pairs(rows, self.tokenizer.pad_token_id)
        out = []
        for sums, counts in policies_logprobs(self.bank, batch, specs, self.chunk_size):
            b = sums.shape[0] // 2
            means = (sums / counts.clamp_min(1)).tolist()
            counts = [int(c) for c in counts.tolist()]
            out.append((means[:b], means[b:], counts[:b], counts[b:]))
        return out

    def generate_all(self, prompts: list[Any]) -> list[tuple]:
        """``generate_and_kl`` for every policy of ``self.policies``, in ONE mixed-adapter decoder batch
        (qcore.generation.generate_policies; finished rows leave it): one (texts, kl sums, #tokens) per policy.
        The KL is recorded while decoding (kl_mode "generation"); the base policy's is 0 by construction."""
        from qcore.generation import generate_policies

        specs = self._load_all()
        ids, mask = self._encode_left(prompts)
        kl = [self.want_kl and a is not None for a, _, _ in specs]
        new, kl_sums = generate_policies(self.bank, ids, mask, specs, self.max_new_tokens, eos_token_id=self.eos_ids,
                                         pad_token_id=self.tokenizer.pad_token_id, kl=kl)
        out = []
        for j in range(len(specs)):
            rows = new[j].cpu()
            lengths = response_lengths(rows, self.eos_ids)
            texts = [self.tokenizer.decode(rows[i, : lengths[i]].tolist(), skip_special_tokens=True).strip()
                     for i in range(len(prompts))]
            out.append((texts, [float(x) for x in kl_sums[j].tolist()] if kl[j] else [0.0] * len(prompts),
                        [int(x) for x in lengths.tolist()]))
        return out

    def _encode_left(self, prompts: list[Any]):
        import torch

        from qcore.data import encode_prompt

        seqs = [encode_prompt(p, self.tokenizer) for p in prompts]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[i, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def pair_scores(self, rows, alpha_0: float, alpha_tilde: float):
        """Held-out pair rows -> per pair (mean log-prob of chosen, of rejected, #chosen, #rejected tokens)."""
        from qcore.data import collate_pairs

        batch = collate_pairs(rows, self.tokenizer.pad_token_id)
        sums, counts = policy_logprobs(self.model, batch, alpha_0, alpha_tilde, self.chunk_size)
        b = sums.shape[0] // 2
        means = (sums / counts.clamp_min(1)).tolist()
        counts = [int(c) for c in counts.tolist()]
        return means[:b], means[b:], counts[:b], counts[b:]

    def generate_and_kl(self, prompts: list[Any], alpha_0: float, alpha_tilde: float, want_kl: bool,
                        max_new_tokens: Optional[int] = None, kl_mode: Optional[str] = None):
        """Greedy answers from the policy, and per row (sum of per-token KL(policy || base), #tokens).

        kl_mode "generation" (default): the KL at each decoding step, from the very Q and base logits that
        ``generate`` computes (recorded through ``customized_logits``, which generate calls once per step) - no
        extra forward. "forward": one more two-pass forward over prompt + answer (falls back to it whenever the
        recording does not have one entry per generated token). Both give the KL over the same states."""
        import torch

        from qcore.metrics import kl_sum_and_count, token_kl

        kl_mode = kl_mode or self.kl_mode
        if self.loaded is None and alpha_0 == 0 and alpha_tilde == 1:  # the base policy itself: KL 0 exactly
            want_kl = False
        # alpha_0 == 0: the policy reads no base logits, so the adapter-off pass runs only when the KL needs it
        need_base = alpha_0 != 0 or want_kl
        ids, mask = self._encode_left(prompts)
        p = ids.shape[1]
        steps: list = []
        record = want_kl and kl_mode == "generation"
        if record:
            original = self.model.customized_logits

            def recording(q_logits, base_logits, alpha_0=None, alpha_tilde=None):
                custom = original(q_logits, base_logits, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
                if custom.dim() == 2:  # one decoding step: [B, V]
                    steps.append(token_kl(custom, base_logits.float()).cpu())
                return custom

            self.model.customized_logits = recording  # an instance attribute shadows the method
        try:
            with torch.no_grad():
                out = self.model.generate(ids, mask, max_new_tokens=max_new_tokens or self.max_new_tokens,
                                          do_sample=False, alpha_0=alpha_0, alpha_tilde=alpha_tilde,
                                          eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                                          need_base=need_base)
        finally:
            if record:
                del self.model.customized_logits
        new = out[:, p:].cpu()
        lengths = response_lengths(new, self.eos_ids)
        texts = [self.tokenizer.decode(new[i, : lengths[i]].tolist(), skip_special_tokens=True).strip()
                 for i in range(len(prompts))]
        kl_sums = [0.0] * len(prompts)
        counts = [int(x) for x in lengths.tolist()]
        n = int(lengths.max()) if len(prompts) else 0
        if not want_kl or n == 0:
            return texts, kl_sums, counts
        resp_valid = (torch.arange(n)[None, :] < lengths[:, None]).long()
        if record and len(steps) == new.shape[1]:
            per_token = torch.stack(steps, dim=1)[:, :n]
            sums, cnt = (per_token * resp_valid).sum(1), resp_valid.sum(1)
        else:
            if record:
                log.warning("KL recording saw %d steps for %d tokens: using a scoring forward", len(steps),
                            new.shape[1])
            # States before each generated token: positions p-1 .. p+n-2 of prompt + response.
            seq = out[:, : p + n - 1]
            resp_valid = resp_valid.to(self.device)
            att = torch.cat([mask, resp_valid[:, : n - 1]], dim=1)
            with torch.no_grad():
                q, base = self.model.q_and_base_logits(seq, att, need_base=True)
                q, base = q[:, p - 1:], base[:, p - 1:]
                custom = self.model.customized_logits(q, base, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
                sums, cnt = kl_sum_and_count(custom, base, resp_valid, chunk_size=self.chunk_size)
        kl_sums = [float(x) for x in sums.cpu().tolist()]
        counts = [int(x) for x in cnt.cpu().tolist()]
        return texts, kl_sums, counts

    def __call__(self, batch):
        import pandas as pd

        df = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame(batch)
        if self.policies is not None:
            return self._call_all(df)
        out_rows = []
        # Rows are ordered by policy and kind, so a batch usually holds one group.
        for (_pid, kind), group in df.groupby(["policy_id", "kind"], sort=False):
            first = group.iloc[0]
            adapter = first["adapter"] if isinstance(first["adapter"], str) and first["adapter"] else None
            self._load(adapter)
            a0, at = float(first["alpha_0"]), float(first["alpha_tilde"])
            t0 = time.perf_counter()
            nan = float("nan")
            if kind == "pairs":
                lc, lr, nc, nr = self.pair_scores(group, a0, at)
                texts, kls, counts = [""] * len(group), [nan] * len(group), [0] * len(group)
            else:
                prompts = [json.loads(x) for x in group["prompt_json"]]
                texts, kls, counts = self.generate_and_kl(prompts, a0, at, want_kl=self.want_kl)
                lc, lr, nc, nr = [nan] * len(group), [nan] * len(group), [0] * len(group), [0] * len(group)
            dt = (time.perf_counter() - t0) / max(1, len(group))
            for i, (_, row) in enumerate(group.iterrows()):
                out_rows.append({"policy_id": row["policy_id"], "kind": kind, "idx": int(row["idx"]),
                                 "response": texts[i], "n_tokens": int(counts[i]), "kl_sum": float(kls[i]),
                                 "logp_chosen": float(lc[i]), "logp_rejected": float(lr[i]),
                                 "tokens_chosen": int(nc[i]), "tokens_rejected": int(nr[i]), "seconds": dt})
        return pd.DataFrame(out_rows)


    def _call_all(self, df):
        """Item rows (kind, idx, ...) -> one output row per policy and item (the columns of the per-policy path)."""
        import pandas as pd

        out_rows, nan = [], float("nan")
        for kind, group in df.groupby("kind", sort=False):
            t0 = time.perf_counter()
            n = len(group)
            if kind == "pairs":
                per = [(([""] * n, [nan] * n, [0] * n), s) for s in self.pair_scores_all(group)]
            else:
                per = [(g, ([nan] * n, [nan] * n, [0] * n, [0] * n))
                       for g in self.generate_all([json.loads(x) for x in group["prompt_json"]])]
            dt = (time.perf_counter() - t0) / max(1, n * len(self.policies))
            for pol, ((texts, kls, counts), (lc, lr, nc, nr)) in zip(self.policies, per):
                for i, idx in enumerate(group["idx"]):
                    out_rows.append({"policy_id": pol["policy_id"], "kind": kind, "idx": int(idx),
                                     "response": texts[i], "n_tokens": int(counts[i]), "kl_sum": float(kls[i]),
                                     "logp_chosen": float(lc[i]), "logp_rejected": float(lr[i]),
                                     "tokens_chosen": int(nc[i]), "tokens_rejected": int(nr[i]), "seconds": dt})
        return pd.DataFrame(out_rows)


# ----------------------------------------------------------------------------------------------------------------
# Judges of generated answers (one Ray task each: the judge model loads once)
# ----------------------------------------------------------------------------------------------------------------
def _reward_scores(model_dir: str, prompts: list[Any], responses: list[str], device: str, batch_size: int,
                   trust_remote_code: bool) -> list[float]:
    from qcore.judges import RewardModelJudge

    judge = RewardModelJudge(model_dir, device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
    return [float(x) for x in judge.score(prompts, responses)]


def _llm_compare(criterion: str, model_dir: Optional[str], url: Optional[str], api_model: Optional[str],
                 api_key_env: str, device: str, prompts: list[Any], answers: dict[str, list[str]],
                 base_answers: list[str]) -> dict[str, tuple[list[float], float]]:
    """Per policy id: (P(its answer beats the base's) per prompt, both orders judged; the judge's consistency)."""
    from qcore.judges import LLMJudge

    judge = LLMJudge(criterion, model_dir=model_dir, url=url, api_model=api_model,
                     api_key=os.environ.get(api_key_env) if api_key_env else None, device=device)
    out = {}
    for pid, theirs in answers.items():
        got = [float(x) for x in judge.compare(prompts, theirs, base_answers)]
        out[pid] = (got, float(judge.consistency_rate()))
    return out


def _remote(fn, use_gpu: bool):
    import ray

    return ray.remote(fn).options(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=0)


# ----------------------------------------------------------------------------------------------------------------
# eval.compose: a weight sweep over several adapters composed on one base (qcore.compose)
# ----------------------------------------------------------------------------------------------------------------
def compose_adapters(cfg: Config, adapters: dict[str, str]) -> dict[str, str]:
    """eval.compose.adapters -> {name: adapter dir}: a method of this run is its trained adapter."""
    out = {}
    for i, (name, method, path) in enumerate(cfg.eval.compose.entries()):
        if method is not None and method not in adapters:
            raise ValueError(f"config key 'eval.compose.adapters[{i}]' = {method!r}: not a method of this run "
                             f"(its adapters: {sorted(adapters)}); give another run's adapter as NAME=DIR")
        out[name] = resolve_adapter_dir(adapters[method] if method is not None else path)
    return out


def load_pair_source(source: str, tokenizer, cfg: Config) -> list[dict]:
    """Held-out pairs for one composed adapter: a preprocess output dir (its eval/ split) or a JSONL file of pair
    records in any format preprocess reads (tokenized here, with data.* lengths). The first eval.max_pairs."""
    from qcore.data import InvalidRecord, preprocess_record

    if str(source).endswith((".jsonl", ".json")):
        rows = []
        for n, rec in enumerate(read_jsonl(source), 1):
            try:
                rows += preprocess_record(rec, tokenizer, cfg.data)
            except InvalidRecord as err:
                raise ValueError(f"{source}:{n}: not a usable pair: {err}") from None
    else:
        rows = read_eval_pairs(source)
        if rows is None:
            raise FileNotFoundError(f"eval.compose pairs {source!r}: no eval/ split in it (a preprocess output dir) "
                                    f"and not a .jsonl file")
    return rows[: cfg.eval.max_pairs] if cfg.eval.max_pairs > 0 else rows


def _compose_task(base_path: str, dtype: str, trust_remote_code: bool, device: str, num_threads: int,
                  dirs: dict[str, str], pair_sets: dict[str, list[dict]], prompts: list[Any],
                  grid: list[list[float]], alpha_0: float, alpha_tilde: float, max_new_tokens: int, batch_size: int,
                  chunk_size: int) -> list[dict]:
    """Per weight vector: {"pairs": {name: (chosen, rejected) mean log-probs}, "answers": greedy answers}."""
    import torch
    from transformers import AutoTokenizer

    from pipelines.common import is_uri, local_copy
    from qcore.base_models import resolve_model_path
    from qcore.compose import composed_pair_scores, load_adapters, weight_sweep

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    base = resolve_model_path(base_path)
    tok = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = load_adapters(base, {n: local_copy(d) if is_uri(d) else d for n, d in dirs.items()}, dtype=dtype,
                          trust_remote_code=trust_remote_code, device=device)
    names = list(dirs)
    swept = weight_sweep(model, tok, prompts, names, grid, {}, alpha_0=alpha_0, alpha_tilde=alpha_tilde,
                         max_new_tokens=max_new_tokens, batch_size=batch_size) if prompts else [{}] * len(grid)
    pairs = {n: composed_pair_scores(model, rows, names, grid, alpha_0, alpha_tilde, tok.pad_token_id, batch_size,
                                     chunk_size) for n, rows in pair_sets.items()}
    return [{"pairs": {n: scores[i] for n, scores in pairs.items()}, "answers": s.get("answers", [])}
            for i, s in enumerate(swept)]


def compose_sweep(cfg: Config, adapters: dict[str, str], data_dir: Optional[str], prompts: list[Any],
                  base_oracle: Optional[list[float]], notes: list[str], num_threads: int) -> tuple[dict, list[str]]:
    """eval.compose -> (results["compose"], compose_generations.jsonl lines). Every grid row is scored with the
    pairs judge on each adapter's held-out pairs (eval.compose.pairs.NAME; a method of this run: the run's split)
    and, when eval.judges has oracle, with the oracle on greedy answers to the held-out prompts (win_rate against
    the base policy's answers); each number with its bootstrap interval."""
    import ray
    from transformers import AutoTokenizer

    from qcore import metrics, oracle
    from qcore.base_models import resolve_model_path

    t0 = time.perf_counter()
    c = cfg.eval.compose
    dirs = compose_adapters(cfg, adapters)
    dials = {n: (0.0, 1.0) for n in dirs}  # the policy a non-Q-Adapter objective stands for: softmax(Q)
    for n, d in dirs.items():
        if adapter_objective(d) == "qadapter":
            q = saved_q_config(d)
            dials[n] = (q.alpha_0, q.alpha_tilde)
    first = next(iter(dials.values()))
    a0 = float(first[0] if c.alpha_0 is None else c.alpha_0)
    at = float(first[1] if c.alpha_tilde is None else c.alpha_tilde)
    if len(set(dials.values())) > 1:
        notes.append(f"eval.compose: the adapters were trained at different (alpha_0, alpha_tilde) {dials}; the rule "
                     f"assumes one pair of constants (docs/method.md, 'Composing preferences')")
    sources: dict[str, str] = {}
    pair_sets: dict[str, list[dict]] = {}
    if "pairs" in cfg.eval.judges:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path),
                                            trust_remote_code=cfg.model.trust_remote_code)
        for name, method, _ in c.entries():
            src = c.pairs.get(name) or (data_dir if method is not None else None)
            if not src:
                notes.append(f"eval.compose: no held-out pairs for adapter '{name}' (eval.compose.pairs.{name}): "
                             f"no pair columns for it")
                continue
            sources[name] = src
            pair_sets[name] = load_pair_source(src, tok, cfg)
    grid = c.weight_grid()
    use_gpu = bool(cfg.train.use_gpu)
    raw = ray.get(_remote(_compose_task, use_gpu).remote(
        cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code, "cuda" if use_gpu else "cpu",
        0 if use_gpu else num_threads, dirs, pair_sets, prompts if base_oracle is not None else [], grid, a0, at,
        cfg.eval.max_new_tokens, max(1, cfg.eval.batch_size), cfg.q.chunk_size))
    stats = _Stats(cfg)
    rows, lines = [], []
    for w, rec in zip(grid, raw):
        row: dict[str, Any] = {"weights": dict(zip(dirs, w)), "pairs": {}}
        for name, (lc, lr) in rec["pairs"].items():
            m: dict[str, Any] = {"n_pairs": len(lc)}
            stats.mean(m, "pair_accuracy", metrics.pair_outcomes(lc, lr), None)
            stats.mean(m, "pair_margin", [a - b for a, b in zip(lc, lr)], None)
            row["pairs"][name] = m
        if rec["answers"]:
            s = [float(oracle.score(p if isinstance(p, str) else _last_user(p), a))
                 for p, a in zip(prompts, rec["answers"])]
            row["n_prompts"] = len(s)
            stats.mean(row, "pref_score", s, None)
            stats.win(row, "win_rate", metrics.win_outcomes(s, base_oracle))
            lines += [json.dumps({"weights": row["weights"], "idx": i, "prompt": p, "response": a,
                                  "score_oracle": x}) for i, (p, a, x) in enumerate(zip(prompts, rec["answers"], s))]
        rows.append(row)
    return {"names": list(dirs), "adapters": dirs, "alpha_0": a0, "alpha_tilde": at, "pairs_sources": sources,
            "rows": rows, "seconds": time.perf_counter() - t0}, lines


# ----------------------------------------------------------------------------------------------------------------
# Statistics per policy
# ----------------------------------------------------------------------------------------------------------------
class _Stats:
    """Writes a policy's numbers with their intervals: m[key] (the value), m["ci"][key] = {low, high, n} and, for a
    policy that is not the base, m["vs_base"][key] = {diff, low, high, n, within_noise} (paired bootstrap)."""

    def __init__(self, cfg: Config):
        self.kw = {"n_resamples": cfg.eval.bootstrap_samples, "confidence": cfg.eval.confidence,
                   "seed": cfg.run.seed}

    def put(self, m: dict, key: str, interval: dict, vs_base: Optional[dict] = None) -> None:
        m[key] = interval["value"]
        m.setdefault("ci", {})[key] = {k: interval[k] for k in ("low", "high", "n")}
        if vs_base is not None:
            m.setdefault("vs_base", {})[key] = {"diff": vs_base["value"], "low": vs_base["low"],
                                                "high": vs_base["high"], "n": vs_base["n"],
                                                "within_noise": vs_base["within_noise"]}

    def mean(self, m: dict, key: str, values: list[float], base_values: Optional[list[float]]) -> None:
        from qcore import metrics

        diff = metrics.difference_interval(values, base_values, **self.kw) if base_values is not None else None
        self.put(m, key, metrics.mean_interval(values, **self.kw), diff)

    def win(self, m: dict, key: str, outcomes: Optional[list[float]]) -> None:
        """A win rate against the base from per-item outcomes in [0, 1]; None = the base itself (0.5 exactly)."""
        from qcore import metrics

        if outcomes is None:
            return self.put(m, key, {"value": 0.5, "low": 0.5, "high": 0.5, "n": m.get("n_prompts", 0)})
        iv = metrics.mean_interval(outcomes, **self.kw)
        shifted = {"value": iv["value"] - 0.5, "low": iv["low"] - 0.5, "high": iv["high"] - 0.5, "n": iv["n"]}
        shifted["within_noise"] = bool(shifted["low"] <= 0 <= shifted["high"]) if math.isfinite(iv["low"]) else None
        self.put(m, key, iv, shifted)

    def ratio(self, m: dict, key: str, num: list[float], den: list[float]) -> None:
        """sum(num) / sum(den) over items (a per-token mean over prompts), bootstrapped over the items."""
        from qcore import metrics

        self.put(m, key, metrics.bootstrap(num, den, statistic=lambda a, b: a.sum(-1) / b.sum(-1), **self.kw))


def _lm_items(res: dict) -> Optional[list[float]]:
    """A task's per-item scores, when they are what its value is the mean of (else None: no interval)."""
    items = res.get("items")
    if not items:
        return None
    items = [float(x) for x in items]
    value = res.get("value")
    if value is not None and abs(sum(items) / len(items) - float(value)) > 1e-6:
        return None
    return items


def lm_eval_metrics(stats: _Stats, m: dict, tasks: dict, base_tasks: dict, is_base: bool, notes: list[str],
                    name: str) -> None:
    """m["lm_eval"][task] = {metric, value, low, high, n, retention {value, low, high, n}, vs_base}; m["retention"]
    = the mean retention over the tasks whose base score is not 0 (stratified, paired bootstrap)."""
    from qcore import metrics

    out, ret_items, ret_base = {}, [], []
    for task, res in tasks.items():
        items, base_res = _lm_items(res), base_tasks.get(task, {})
        base_items = _lm_items(base_res)
        entry: dict[str, Any] = {"metric": res.get("metric"), "value": res.get("value"), "n": res.get("n")}
        if items is not None:
            iv = metrics.mean_interval(items, **stats.kw)
            entry.update(low=iv["low"], high=iv["high"], n=iv["n"])
        paired = items is not None and base_items is not None and len(items) == len(base_items)
        if paired and not is_base:
            d = metrics.difference_interval(items, base_items, **stats.kw)
            entry["vs_base"] = {"diff": d["value"], "low": d["low"], "high": d["high"], "n": d["n"],
                                "within_noise": d["within_noise"]}
        base_value = base_res.get("value")
        if paired and sum(base_items) != 0:
            entry["retention"] = metrics.retention_interval([items], [base_items], **stats.kw)
            ret_items.append(items)
            ret_base.append(base_items)
        elif base_value:
            entry["retention"] = {"value": float(res.get("value") or 0.0) / float(base_value), "low": float("nan"),
                                  "high": float("nan"), "n": res.get("n")}
            notes.append(f"lm-eval {task} ({name}): no paired per-item scores, so its retention has no interval")
        else:
            notes.append(f"lm-eval {task}: the base scores 0, so retention is undefined and the task is left out")
        out[task] = entry
    m["lm_eval"] = out
    if ret_items:
        iv = metrics.retention_interval(ret_items, ret_base, **stats.kw)
        shifted = None  # against the base's own retention, 1 exactly
        if not is_base:
            shifted = {"value": iv["value"] - 1, "low": iv["low"] - 1, "high": iv["high"] - 1, "n": iv["n"],
                       "within_noise": bool(iv["low"] <= 1 <= iv["high"]) if math.isfinite(iv["low"]) else None}
        stats.put(m, "retention", iv, shifted)


def policy_metrics(cfg: Config, policies: list[dict], pair_rows: dict, gen_rows: dict, scores: dict,
                   lm: dict, notes: list[str]) -> dict[str, dict]:
    """Per policy id: every judge's columns, kl_to_base, lm-eval scores and retention, each with its interval."""
    from qcore import metrics

    stats = _Stats(cfg)
    judges = cfg.eval.judges
    out: dict[str, dict] = {}
    base_pairs = pair_rows.get("p0", [])
    base_gen = gen_rows.get("p0", [])
    for p in policies:
        pid = p["policy_id"]
        is_base = pid == "p0"
        m: dict[str, Any] = {"ci": {}, "vs_base": {}}
        pairs = pair_rows.get(pid, [])
        if "pairs" in judges and pairs:
            m["n_pairs"] = len(pairs)
            acc = metrics.pair_outcomes([r["logp_chosen"] for r in pairs], [r["logp_rejected"] for r in pairs])
            margin = [r["logp_chosen"] - r["logp_rejected"] for r in pairs]
            base_acc = None if is_base else metrics.pair_outcomes([r["logp_chosen"] for r in base_pairs],
                                                                  [r["logp_rejected"] for r in base_pairs])
            base_margin = None if is_base else [r["logp_chosen"] - r["logp_rejected"] for r in base_pairs]
            stats.mean(m, "pair_accuracy", acc, base_acc)
            stats.mean(m, "pair_margin", margin, base_margin)
        gen = gen_rows.get(pid, [])
        if gen:
            m["n_prompts"] = len(gen)
            if "oracle" in scores:
                s, b = scores["oracle"][pid], scores["oracle"]["p0"]
                stats.mean(m, "pref_score", s, None if is_base else b)
                stats.win(m, "win_rate", None if is_base else metrics.win_outcomes(s, b))
            if "reward_model" in scores:
                s, b = scores["reward_model"][pid], scores["reward_model"]["p0"]
                stats.mean(m, "rm_reward", s, None if is_base else b)
                stats.win(m, "rm_win_rate", None if is_base else metrics.win_outcomes(s, b))
            if "llm_judge" in scores:
                stats.win(m, "judge_win_rate", None if is_base else scores["llm_judge"][pid])
            lengths = [float(r["n_tokens"]) for r in gen]
            stats.mean(m, "mean_response_tokens", lengths, None if is_base else [float(r["n_tokens"])
                                                                               for r in base_gen])
            if cfg.eval.kl:
                if is_base:  # KL of a policy to itself: 0 by construction (not measured)
                    stats.put(m, "kl_to_base", {"value": 0.0, "low": 0.0, "high": 0.0, "n": len(gen)})
                else:
                    stats.ratio(m, "kl_to_base", [r["kl_sum"] for r in gen], lengths)
        if lm:
            lm_eval_metrics(stats, m, lm.get(pid, {}), lm.get("p0", {}), is_base, notes,
                            p["method"] if p["objective"] != "qadapter" else f"{p['method']}@{p['alpha_0']:g}")
        out[pid] = m
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------
def _work_rows(pairs: list[dict], prompts: list[Any]) -> list[dict]:
    """One row per held-out pair and per held-out prompt: each actor call scores / answers its rows under every
    policy at once (PolicyEvaluator with policies). Every row has every column (Arrow needs one schema)."""
    rows = []
    for i, r in enumerate(pairs):
        rows.append({"kind": "pairs", "idx": i, "prompt_json": r["prompt_json"],
                     **{c: list(r[c]) for c in PAIR_COLUMNS[:4]}})
    for i, p in enumerate(prompts):
        rows.append({"kind": "heldout", "idx": i, "prompt_json": json.dumps(p), **{c: [] for c in PAIR_COLUMNS[:4]}})
    return rows


def evaluate_stage(cfg: Config, adapters: dict[str, str], data_dir: Optional[str], out_dir: str) -> dict[str, Any]:
    """Evaluate base + each adapter (+ the dial) -> the results dict, also written to out_dir/results.json.

    adapters: method name -> adapter dir ("base" is implicit). data_dir: the preprocess output (its ``eval/``
    pair split feeds the pairs judge, and the held-out prompts when eval.prompts_file is unset); may be None."""
    import ray

    from pipelines.common import init_ray, write_text
    from qcore import oracle

    t_start = time.perf_counter()
    init_ray(cfg)
    judges = list(cfg.eval.judges)
    notes: list[str] = []
    policies, entries = build_policies(cfg, adapters)
    pol_by_id = {p["policy_id"]: p for p in policies}

    split = read_eval_pairs(data_dir)
    pairs: list[dict] = []
    if "pairs" in judges:
        if split is None:
            notes.append("pairs judge: no held-out pair split (<data_dir>/eval from preprocess; pass --data-dir): "
                         "no pair columns")
        elif not split:
            notes.append(f"pairs judge: the held-out pair split {data_dir}/eval is empty (data.eval_fraction): "
                         f"no pair columns")
        else:
            pairs = split[: cfg.eval.max_pairs] if cfg.eval.max_pairs > 0 else split
    gen_judges = [j for j in judges if j in GENERATION_JUDGES]
    prompts: list[Any] = []
    prompts_source = None
    if gen_judges:
        if cfg.eval.prompts_file:
            prompts_source = resolve_prompts_file(cfg.eval.prompts_file)
            prompts = load_prompts(prompts_source, cfg.eval.max_prompts)
        elif split:
            prompts_source = f"{str(data_dir).rstrip('/')}/eval (the run's eval split)"
            prompts = split_prompts(split, cfg.eval.max_prompts)
        if not prompts:
            notes.append(f"{', '.join(gen_judges)}: no held-out prompts (eval.prompts_file is unset and the run "
                         f"has no eval split): no answers generated, no {', '.join(gen_judges)} columns")
            gen_judges = []

    rows = _work_rows(pairs, prompts)
    num_actors = max(1, cfg.eval.num_actors)
    batch_size = max(1, cfg.eval.batch_size)
    use_gpu = bool(cfg.train.use_gpu)
    out_rows: list[dict] = []
    gen_seconds = 0.0
    if rows:
        try:
            total_cpus = int(ray.cluster_resources().get("CPU", 1))
        except Exception:  # noqa: BLE001
            total_cpus = 1
        threads = max(1, min(os.cpu_count() or 1, total_cpus) // num_actors)
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
        ds = ds.map_batches(
            PolicyEvaluator,
            fn_constructor_kwargs={"base_path": cfg.model.path, "dtype": cfg.model.dtype,
                                   "max_new_tokens": cfg.eval.max_new_tokens, "chunk_size": cfg.q.chunk_size,
                                   "trust_remote_code": cfg.model.trust_remote_code, "use_gpu": use_gpu,
                                   "num_threads": 0 if use_gpu else threads, "want_kl": cfg.eval.kl,
                                   "policies": policies},
            batch_size=batch_size, batch_format="pandas", concurrency=num_actors,
            num_cpus=1, num_gpus=1 if use_gpu else 0,
        )
        t_gen = time.perf_counter()
        out_rows = [dict(r) for r in ds.take_all()]
        gen_seconds = time.perf_counter() - t_gen
        if len(out_rows) != len(rows) * len(policies):
            raise RuntimeError(f"evaluation lost rows: {len(rows)} items x {len(policies)} policies in, "
                               f"{len(out_rows)} out")
    pair_rows: dict[str, list[dict]] = {p["policy_id"]: [] for p in policies}
    gen_rows: dict[str, list[dict]] = {p["policy_id"]: [] for p in policies}
    for r in sorted(out_rows, key=lambda r: (r["policy_id"], r["kind"], int(r["idx"]))):
        r["idx"], r["n_tokens"] = int(r["idx"]), int(r["n_tokens"])
        for k in ("kl_sum", "logp_chosen", "logp_rejected", "seconds"):  # Arrow turns pandas' NaN into null
            r[k] = float("nan") if r[k] is None else float(r[k])
        (pair_rows if r["kind"] == "pairs" else gen_rows)[r["policy_id"]].append(r)

    # Judges of the answers: score every policy's answer to prompt i; the win rates pair it with the base's.
    t_judge = time.perf_counter()
    scores: dict[str, dict[str, list[float]]] = {}
    consistency: dict[str, float] = {}
    pids = [p["policy_id"] for p in policies]
    device = "cuda" if use_gpu else "cpu"
    if gen_judges:
        if "oracle" in gen_judges:
            scores["oracle"] = {pid: [float(oracle.score(p if isinstance(p, str) else _last_user(p),
                                                         r["response"])) for p, r in zip(prompts, gen_rows[pid])]
                                for pid in pids}
        # The judge models load once, in their own Ray task (a GPU one on a GPU run), both at the same time.
        rm_ref = llm_ref = None
        if "reward_model" in gen_judges:
            rm_ref = _remote(_reward_scores, use_gpu).remote(
                cfg.eval.reward_model, prompts * len(pids), [r["response"] for pid in pids for r in gen_rows[pid]],
                device, batch_size, cfg.model.trust_remote_code)
        if "llm_judge" in gen_judges:
            llm_ref = _remote(_llm_compare, use_gpu).remote(
                cfg.eval.judge_criterion, cfg.eval.judge_model, cfg.eval.judge_url, cfg.eval.judge_api_model,
                cfg.eval.judge_api_key_env, device, prompts,
                {pid: [r["response"] for r in gen_rows[pid]] for pid in pids[1:]},
                [r["response"] for r in gen_rows["p0"]])
        if rm_ref is not None:
            got = ray.get(rm_ref)
            scores["reward_model"] = {pid: got[i * len(prompts):(i + 1) * len(prompts)] for i, pid in enumerate(pids)}
        if llm_ref is not None:
            got = ray.get(llm_ref)
            scores["llm_judge"] = {pid: v[0] for pid, v in got.items()}
            scores["llm_judge"]["p0"] = [0.5] * len(prompts)
            consistency = {pid: v[1] for pid, v in got.items()}
    judge_seconds = time.perf_counter() - t_judge

    # Forgetting: lm-evaluation-harness on every policy
    lm: dict = {}
    lm_seconds = 0.0
    if cfg.eval.lm_eval.tasks:
        from pipelines.forgetting import lm_eval_policies

        t_lm = time.perf_counter()
        lm = lm_eval_policies(cfg, policies, out_dir)  # it writes <out_dir>/lm_eval/<policy_id>/
        lm_seconds = time.perf_counter() - t_lm
    else:
        notes.append("forgetting: not measured (eval.lm_eval.tasks is empty): no lm-eval or retention columns")

    compose, compose_lines = None, []
    if cfg.eval.compose.adapters:
        compose, compose_lines = compose_sweep(
            cfg, adapters, data_dir, prompts, scores["oracle"]["p0"] if "oracle" in scores else None, notes,
            max(1, min(os.cpu_count() or 1, int(ray.cluster_resources().get("CPU", 1)))))

    per_policy = policy_metrics(cfg, policies, pair_rows, gen_rows, scores, lm, notes)
    notes = list(dict.fromkeys(notes))  # one line per missing setting, however many policies met it
    for pid, c in consistency.items():  # the share of prompts whose two judged orders agree
        per_policy[pid]["judge_consistency"] = c
    methods, dial = {}, []
    for e in entries:
        m = dict(per_policy[e["policy_id"]])
        m.update(alpha_0=e["alpha_0"], alpha_tilde=e["alpha_tilde"], objective=e["objective"],
                 adapter=e["adapter"])
        if e["kind"] == "method":
            methods[e["name"]] = m
        else:
            dial.append({"method": e["method"], "name": e["name"], **m})

    out_dir = out_dir.rstrip("/")
    names_of = {pid: [e["name"] for e in entries if e["policy_id"] == pid] for pid in pids}
    pair_lines = [json.dumps(_json_safe({
        "policy": names_of[pid], "alpha_0": pol_by_id[pid]["alpha_0"], "alpha_tilde": pol_by_id[pid]["alpha_tilde"],
        "idx": r["idx"], "logp_chosen": r["logp_chosen"], "logp_rejected": r["logp_rejected"],
        "tokens_chosen": r["tokens_chosen"], "tokens_rejected": r["tokens_rejected"]}))
        for pid in pids for r in pair_rows[pid]]
    gen_lines = []
    for pid in pids:
        for i, r in enumerate(gen_rows[pid]):
            rec = {"policy": names_of[pid], "method": pol_by_id[pid]["method"], "alpha_0": pol_by_id[pid]["alpha_0"],
                   "alpha_tilde": pol_by_id[pid]["alpha_tilde"], "idx": r["idx"], "prompt": prompts[r["idx"]],
                   "response": r["response"], "n_tokens": r["n_tokens"],
                   "kl_mean": (r["kl_sum"] / r["n_tokens"]) if cfg.eval.kl and r["n_tokens"] else None}
            rec.update({f"score_{j}": scores[j][pid][i] for j in scores})
            gen_lines.append(json.dumps(_json_safe(rec)))
    first = judges[0] if judges else None
    results = {
        "methods": methods,
        "dial": dial,
        "compose": compose,
        "judges": judges,
        "preference_key": JUDGE_COLUMNS[first][0] if first else None,
        "capability_key": "retention" if lm else None,
        "lm_eval_tasks": list(cfg.eval.lm_eval.tasks),
        "notes": notes,
        "n_pairs": len(pairs),
        "n_prompts": len(prompts),
        "pairs_source": f"{str(data_dir).rstrip('/')}/eval" if pairs else None,
        "prompts_source": prompts_source,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "confidence": cfg.eval.confidence,
        "bootstrap_samples": cfg.eval.bootstrap_samples,
        "num_actors": num_actors,
        "batch_size": batch_size,
        "inference_seconds": gen_seconds,
        "judge_seconds": judge_seconds,
        "lm_eval_seconds": lm_seconds,
        "seconds": time.perf_counter() - t_start,
        "results_path": f"{out_dir}/results.json",
        "pair_scores_path": f"{out_dir}/pair_scores.jsonl" if pair_lines else None,
        "generations_path": f"{out_dir}/generations.jsonl" if gen_lines else None,
        "compose_generations_path": f"{out_dir}/compose_generations.jsonl" if compose_lines else None,
    }
    results = _json_safe(results)
    if pair_lines:
        write_text(f"{out_dir}/pair_scores.jsonl", "\n".join(pair_lines) + "\n")
    if gen_lines:
        write_text(f"{out_dir}/generations.jsonl", "\n".join(gen_lines) + "\n")
    if compose_lines:
        write_text(f"{out_dir}/compose_generations.jsonl", "\n".join(compose_lines) + "\n")
    write_text(f"{out_dir}/results.json", json.dumps(results, indent=2, sort_keys=True))
    for n in notes:
        log.warning("evaluate: %s", n)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from pipelines.common import cli_config, stage_dir

    parser = argparse.ArgumentParser(description="Evaluate base + adapters (Ray Data batch inference)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter to evaluate, e.g. qadapter=runs/x/train/qadapter/adapter (repeatable)")
    parser.add_argument("--data-dir", default=None,
                        help="the preprocess output dir (its eval/ pair split: the pairs judge, held-out prompts)")
    parser.add_argument("--out-dir", default=None, help="default: <run dir>/evaluate")
    args, rest = parser.parse_known_args(argv)
    cfg = cli_config("Evaluate stage", rest)
    adapters = {}
    for spec in args.adapter:
        if "=" not in spec:
            parser.error(f"--adapter wants NAME=DIR, got {spec!r}")
        name, path = spec.split("=", 1)
        adapters[name] = path
    if not adapters and args.data_dir is None and args.out_dir is None:
        # chain: the adapters and the preprocess output this config's earlier stages recorded in the manifest
        from pipelines import full
        from pipelines.common import init_ray

        init_ray(cfg)
        out = full.run_pipeline(cfg, only="evaluate")["evaluate"]
    else:
        out = evaluate_stage(cfg, adapters, args.data_dir, args.out_dir or stage_dir(cfg, "evaluate"))
    print(json.dumps({"methods": out["methods"], "dial": out["dial"], "notes": out["notes"]}, indent=2))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
