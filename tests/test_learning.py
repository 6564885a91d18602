"""End to end: QAdapterModel + qcore.losses.compute_loss + AdamW learn a synthetic preference.

Task: prompts are random "ordinary" tokens followed by a separator (like a chat template's assistant header);
the chosen response uses tokens of class A, the rejected one (same length) tokens of class B. After a few
hundred steps the customized policy must prefer chosen over rejected on HELD-OUT pairs, and at held-out prompt
states (where the preference says nothing) stay close to the base policy.

Dial used here: alpha_0 = 1, alpha_tilde = 2. Writing Q = z_base + delta, the customized logits are
    (Q + alpha_0 * log pi_pre) / alpha_tilde = z_base + delta / (1 + alpha_0) + const     (alpha_tilde = 1 + alpha_0)
so pi_custom == pi_pre exactly at init, and the learned residual reaches the policy attenuated by 1/(1 + alpha_0):
the base term is an explicit anchor. KL bound, and why: at held-out prompt states we require the mean per-token
KL(pi_custom || pi_pre) <= 0.5 nats AND <= 1/4 of the KL of a policy that forgot the base there and collapsed onto
the preferred class (uniform over A), computed on the same states (~2.3 nats here). About 0.16 is measured. The same
adapter read with the anchor off (alpha_0 = 0, alpha_tilde = 1, pi_custom = softmax(Q)) must drift further.
"""
import time

import torch

from qcore.base_models import build_tiny_model
from qcore.config import AdapterConfig, QConfig
from qcore.data import collate_pairs
from qcore.losses import compute_loss
from qcore.model import QAdapterModel

V, EOS, PAD, SEP = 384, 2, 3, 1
CLASS_A = torch.arange(100, 150)  # preferred
CLASS_B = torch.arange(200, 250)  # dispreferred
ORDINARY = torch.tensor([t for t in range(4, V) if not (100 <= t < 150 or 200 <= t < 250)])


def _pairs(n: int, seed: int) -> list[dict]:
    """Tokenized pair rows in qcore.data's layout. Chosen and rejected have the same length within a pair (so a
    sum of log-probs compares content, not length); lengths differ across pairs (so batches are padded)."""
    g = torch.Generator().manual_seed(seed)

    def pick(pool, k):
        return pool[torch.randint(0, len(pool), (k,), generator=g)].tolist()

    rows = []
    for _ in range(n):
        prompt = pick(ORDINARY, int(torch.randint(4, 9, (1,), generator=g))) + [SEP]
        k = int(torch.randint(3, 7, (1,), generator=g))
        chosen, rejected = pick(CLASS_A, k) + [EOS], pick(CLASS_B, k) + [EOS]
        resp_mask = [0] * len(prompt) + [1] * (k + 1)
        rows.append(dict(chosen_input_ids=prompt + chosen, chosen_response_mask=resp_mask,
                         rejected_input_ids=prompt + rejected, rejected_response_mask=resp_mask,
                         prompt_length=len(prompt)))
    return rows


