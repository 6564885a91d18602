"""Our DPO loss equals TRL's DPOTrainer on the same model, batch and reference.

TRL (1.x) has no standalone ``dpo_loss`` function: the sigmoid loss and its metrics are computed inside
``DPOTrainer.compute_loss(model, inputs)`` from a collated batch (``input_ids``, ``attention_mask``,
``completion_mask``; chosen rows first), running the model itself through a fused LM head. So we build a real
trainer, offline, on the tiny random-init Llama with a LoRA adapter whose B matrices are random (so policy and
reference differ), and let TRL use its own reference for a PEFT model: the same network with the adapter off,
exactly our setting.

TRL's fused LM head computes per-token log-probs in float32 even for a float64 model, and sums them in float32
(a response's log-prob of ~-60 carries ~4e-6 of rounding). So the 1e-6 comparison feeds our loss logits built
to reproduce TRL's own per-token log-probs, in float32 like TRL; the end-to-end comparison (our loss from the
model's real float64 logits) holds to float32 rounding, 1e-5.
"""
import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer  # a test dependency: a missing trl fails here rather than skipping

from qcore.config import QConfig
from qcore.losses import compute_loss

# TRL's config sets transformers' deprecated `gradient_checkpointing` field itself; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

BETA = 0.3
PAIRS = {
    "prompt": ["What is the capital of France?", "Answer briefly.", "Human: hello there", "one two three"],
    "chosen": [" The capital of France is Paris.", " Yes.", " Assistant: hi, how can I help?", " four five"],
    "rejected": [" No.", " Here is a long and detailed answer with many words.", " Maybe.", " 9 + 1 = ?"],
}


@pytest.fixture(scope="module")
def trainer(tiny_model_dir, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo")), beta=BETA, loss_type=["sigmoid"], max_length=None,
        per_device_train_batch_size=len(PAIRS["prompt"]), gradient_checkpointing=False, bf16=False, fp16=False,
        use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", seed=0,
    )
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # random B: adapter on != adapter off
    return DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(PAIRS),
                      processing_class=tokenizer, peft_config=lora)


def _batch(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)  # TRL's own collation: [chosen rows; rejected rows], right padded


def _trl_loss_and_metrics(trainer, batch):
    trainer.model.eval()  # eval: no dropout, and TRL files this call's metrics under "eval"
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _trl_token_logps(model, batch, adapter: bool):
    """The per-token log-probs TRL's DPO loss is built from ([N, L-1], float32 whatever the model's dtype: TRL's
    fused LM head projects and normalizes in float32), position t scoring token t+1, 0 outside the completion."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                  fused_lm_head=True, use_cache=False)
    with torch.no_grad():
        if adapter:
            return model(**kwargs).log_probs.double()  # exact: float32 -> float64
        with model.disable_adapter():
            return model(**kwargs).log_probs.double()


def _logits_with_logps(token_logps, input_ids, vocab):
    """[N, L, V] logits whose log_softmax at the next token equals token_logps [N, L-1]: the label gets
    logit lp, one other token log(1 - e^lp), every other token -inf (so the normalizer is exactly 1)."""
    n, length = input_ids.shape
    logits = torch.full((n, length, vocab), float("-inf"), dtype=torch.float64)
    labels = input_ids[:, 1:]
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(length - 1), indexing="ij")
    logits[rows, cols, labels] = token_logps
    logits[rows, cols, (labels + 1) % vocab] = torch.log(-torch.expm1(token_logps))
    logits[:, -1, 0] = 0.0  # the last position predicts nothing; keep its row finite
    return logits


METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def test_dpo_loss_matches_trl_on_the_same_logps(trainer):
    batch = _batch(trainer)
    model = trainer.model
    assert batch["input_ids"].shape[0] == 2 * len(PAIRS["prompt"])
    trl_loss, trl_metrics = _trl_loss_and_metrics(trainer, batch)

    policy = _trl_token_logps(model, batch, adapter=True)
    reference = _trl_token_logps(model, batch, adapter=False)
    n_pairs = len(PAIRS["prompt"])
    # these are the log-probs TRL's loss used: their sums reproduce its logged logps
    assert abs(policy.sum(1)[:n_pairs].mean().item() - trl_metrics["logps/chosen"]) < 1e-4
    assert (policy - reference).abs().max() > 1e-3  # the adapter changes the policy: a non-trivial check

    vocab = model.get_output_embeddings().weight.shape[0]
    # float32, as TRL's kernel and sums are: both sides then do the same arithmetic on the same numbers
    q_logits = _logits_with_logps(policy, batch["input_ids"], vocab).float()
    base_logits = _logits_with_logps(reference, batch["input_ids"], vocab).float()
    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "response_mask": batch["completion_mask"]}
    loss, metrics = compute_loss("dpo", q_logits, base_logits, ours_batch, QConfig(chunk_size=3), dpo_beta=BETA)

    assert abs(trl_loss.item() - loss.item()) < 1e-6
    assert abs(trl_loss.item() - 0.6931471805599453) > 1e-4  # not the trivial log 2 of policy == reference
    for key in METRIC_KEYS:
        assert abs(trl_metrics[key] - metrics[key]) < 1e-6 * max(1.0, abs(metrics[key])), key


def test_dpo_end_to_end_matches_trl(trainer):
    """Real logits from the same PEFT model (adapter on = policy, off = reference), our float64 math against
    TRL's float32 fused kernel: equal up to float32 rounding, gradients into the adapter included."""
    batch = _batch(trainer)
    model = trainer.model
    trl_loss, trl_metrics = _trl_loss_and_metrics(trainer, batch)
    q_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert q_logits.dtype == torch.float64
    ours_batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "response_mask": batch["completion_mask"]}
    loss, metrics = compute_loss("dpo", q_logits, base_logits, ours_batch, QConfig(chunk_size=3), dpo_beta=BETA)

    assert abs(trl_loss.item() - loss.item()) < 1e-5
    for key in METRIC_KEYS:
        assert abs(trl_metrics[key] - metrics[key]) < 1e-5 * max(1.0, abs(metrics[key])), key
    params = [p for p in model.parameters() if p.requires_grad]
    trl_grads = torch.autograd.grad(trl_loss, params)
    our_grads = torch.autograd.grad(loss, params)
    assert max(g.abs().max() for g in our_grads) > 0
    for g_trl, g_ours in zip(trl_grads, our_grads):
        torch.testing.assert_close(g_ours, g_trl.to(g_ours.dtype), rtol=1e-3, atol=1e-6)
