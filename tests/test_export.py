"""Honest export: a saved adapter's model card says what plain LoRA loading gives (and that is checked), and
QAdapterForCausalLM runs the customized policy inside transformers.pipeline("text-generation")."""
import pytest
import torch

from qcore.config import AdapterConfig, QConfig
from qcore.model import QAdapterForCausalLM, QAdapterModel


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(tiny_model_dir, alpha_0=0.5, alpha_tilde=0.8):
    model = QAdapterModel.from_pretrained(tiny_model_dir, adapter_cfg=AdapterConfig(dropout=0.0),
                                          q_cfg=QConfig(alpha_0=alpha_0, alpha_tilde=alpha_tilde))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def test_model_card_says_what_plain_loading_gives_and_it_is_true(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _perturbed(tiny_model_dir)
    out = model.save_pretrained(tmp_path / "qa")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "- qadapter" in card
    assert "softmax(Q), the alpha_0 = 0, alpha_tilde = 1 policy" in card
    assert "alpha_0 = 0.5, alpha_tilde = 0.8" in card and "QAdapterForCausalLM" in card and "qadapter serve" in card
    # the claim itself: plain PEFT loading gives logits Q, whose softmax is the alpha_0 = 0 policy, not pi_custom
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)).eval()
    ids = torch.randint(4, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = torch.log_softmax(plain(input_ids=ids, attention_mask=mask).logits.double(), -1)
        q, base = model.q_and_base_logits(ids, mask)
    q, base = q.double(), base.double()
    assert (got - torch.log_softmax(q, -1)).abs().max() < 1e-5
    custom = torch.log_softmax((q + 0.5 * torch.log_softmax(base, -1)) / 0.8, -1)
    assert (got - custom).abs().max() > 1e-2
    # a baseline's card says plain loading IS its policy
    sft = model.save_pretrained(tmp_path / "sft", objective="sft")
    sft_card = (sft / "README.md").read_text()
    assert "exactly the trained policy" in sft_card and "NOT the trained policy" not in sft_card


def test_pipeline_text_generation_is_the_customized_policy(tiny_model_dir, tiny_tokenizer, tmp_path):
    import transformers

    from qcore.data import encode_prompt
    from qcore.generation import left_pad

    model = _perturbed(tiny_model_dir)
    adapter = model.save_pretrained(tmp_path / "qa")
    wrapped = QAdapterForCausalLM.from_pretrained(tiny_model_dir, str(adapter))
    assert isinstance(wrapped, transformers.PreTrainedModel) and isinstance(wrapped, QAdapterForCausalLM)
    pipe = transformers.pipeline("text-generation", model=wrapped, tokenizer=tiny_tokenizer)
    messages = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "what is two plus two"}]]
    tok = tiny_tokenizer
    for msgs in messages:
        text = pipe(msgs, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]["content"]
        ids, mask = left_pad([encode_prompt(msgs, tok)], tok.pad_token_id)
        ref = model.generate(ids, mask, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        new = ref[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t == tok.eos_token_id), len(new))
        assert text == tok.decode(new[:cut], skip_special_tokens=True)
        # and it is not the plain adapter's (alpha_0 = 0) answer for every prompt: the wrapper reads both passes
    base_answers = [model.generate(*left_pad([encode_prompt(m, tok)], tok.pad_token_id), max_new_tokens=10,
                                   eos_token_id=[], alpha_0=0.0, alpha_tilde=1.0)[0].tolist() for m in messages]
    custom_answers = [model.generate(*left_pad([encode_prompt(m, tok)], tok.pad_token_id), max_new_tokens=10,
                                     eos_token_id=[])[0].tolist() for m in messages]
    assert base_answers != custom_answers
    # the dial passes through: alpha_0 / alpha_tilde as generate kwargs of the wrapper
    ids, mask = left_pad([encode_prompt(messages[0], tok)], tok.pad_token_id)
    a = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, alpha_0=3.0,
                         eos_token_id=[])
    b = model.generate(ids, mask, max_new_tokens=6, alpha_0=3.0, eos_token_id=[])
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="beam"):
        wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2)
