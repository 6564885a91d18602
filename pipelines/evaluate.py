"""Evaluate stage: Ray Data batch inference of the base model and every adapter, at every dial setting.

    python pipelines/evaluate.py --config configs/tiny.yaml --adapter qadapter=runs/x/train/qadapter/adapter \
        --adapter dpo=runs/x/train/dpo/adapter [--data-dir DIR] [--out-dir DIR] [--eval.max_prompts 20 ...]

A *policy* is (method, adapter dir or None, alpha_0, alpha_tilde). The policies evaluated are:
- ``base``: the pre-trained model (no adapter; its logits are the policy), always;
- one per adapter in ``adapters``: a Q-Adapter at its trained alpha_0/alpha_tilde (its qadapter.json), any other
  objective (dpo | sft | replay) as the plain adapter-on policy (alpha_0 = 0, alpha_tilde = 1);
- the dial: the Q-Adapter at each ``cfg.eval.dial`` setting ({alpha_0, alpha_tilde}), without retraining.

Work rows (policy x held-out prompt, policy x probe question) flow through ``map_batches`` with a callable
class on an actor pool (``cfg.eval.num_actors``, ``cfg.eval.batch_size`` rows per call). Each actor loads the
base model + an adapter once, and again only when the rows move on to another adapter (rows are ordered by
adapter). Per held-out row it generates greedily with the customized policy (two-pass, two-KV-cache
``QAdapterModel.generate``), scores the answer with the preference oracle, and computes the per-token
KL(pi_policy || pi_base) over the generated tokens; per probe row it generates greedily and checks the answer.

Per policy, from the rows (qcore.metrics):
- pref_score: mean oracle score of its answers; win_rate: paired vs the base's answers to the same prompts
  (ties 0.5, so the base itself is 0.5); probe_accuracy; kl_to_base: mean per-token KL over all generated
  tokens of all held-out answers (the base: 0 by construction).

Inputs: ``cfg.eval.max_prompts`` caps both the held-out prompts and the probe questions (the first N of each).
Outputs in ``out_dir``: results.json ({"methods": {name: metrics}, "dial": [...], ...}) and generations.jsonl
(every row, for inspection). Cost: (1 + #adapters + #distinct dial settings) x (min(max_prompts, #prompts) +
min(max_prompts, #probe)) greedy generations of at most max_new_tokens tokens (probe answers: at most
PROBE_MAX_NEW_TOKENS), each token two forward passes (adapter on / off), plus one scoring forward per held-out batch.
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

from qcore.config import Config  # noqa: E402

log = logging.getLogger("qadapter.evaluate")

METRIC_KEYS = ("pref_score", "win_rate", "probe_accuracy", "kl_to_base")
OBJECTIVES = ("qadapter", "dpo", "sft", "replay")
PROMPTS_NAME = "heldout_prompts.jsonl"
PROBE_NAME = "probe.jsonl"
PROBE_MAX_NEW_TOKENS = 32  # probe answers are short; min(this, eval.max_new_tokens) new tokens per probe answer


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not JSON: {err}") from None
    return rows


def _find(explicit: Optional[str], key: str, data_dir: Optional[str], names: list[str]) -> Path:
    if explicit:  # absolute, or relative to the working directory, else to the repository root
        for p in (Path(explicit), Path(_ROOT) / explicit):
            if p.exists():
                return p.resolve()
        raise FileNotFoundError(f"config key '{key}' = {explicit!r}: file not found")
    tried = []
    for base in [data_dir, os.path.join(_ROOT, "data")] if data_dir else [os.path.join(_ROOT, "data")]:
        for name in names:
            p = Path(base) / name
            tried.append(str(p))
            if p.exists():
                return p
    raise FileNotFoundError(f"no file for config key '{key}': set it, or put one of {tried}")


def resolve_eval_files(cfg: Config, data_dir: Optional[str]) -> tuple[Path, Path]:
    """(held-out prompts, probe): cfg.eval.prompts_file / probe_file, else looked up in data_dir (and its
    ``default/`` subfolder, its parent for the probe), then in <repo>/data."""
    prompts = _find(cfg.eval.prompts_file, "eval.prompts_file", data_dir,
                    [PROMPTS_NAME, f"{cfg.run.name}/{PROMPTS_NAME}", f"default/{PROMPTS_NAME}"])
    probe = _find(cfg.eval.probe_file, "eval.probe_file", data_dir, [PROBE_NAME, f"../{PROBE_NAME}"])
    return prompts, probe


def load_prompts(path: Path, max_prompts: int) -> list[Any]:
    rows = read_jsonl(path)
    prompts = []
    for n, row in enumerate(rows, 1):
        if "prompt" not in row:
            raise ValueError(f"{path}:{n}: a held-out prompt row needs a 'prompt' key, got {sorted(row)}")
        prompts.append(row["prompt"])
    return prompts[:max_prompts] if max_prompts and max_prompts > 0 else prompts


def load_probe(path: Path, max_items: int) -> list[dict]:
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}:{n}: a probe row needs 'question' and 'answer', got {sorted(row)}")
    return rows[:max_items] if max_items and max_items > 0 else rows


def probe_gold(item: dict) -> str:
    """A probe row's accepted answers as one "|"-separated string (answer: str or list, plus optional aliases)."""
    answers = item["answer"] if isinstance(item["answer"], (list, tuple)) else [item["answer"]]
    return "|".join(str(a) for a in [*answers, *item.get("aliases", [])])


