"""Two preferences, two Q-Adapters, one base: each preference's score as the composition weights move.

    python benchmarks/compose_demo.py                       # tiny model (~1 min on 2 cores)
    python benchmarks/compose_demo.py --model smollm2-135m --steps 60

Preference "affirm": the answer starts with "yes," (rejected: "no,"); preference "color": the answer ends with
" blue" (rejected: " red"); same answer body otherwise, so each adapter learns one thing. Each adapter is trained
alone (qcore Q-Adapter loss, the fused path) on its own pairs; then both are loaded on the base and the policy
softmax((z_base + w_a (Q_a - z_base) + w_c (Q_c - z_base) + alpha_0 log pi_pre) / alpha_tilde) is scored on held-out
prompts for a grid of weights: per preference, the held-out pair accuracy (log pi_w(chosen) > log pi_w(rejected))
and the share of greedy answers that show it. Writes a JSON of the rows and a PNG plot.
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
BODIES = ["it is nice", "i like it", "it is old", "it is here", "it is big", "it is calm"]


def pairs_for(pref: str, prompts: list[str], rng: random.Random) -> list[dict]:
    out = []
    for p in prompts:
        body = rng.choice(BODIES)
        if pref == "affirm":
            out.append({"prompt": p, "chosen": f"yes, {body}", "rejected": f"no, {body}"})
        else:
            out.append({"prompt": p, "chosen": f"{body} blue", "rejected": f"{body} red"})
    return out


def train_adapter(base, pairs, tok, steps, lr, batch, seed, out_dir, alpha_0, alpha_tilde):
    import torch

    from qcore.config import AdapterConfig, QConfig
    from qcore.data import collate_pairs, tokenize_pair
    from qcore.model import QAdapterModel

    torch.manual_seed(seed)
    model = QAdapterModel.from_pretrained(base, adapter_cfg=AdapterConfig(dropout=0.0),
                                          q_cfg=QConfig(alpha_0=alpha_0, alpha_tilde=alpha_tilde))
    rows = [tokenize_pair(p, tok, 128, 96) for p in pairs]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    for step in range(steps):
        b = collate_pairs(rng.sample(rows, batch), tok.pad_token_id)
        loss, metrics = model.fused_loss("qadapter", b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"   step {step}: loss {loss.item():.4f} acc {metrics.get('rewards/accuracies', float('nan')):.2f}",
                  flush=True)
    return str(model.save_pretrained(out_dir))


def response_logprob(model, tok, pairs, names, w, alpha_0, alpha_tilde, key):
    """[N] log pi_w(response | prompt) of pairs[i][key] under the composed policy."""
    import torch

    from qcore.compose import composed_logits
    from qcore.data import encode_prompt

    seqs, starts = [], []
    for p in pairs:
        prompt = encode_prompt(p["prompt"], tok)
        resp = tok(p[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(prompt + resp)
        starts.append(len(prompt))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):  # right padded: full-sequence scoring
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logits = composed_logits(model, ids, mask, names, w, alpha_0=alpha_0, alpha_tilde=alpha_tilde)
    logp = torch.log_softmax(logits, -1)
    out = []
    for i, s in enumerate(seqs):
        pos = torch.arange(starts[i] - 1, len(s) - 1)
        out.append(logp[i, pos, ids[i, pos + 1]].sum().item())
    return torch.tensor(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--alpha-0", type=float, default=0.1)
    ap.add_argument("--alpha-tilde", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/compose_demo")
    args = ap.parse_args(argv)
    header("two-preference composition demo", model=args.model, steps=args.steps)
    import torch
    from transformers import AutoTokenizer

    from qcore.base_models import resolve_model_path
    from qcore.compose import load_adapters, weight_sweep

    torch.set_num_threads(args.threads)
    base = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(base)
    rng = random.Random(0)
    prompts = [f"tell me about {t}" for t in TOPICS]
    train_p, test_p = prompts[:24], prompts[24:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = {}
    for pref in ("affirm", "color"):
        print(f"== training {pref}", flush=True)
        dirs[pref] = train_adapter(base, pairs_for(pref, train_p, rng), tok, args.steps, args.lr, args.batch,
                                   1 if pref == "affirm" else 2, out / pref, args.alpha_0, args.alpha_tilde)
    train_s = time.perf_counter() - t0
    model = load_adapters(base, dirs)
    names = list(dirs)
    test_pairs = {pref: pairs_for(pref, test_p, random.Random(1)) for pref in names}
    ts = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    grid = sorted({(t, 0.0) for t in ts} | {(0.0, t) for t in ts} | {(1 - t, t) for t in ts[:5]} | {(1.0, 1.0)})
    oracles = {"affirm": lambda p, a: float(a.lower().startswith("yes")),
               "color": lambda p, a: float(a.lower().rstrip(" .!").endswith("blue"))}
    rows = weight_sweep(model, tok, test_p, names, [list(w) for w in grid], oracles, alpha_0=args.alpha_0,
                        alpha_tilde=args.alpha_tilde, max_new_tokens=16)
    for r, w in zip(rows, grid):
        for pref in names:
            lc, lr_ = (response_logprob(model, tok, test_pairs[pref], names, list(w), args.alpha_0,
                                        args.alpha_tilde, key) for key in ("chosen", "rejected"))
            r[f"{pref}_pair_acc"] = float((lc > lr_).float().mean())
            r[f"{pref}_margin"] = float((lc - lr_).mean())
        r["example"] = r["answers"][0]
        del r["answers"]
        print("   " + json.dumps(r), flush=True)
    (out / "rows.json").write_text(json.dumps({"rows": rows, "train_s": round(train_s, 1), "model": args.model,
                                               "steps": args.steps}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    paths = [("w_affirm = t, w_color = 0", lambda w, t: w == (t, 0.0), ts),
             ("w_affirm = 0, w_color = t", lambda w, t: w == (0.0, t), ts),
             ("w_affirm = 1 - t, w_color = t", lambda w, t: w == (1 - t, t), ts[:5])]
    for ax, (title, match, tgrid) in zip(axes, paths):
        for pref, style in (("affirm", "o-"), ("color", "s-")):
            for metric, alpha in ((f"{pref}_margin", 1.0),):
                ys = [next(r[metric] for r, w in zip(rows, grid) if match(w, t)) for t in tgrid]
                ax.plot(tgrid, ys, style, alpha=alpha, label=f"{pref}: mean log-ratio chosen/rejected")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("t")
    axes[0].set_ylabel("held-out preference margin (nats)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Composing two Q-Adapters ({args.model}, alpha_0={args.alpha_0}, alpha_tilde={args.alpha_tilde})")
    fig.tight_layout()
    fig.savefig(out / "compose_demo.png", dpi=110)
    print(f"   wrote {out / 'compose_demo.png'} and {out / 'rows.json'}; train {train_s:.0f} s; load {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