def _evaluate(model: QAdapterModel, rows: list[dict], alpha_0: float, alpha_tilde: float) -> dict:
    batch = collate_pairs(rows, PAD)
    n = len(rows)
    q_cfg = QConfig(**{**model.q_config.__dict__, "alpha_0": alpha_0, "alpha_tilde": alpha_tilde})
    with torch.no_grad():
        q, base = model.q_and_base_logits(batch["input_ids"], batch["attention_mask"])
        _, metrics = compute_loss("qadapter", q, base, batch, q_cfg)
        logp = torch.log_softmax(model.customized_logits(q, base, alpha_0, alpha_tilde), -1)
        logp_base = torch.log_softmax(base, -1)
        taken = logp[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        seq_logp = (taken * batch["response_mask"][:, 1:]).sum(-1)
        # states inside the held-out prompts (before the separator): the preference data says nothing about them
        plen = torch.tensor([r["prompt_length"] for r in rows])
        inside = torch.arange(batch["input_ids"].shape[1])[None] < (plen[:, None] - 1)
        kl = (logp.exp() * (logp - logp_base)).sum(-1)[:n][inside]
        collapse = (-torch.log(torch.tensor(float(len(CLASS_A)))) - logp_base[:n][..., CLASS_A].mean(-1))[inside]
        start = logp[torch.arange(n), plen - 1]  # the first response token's distribution (chosen rows)
    return {
        "reward_accuracy": metrics["rewards/accuracies"],
        "logp_accuracy": (seq_logp[:n] > seq_logp[n:]).double().mean().item(),
        "kl_prompt": kl.mean().item(),
        "kl_collapse": collapse.mean().item(),
        "mass_A": start.exp()[:, CLASS_A].sum(-1).mean().item(),
    }


def test_qadapter_learns_held_out_preference_with_bounded_kl():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust to a busy 2-core machine
    try:
        torch.manual_seed(0)
        hf = build_tiny_model()
        with torch.no_grad():  # random init gives near-uniform logits (std ~0.16); make the base more opinionated
            hf.lm_head.weight.mul_(5.0)
        q_cfg = QConfig(alpha_0=1.0, alpha_tilde=2.0, beta=0.01)
        model = QAdapterModel.from_model(
            hf, AdapterConfig(rank=8, lora_alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
            q_cfg)
        held_out = _pairs(64, seed=12345)
        before = _evaluate(model, held_out, 1.0, 2.0)
        assert before["kl_prompt"] < 1e-6  # (1 + alpha_0) / alpha_tilde = 1: pi_custom == pi_pre at init

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        model.train()
        start = time.time()
        for step in range(200):
            batch = collate_pairs(_pairs(16, seed=step), PAD)  # fresh pairs every step, never the held-out ones
            out = model(batch["input_ids"], batch["attention_mask"])
            loss, _ = compute_loss("qadapter", out.q_logits, out.base_logits, batch, q_cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = time.time() - start
        model.eval()
        after = _evaluate(model, held_out, 1.0, 2.0)
        print(f"\ntrain {train_s:.1f}s  before {before}\nafter {after}")

        assert after["reward_accuracy"] >= 0.9, after  # R(chosen) > R(rejected), the learned implicit reward
        assert after["logp_accuracy"] >= 0.9, after  # sum log pi_custom(chosen) > sum log pi_custom(rejected)
        assert after["mass_A"] > before["mass_A"] + 0.05, (before, after)  # the policy itself moved towards A
        assert after["kl_prompt"] <= 0.5, after
        assert after["kl_prompt"] <= 0.25 * after["kl_collapse"], after
        assert after["kl_prompt"] > 1e-3  # the adapter did change something (the bound is not vacuous)
        anchor_off = _evaluate(model, held_out, 0.0, 1.0)
        assert anchor_off["kl_prompt"] > after["kl_prompt"], (anchor_off, after)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# A pre-trained, template-less base model (the Llama-3.1-8B-for-HH situation): the default constants learn.
# ----------------------------------------------------------------------------------------------------------------
STYLE_A = ["yes", "no", "maybe", "so"]  # the majority style of the pre-training answers (70%)
STYLE_B = ["Paris", "France", "capital", "sea"]  # the minority (30%): the new preference, which the base gives mass
SUBJECTS = ["the quick brown fox", "the lazy dog", "a short poem", "the capital", "seven", "the sea", "one two"]
VERBS = ["please explain", "describe", "summarize", "list", "write about"]


def _text_prompt(rng):
    return f"{rng.choice(VERBS)} {rng.choice(SUBJECTS)} ?"


def _text_answer(rng, words):
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))


def _text_pairs(tokenizer, n, seed):
    import random

    from qcore.data import tokenize_pair

    rng = random.Random(seed)
    return [tokenize_pair({"prompt": _text_prompt(rng), "chosen": _text_answer(rng, STYLE_B),
                           "rejected": _text_answer(rng, STYLE_A)}, tokenizer, 64, 32) for _ in range(n)]


def test_default_constants_learn_on_a_pretrained_template_less_model():
    """A tiny Llama pre-trained here (200 steps) on BOS + prompt + answer texts from a base-style tokenizer (no chat
    template, BOS added by the tokenizer), 70% style A answers, 30% style B. Q-Adapter with the default constants
    (alpha_0 0.01, alpha_tilde 1, gamma 1, beta 0.1) trained on "B over A" pairs built by qcore.data.tokenize_pair
    (which must put the BOS in front, as pre-training did) learns the preference on held-out prompts: the
    length-normalized log-likelihood under pi_custom prefers the chosen answer on >= 90% of held-out pairs, from
    < 20% before (the base prefers the majority style)."""
    import random

    from qcore.base_models import build_tiny_tokenizer
    from qcore.data import collate_sft, tokenize_sft

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = build_tiny_tokenizer(chat_template=False, add_bos=True)
        bos = tok.bos_token_id
        torch.manual_seed(0)
        hf = build_tiny_model(vocab_size=len(tok))
        rng = random.Random(0)
        opt = torch.optim.AdamW(hf.parameters(), lr=3e-3)
        for _ in range(200):  # pre-training: every sequence starts with BOS, as the tokenizer encodes it
            rows = [tokenize_sft({"prompt": _text_prompt(rng),
                                  "response": _text_answer(rng, STYLE_A if rng.random() < 0.7 else STYLE_B)},
                                 tok, 64, 32) for _ in range(32)]
            b = collate_sft(rows, tok.pad_token_id)
            loss = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()

        q_cfg = QConfig()  # the defaults
        assert (q_cfg.alpha_0, q_cfg.alpha_tilde, q_cfg.gamma, q_cfg.beta) == (0.01, 1.0, 1.0, 0.1)
        model = QAdapterModel.from_model(hf, AdapterConfig(rank=8, lora_alpha=16, dropout=0.0), q_cfg)
        held_out = _text_pairs(tok, 64, seed=999)
        for row in held_out:  # exactly one BOS, at the start
            assert row["chosen_input_ids"][0] == bos and row["chosen_input_ids"].count(bos) == 1

        def pair_accuracy():
            batch = collate_pairs(held_out, tok.pad_token_id)
            with torch.no_grad():
                q, base = model.q_and_base_logits(batch["input_ids"], batch["attention_mask"])
                logp = torch.log_softmax(model.customized_logits(q, base), -1)
            taken = logp[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            mask = batch["response_mask"][:, 1:].float()
            mean = (taken * mask).sum(-1) / mask.sum(-1)
            return (mean[:64] > mean[64:]).double().mean().item()

        before = pair_accuracy()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for step in range(150):
            batch = collate_pairs(_text_pairs(tok, 16, seed=step), tok.pad_token_id)
            out = model(batch["input_ids"], batch["attention_mask"])
            loss, _ = compute_loss("qadapter", out.q_logits, out.base_logits, batch, q_cfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = pair_accuracy()
        print(f"\nheld-out pair accuracy under pi_custom: before {before:.3f}, after {after:.3f}")
        assert before < 0.2, before
        assert after >= 0.9, after
    finally:
        torch.set_num_threads(threads)