def resolve_adapter_dir(path: str) -> str:
    """An adapter dir (adapter_config.json inside), or a dir holding exactly one such dir (e.g. ``adapter/``)."""
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return str(p)
    for sub in ("adapter", "checkpoint/adapter"):
        if (p / sub / "adapter_config.json").exists():
            return str(p / sub)
    found = sorted(x.parent for x in p.glob("*/adapter_config.json")) if p.is_dir() else []
    if len(found) == 1:
        return str(found[0])
    raise FileNotFoundError(f"adapter '{path}': no adapter_config.json in it (or in exactly one subfolder)")


def adapter_objective(adapter_dir: str) -> str:
    """The training objective recorded in the adapter's qadapter.json (never guessed from a name)."""
    from qcore.model import read_objective

    return read_objective(adapter_dir)


def saved_q_config(adapter_dir: str):
    """The QConfig saved with an adapter (qadapter.json), whatever shape ``read_qadapter_json`` returns."""
    from qcore.model import read_qadapter_json

    got = read_qadapter_json(adapter_dir)
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


class PolicyEvaluator:
    """Ray Data callable class: loads the base model + one adapter, reloads only when the adapter changes."""

    def __init__(self, base_path: str, dtype: str = "float32", max_new_tokens: int = 64, chunk_size: int = 128,
                 trust_remote_code: bool = False, use_gpu: bool = False, num_threads: int = 0,
                 kl_mode: str = "generation"):
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
        from qcore.model import QAdapterModel

        self.model = None
        self.model = QAdapterModel.from_pretrained(
            self.base_path, adapter_path=adapter, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
            is_trainable=False).to(self.device).eval()
        self.loaded = adapter
        self.loads += 1

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

        from qcore import oracle

        df = batch if isinstance(batch, pd.DataFrame) else pd.DataFrame(batch)
        out_rows = []
        # Group rows of one batch by policy and kind (rows are ordered, so usually one group).
        keys = ["policy_id", "kind"]
        for (_pid, kind), group in df.groupby(keys, sort=False):
            first = group.iloc[0]
            adapter = first["adapter"] if isinstance(first["adapter"], str) and first["adapter"] else None
            self._load(adapter)
            a0, at = float(first["alpha_0"]), float(first["alpha_tilde"])
            prompts = [json.loads(x) for x in group["prompt_json"]]
            t0 = time.perf_counter()
            heldout = kind == "heldout"
            texts, kl_sums, counts = self.generate_and_kl(
                prompts, a0, at, want_kl=heldout,
                max_new_tokens=self.max_new_tokens if heldout else min(self.max_new_tokens, PROBE_MAX_NEW_TOKENS))
            dt = (time.perf_counter() - t0) / max(1, len(prompts))
            for (_, row), text, kls, cnt, prompt in zip(group.iterrows(), texts, kl_sums, counts, prompts):
                rec = {k: row[k] for k in ("policy_id", "kind", "idx", "gold")}
                rec.update(response=text, n_tokens=int(cnt), kl_sum=float(kls), seconds=dt,
                           score=float("nan"), correct=False)
                if kind == "heldout":
                    rec["score"] = float(oracle.score(prompt if isinstance(prompt, str) else _last_user(prompt),
                                                      text))
                else:
                    rec["correct"] = bool(oracle.probe_correct(text, row["gold"]))
                out_rows.append(rec)
        return pd.DataFrame(out_rows)


