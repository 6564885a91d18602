"""Two preferences, two Q-Adapters, one base: each preference's score as the composition weights move.

    python benchmarks/compose_demo.py                       # SmolLM2-135M-Instruct (the embedded default)
    python benchmarks/compose_demo.py --model tiny --steps 20   # a smoke run (a random model learns little)

Preference "affirm": the answer starts with "Yes," (rejected: "No,"); preference "color": the answer ends with
"and blue." (rejected: "and red."); one answer format, "<Yes|No>, <body> and <blue|red>.", for both, so each
adapter learns one preference, at its own states (the first token, the last words). Each adapter is trained alone (the Q-Adapter loss at the default
constants, the fused path) on its own pairs; then both are loaded on the base and the policy
softmax((z_base + w_a (Q_a - z_base) + w_c (Q_c - z_base) + alpha_0 log pi_pre) / alpha_tilde) is scored on
held-out prompts (topics never trained on) for a grid of weights, with eval.compose's own functions
(qcore.compose.composed_pair_scores, weight_sweep): per preference, the held-out pair accuracy and margin (mean
per-token log-prob of chosen minus rejected, the pairs judge), each with a 95% bootstrap interval, and the share
of greedy answers that show it. Writes rows.json, table.md and compose_demo.png into --out; the adapters go to
--work (not kept in the repository).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, loadavg  # noqa: E402

TOPICS = ["the sea", "a tree", "the moon", "bread", "a river", "music", "the wind", "a house", "winter", "a book",
          "the sun", "a garden", "coffee", "a train", "the rain", "a bird", "the city", "a lamp", "snow", "a road",
          "the forest", "a ship", "tea", "a clock", "the sky", "a cat", "fire", "a bridge", "summer", "a song",
          "the hill", "a door"]
TEMPLATES = ["Tell me about {}.", "What do you think of {}?", "Describe {} in a few words."]
BODIES = ["it is nice", "I like it", "it is old", "it is here", "it is big", "it is calm"]
PREFS = ("affirm", "color")


def prompts_of(topics: list[str]) -> list[str]:
    return [t.format(topic) for topic in topics for t in TEMPLATES]


def pairs_for(pref: str, prompts: list[str], rng: random.Random) -> list[dict]:
    """Both preferences' pairs share one answer format, "<Yes|No>, <body> and <blue|red>.": each pair differs only
    in its preference's word, the other word is drawn at random. (What both adapters learn alike, here the format,
    is counted once per adapter when their residuals are added: with two different formats, w = (1, 1) doubled
    each adapter's pull toward its own format and the greedy answers broke.)"""
    out = []
    for p in prompts:
        body, yes, color = rng.choice(BODIES), rng.choice(["Yes", "No"]), rng.choice(["blue", "red"])
        if pref == "affirm":
            out.append({"prompt": p, "chosen": f"Yes, {body} and {color}.", "rejected": f"No, {body} and {color}."})
        else:
            out.append({"prompt": p, "chosen": f"{yes}, {body} and blue.", "rejected": f"{yes}, {body} and red."})
    return out


SHOWS = {"affirm": lambda a: a.lower().startswith("yes"), "color": lambda a: a.lower().rstrip(" .!").endswith("blue")}


def train_adapter(base, pairs, tok, steps, lr, batch, seed, out_dir):
    import torch

    from qcore.config import AdapterConfig, QConfig
    from qcore.data import collate_pairs, tokenize_pair
    from qcore.model import QAdapterModel

    torch.manual_seed(seed)
    model = QAdapterModel.from_pretrained(base, adapter_cfg=AdapterConfig(dropout=0.0), q_cfg=QConfig())
    rows = [tokenize_pair(p, tok, 128, 96) for p in pairs]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for step in range(steps):
        loss, metrics = model.fused_loss("qadapter", collate_pairs(rng.sample(rows, batch), tok.pad_token_id))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"   step {step}: loss {loss.item():.4f} reward acc {metrics['rewards/accuracies']:.2f}", flush=True)
    return str(model.save_pretrained(out_dir))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/compose_demo")
    ap.add_argument("--work", default="/tmp/qadapter-compose-demo", help="where the two adapters are saved")
    args = ap.parse_args(argv)
    header("two-preference composition demo", model=args.model, steps=args.steps, lr=args.lr, batch=args.batch)
    import torch
    from transformers import AutoTokenizer

    from qcore import metrics
    from qcore.base_models import resolve_model_path
    from qcore.compose import composed_pair_scores, load_adapters, weight_sweep
    from qcore.data import tokenize_pair

    torch.set_num_threads(args.threads)
    base = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(base)
    train_p, test_p = prompts_of(TOPICS[:24]), prompts_of(TOPICS[24:])  # held-out topics
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = {}
    for i, pref in enumerate(PREFS):
        print(f"== training {pref} ({args.steps} steps x {args.batch} pairs)", flush=True)
        dirs[pref] = train_adapter(base, pairs_for(pref, train_p, random.Random(i)), tok, args.steps, args.lr,
                                   args.batch, i + 1, work / pref)
    train_s = time.perf_counter() - t0
    model = load_adapters(base, dirs)
    a0, at = model.q_config.alpha_0, model.q_config.alpha_tilde
    ts = [0.0, 0.5, 1.0, 1.5]
    paths = {"w_affirm = t, w_color = 0": [(t, 0.0) for t in ts], "w_affirm = 0, w_color = t": [(0.0, t) for t in ts],
             "w_affirm = w_color = t": [(t, t) for t in ts]}
    grid = sorted({w for ws in paths.values() for w in ws})
    t1 = time.perf_counter()
    pair_rows = {pref: [tokenize_pair(p, tok, 128, 96) for p in pairs_for(pref, test_p, random.Random(9))]
                 for pref in PREFS}
    scores = {pref: composed_pair_scores(model, rows, list(PREFS), grid, pad_token_id=tok.pad_token_id)
              for pref, rows in pair_rows.items()}
    swept = weight_sweep(model, tok, test_p, list(PREFS), [list(w) for w in grid], {},
                         max_new_tokens=args.max_new_tokens)
    score_s = time.perf_counter() - t1
    rows = []
    kw = {"n_resamples": 1000, "confidence": 0.95, "seed": 0}
    for i, w in enumerate(grid):
        r = {"weights": dict(zip(PREFS, w)), "examples": swept[i]["answers"][:3]}
        for pref in PREFS:
            lc, lr_ = scores[pref][i]
            r[f"{pref}_pair_acc"] = metrics.mean_interval(metrics.pair_outcomes(lc, lr_), **kw)
            r[f"{pref}_margin"] = metrics.mean_interval([a - b for a, b in zip(lc, lr_)], **kw)
            r[f"{pref}_shown"] = metrics.mean_interval([float(SHOWS[pref](a)) for a in swept[i]["answers"]], **kw)
        rows.append(r)
        print("   " + json.dumps({k: (v["value"] if isinstance(v, dict) and "value" in v else v)
                                  for k, v in r.items()}), flush=True)
    info = {"model": args.model, "steps": args.steps, "lr": args.lr, "batch": args.batch, "alpha_0": a0,
            "alpha_tilde": at, "n_test_pairs": len(test_p), "n_train_pairs": len(train_p), "train_s": round(train_s, 1),
            "score_s": round(score_s, 1), "load": loadavg()}
    (out / "rows.json").write_text(json.dumps({**info, "rows": rows}, indent=2))

    def cell(iv):
        return f"{iv['value']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}]"

    md = ["| w_affirm | w_color | affirm pair acc | affirm margin | color pair acc | color margin | "
          "answers 'Yes...' | answers '...blue.' |", "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['weights']['affirm']:g} | {r['weights']['color']:g} | {cell(r['affirm_pair_acc'])} | "
           f"{cell(r['affirm_margin'])} | {cell(r['color_pair_acc'])} | {cell(r['color_margin'])} | "
           f"{cell(r['affirm_shown'])} | {cell(r['color_shown'])} |" for r in rows]
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(13, 10), sharex=True)
    for col, (title, ws) in enumerate(paths.items()):
        for row, (metric, label) in enumerate((("pair_acc", "held-out pair accuracy"),
                                               ("margin", "held-out margin (nats/token)"),
                                               ("shown", "share of greedy answers showing it"))):
            ax = axes[row][col]
            for pref, style in zip(PREFS, ("o-", "s-")):
                ivs = [next(r for r in rows if tuple(r["weights"].values()) == w)[f"{pref}_{metric}"] for w in ws]
                ys = [iv["value"] for iv in ivs]
                ax.errorbar(ts, ys, yerr=[[y - iv["low"] for y, iv in zip(ys, ivs)],
                                          [iv["high"] - y for y, iv in zip(ys, ivs)]], fmt=style, capsize=3,
                            label=f"{pref} preference")
            ax.axhline({"pair_acc": 0.5, "margin": 0.0}.get(metric, 0.0), color="grey", lw=0.5)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(title, fontsize=10)
            if row == 2:
                ax.set_xlabel("t")
            if col == 0:
                ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Composing two Q-Adapters ({args.model}, alpha_0={a0:g}, alpha_tilde={at:g}; {len(test_p)} held-out "
                 f"pairs per preference, bars: 95% bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "compose_demo.png", dpi=100)
    print(f"   wrote {out}/compose_demo.png, table.md, rows.json; train {train_s:.0f} s, scoring {score_s:.0f} s; "
          f"load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