def _last_user(messages: list[dict]) -> str:
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------
def aggregate(rows: list[dict], policies: list[dict]) -> dict[str, dict]:
    """Per policy id: pref_score, win_rate (vs the base policy p0), probe_accuracy, kl_to_base and extras."""
    from qcore import metrics

    by_pid: dict[str, dict[str, dict[int, dict]]] = {p["policy_id"]: {"heldout": {}, "probe": {}} for p in policies}
    for r in rows:
        by_pid[r["policy_id"]][r["kind"]][int(r["idx"])] = r
    base = by_pid["p0"]["heldout"]
    out = {}
    for p in policies:
        held = by_pid[p["policy_id"]]["heldout"]
        probe = by_pid[p["policy_id"]]["probe"]
        idxs = sorted(held)
        scores = [held[i]["score"] for i in idxs]
        base_scores = [base[i]["score"] for i in idxs]
        n_tok = sum(held[i]["n_tokens"] for i in idxs)
        kl = sum(held[i]["kl_sum"] for i in idxs) / n_tok if n_tok else float("nan")
        is_base = p["policy_id"] == "p0"
        out[p["policy_id"]] = {
            "pref_score": metrics.mean(scores),
            "win_rate": 0.5 if is_base else metrics.win_rate(scores, base_scores),
            "probe_accuracy": metrics.accuracy(probe[i]["correct"] for i in sorted(probe)),
            "kl_to_base": 0.0 if is_base else kl,
            "pref_score_stderr": metrics.stderr(scores),
            "kl_to_base_measured": kl,
            "mean_response_tokens": n_tok / len(idxs) if idxs else float("nan"),
            "n_prompts": len(idxs),
            "n_probe": len(probe),
        }
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
def evaluate_stage(cfg: Config, adapters: dict[str, str], data_dir: Optional[str], out_dir: str) -> dict[str, Any]:
    """Evaluate base + each adapter (+ the dial) -> the results dict, also written to out_dir/results.json.

    adapters: method name -> adapter dir ("base" is implicit). data_dir: where heldout_prompts.jsonl and
    probe.jsonl are looked up when cfg.eval.prompts_file / probe_file are unset (see resolve_eval_files)."""
    import ray

    from pipelines.common import init_ray, write_text

    t_start = time.perf_counter()
    init_ray(cfg)
    prompts_path, probe_path = resolve_eval_files(cfg, data_dir)
    prompts = load_prompts(prompts_path, cfg.eval.max_prompts)
    probe = load_probe(probe_path, cfg.eval.max_prompts)
    if not prompts:
        raise ValueError(f"{prompts_path}: no held-out prompts")
    policies, entries = build_policies(cfg, adapters)

    rows = []
    for pol in policies:  # ordered by policy: an actor reloads only when the adapter changes
        for kind, items in (("heldout", [(p, "") for p in prompts]), ("probe", [(q["question"], probe_gold(q))
                                                                               for q in probe])):
            for i, (prompt, gold) in enumerate(items):
                rows.append({"policy_id": pol["policy_id"], "adapter": pol["adapter"] or "",
                             "alpha_0": pol["alpha_0"], "alpha_tilde": pol["alpha_tilde"], "kind": kind, "idx": i,
                             "prompt_json": json.dumps(prompt), "gold": gold})
    num_actors = max(1, cfg.eval.num_actors)
    use_gpu = bool(cfg.train.use_gpu)
    try:
        total_cpus = int(ray.cluster_resources().get("CPU", 1))
    except Exception:  # noqa: BLE001
        total_cpus = 1
    threads = max(1, min(os.cpu_count() or 1, total_cpus) // num_actors)
    batch_size = max(1, cfg.eval.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    ds = ds.map_batches(
        PolicyEvaluator,
        fn_constructor_kwargs={"base_path": cfg.model.path, "dtype": cfg.model.dtype,
                               "max_new_tokens": cfg.eval.max_new_tokens, "chunk_size": cfg.q.chunk_size,
                               "trust_remote_code": cfg.model.trust_remote_code, "use_gpu": use_gpu,
                               "num_threads": 0 if use_gpu else threads},
        batch_size=batch_size, batch_format="pandas", concurrency=num_actors,
        num_cpus=1, num_gpus=1 if use_gpu else 0,
    )
    t_gen = time.perf_counter()
    out_rows = [dict(r) for r in ds.take_all()]
    gen_seconds = time.perf_counter() - t_gen
    for r in out_rows:
        r["idx"] = int(r["idx"])
        r["n_tokens"] = int(r["n_tokens"])
        r["correct"] = bool(r["correct"])
        for k in ("kl_sum", "score", "seconds"):  # Arrow turns pandas' NaN into null
            r[k] = float("nan") if r[k] is None else float(r[k])
    if len(out_rows) != len(rows):
        raise RuntimeError(f"evaluation lost rows: {len(rows)} in, {len(out_rows)} out")
    per_policy = aggregate(out_rows, policies)

    pol_by_id = {p["policy_id"]: p for p in policies}
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
    prompt_of = {("heldout", i): p for i, p in enumerate(prompts)}
    prompt_of.update({("probe", i): q["question"] for i, q in enumerate(probe)})
    gen_lines = []
    for r in sorted(out_rows, key=lambda r: (int(r["policy_id"][1:]), r["kind"], r["idx"])):
        pol = pol_by_id[r["policy_id"]]
        names = [e["name"] for e in entries if e["policy_id"] == r["policy_id"]]
        gen_lines.append(json.dumps(_json_safe({
            "policy": names, "method": pol["method"], "alpha_0": pol["alpha_0"], "alpha_tilde": pol["alpha_tilde"],
            "kind": r["kind"], "idx": r["idx"], "prompt": prompt_of[(r["kind"], r["idx"])], "response": r["response"],
            "score": r["score"] if r["kind"] == "heldout" else None,
            "gold": r["gold"] if r["kind"] == "probe" else None,
            "correct": r["correct"] if r["kind"] == "probe" else None,
            "n_tokens": r["n_tokens"],
            "kl_mean": (r["kl_sum"] / r["n_tokens"]) if r["kind"] == "heldout" and r["n_tokens"] else None,
        })))
    results = {
        "methods": methods,
        "dial": dial,
        "n_prompts": len(prompts),
        "n_probe": len(probe),
        "prompts_file": str(prompts_path),
        "probe_file": str(probe_path),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "probe_max_new_tokens": min(cfg.eval.max_new_tokens, PROBE_MAX_NEW_TOKENS),
        "num_actors": num_actors,
        "batch_size": batch_size,
        "generation_seconds": gen_seconds,
        "seconds": time.perf_counter() - t_start,
        "results_path": f"{out_dir}/results.json",
        "generations_path": f"{out_dir}/generations.jsonl",
    }
    results = _json_safe(results)
    write_text(f"{out_dir}/generations.jsonl", "\n".join(gen_lines) + "\n")
    write_text(f"{out_dir}/results.json", json.dumps(results, indent=2, sort_keys=True))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from pipelines.common import cli_config, stage_dir

    parser = argparse.ArgumentParser(description="Evaluate base + adapters (Ray Data batch inference)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="an adapter to evaluate, e.g. qadapter=runs/x/train/qadapter/adapter (repeatable)")
    parser.add_argument("--data-dir", default=None, help="where heldout_prompts.jsonl / probe.jsonl are")
    parser.add_argument("--out-dir", default=None, help="default: <run dir>/evaluate")
    args, rest = parser.parse_known_args(argv)
    cfg = cli_config("Evaluate stage", rest)
    adapters = {}
    for spec in args.adapter:
        if "=" not in spec:
            parser.error(f"--adapter wants NAME=DIR, got {spec!r}")
        name, path = spec.split("=", 1)
        adapters[name] = path
    out = evaluate_stage(cfg, adapters, args.data_dir, args.out_dir or stage_dir(cfg, "evaluate"))
    print(json.dumps({"methods": out["methods"], "dial": out["dial"]}, indent=2))
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
