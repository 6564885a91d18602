"""Serving and generation speed of the customized policy.

    python benchmarks/serve.py                       # SmolLM2-135M, both parts
    python benchmarks/serve.py --part generate       # only the one-call vs two-call decode (issue 11.2)
    python benchmarks/serve.py --model tiny          # a quick check of the script itself

Part "generate": QAdapterModel.generate with the adapter-on and adapter-off passes of each step in ONE decoder
call (PEFT mixed-adapter batch over a 2B-row KV cache, the default) vs two calls with two caches
(batch_passes=False), interleaved, same greedy tokens asserted. Part "serve": the Ray Serve app
(pipelines/serve.py) called by 1, 4 and 16 concurrent openai clients, against the same requests answered by
QAdapterModel.generate one by one in this process (requests/s, generated tokens/s). Greedy, fixed prompts; the
answers of the two paths are compared. On a shared machine read the ratios, not the absolute figures.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, interleaved, loadavg, median  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about rain.", "Explain gravity in one sentence.",
    "Name three fruits.", "How do I boil an egg?", "What is photosynthesis?", "Give me a tip for sleeping better.",
    "Why is the sky blue?", "What does a compiler do?", "Suggest a name for a cat.", "How far is the Moon?",
    "What is a prime number?", "Describe the ocean in two sentences.", "What is the tallest mountain?",
    "How do plants drink water?", "Tell me a fun fact about octopuses.",
]


def build_model(model_name: str, threads: int):
    import torch

    from qcore.base_models import resolve_model_path
    from qcore.config import AdapterConfig, QConfig
    from qcore.model import QAdapterModel

    torch.set_num_threads(threads)
    path = resolve_model_path(model_name)
    model = QAdapterModel.from_pretrained(path, adapter_cfg=AdapterConfig(dropout=0.0),
                                          q_cfg=QConfig(alpha_0=0.1, alpha_tilde=1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-zero adapter (B = 0 at init would make Q == z_base)
        for name, p in model.peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return path, model.eval()


def part_generate(model, tok, batch_sizes, max_new_tokens, rounds) -> list[dict]:
    from qcore.data import encode_prompt
    from qcore.generation import generate, left_pad

    rows = []
    for b in batch_sizes:
        ids, mask = left_pad([encode_prompt(p, tok) for p in PROMPTS[:b]], tok.pad_token_id or 0)
        outs = {}

        def peer(mode):
            def run():
                outs[mode] = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=[],
                                      batch_passes=mode == "one_call")
            return run

        times = interleaved({"two_calls": peer("two_calls"), "one_call": peer("one_call")}, rounds=rounds)
        assert (outs["one_call"] == outs["two_calls"]).all(), "the two paths gave different greedy tokens"
        two, one = median(times["two_calls"]), median(times["one_call"])
        row = {"batch": b, "new_tokens": max_new_tokens, "two_calls_s": round(two, 3), "one_call_s": round(one, 3),
               "speedup": round(two / one, 2), "one_call_tok_s": round(b * max_new_tokens / one, 1),
               "two_calls_tok_s": round(b * max_new_tokens / two, 1)}
        print("   generate:", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_serve(base_path, model, tok, concurrency, n_requests, max_new_tokens, threads) -> list[dict]:
    import openai
    import ray
    from ray import serve

    from pipelines.serve import build_app
    from qcore.data import encode_prompt
    from qcore.generation import eos_ids, left_pad

    tmp = Path(tempfile.mkdtemp(prefix="qa-serve-bench-"))
    adapter = str(model.save_pretrained(tmp / "adapter"))
    token = secrets.token_urlsafe(24)
    (tmp / "token").write_text(token)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    messages = [[{"role": "user", "content": p}] for p in prompts]

    # the baseline: the same requests, one by one, through QAdapterModel.generate in this process
    eos = sorted(set(eos_ids(model)) | {tok.eos_token_id})
    base_answers, base_tokens = [], 0
    t0 = time.perf_counter()
    for m in messages:
        ids, mask = left_pad([encode_prompt(m, tok)], tok.pad_token_id or 0)
        new = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos)[0, ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        base_tokens += cut
        base_answers.append(tok.decode(new[:cut], skip_special_tokens=True))
    base_s = time.perf_counter() - t0
    rows = [{"path": "QAdapterModel.generate one by one", "clients": 1, "requests": n_requests,
             "seconds": round(base_s, 2), "req_s": round(n_requests / base_s, 3),
             "tok_s": round(base_tokens / base_s, 1), "tokens": base_tokens}]
    print("   serve:", json.dumps(rows[-1]), flush=True)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"base": base_path, "adapters": {"qadapter": adapter}, "token_file": str(tmp / "token"),
                     "max_batch_size": max(concurrency), "batch_wait_timeout_s": 0.02, "num_threads": threads},
                    options={"ray_actor_options": {"num_cpus": 1}})
    serve.run(app, name="qadapter-bench", route_prefix="/")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=600)
        client.chat.completions.create(model="qadapter", messages=messages[0], max_tokens=2, temperature=0)  # warm
        for c in concurrency:
            answers = [None] * n_requests
            tokens = [0] * n_requests
            nxt = iter(range(n_requests))
            lock = threading.Lock()

            def worker():
                while True:
                    with lock:
                        i = next(nxt, None)
                    if i is None:
                        return
                    r = client.chat.completions.create(model="qadapter", messages=messages[i],
                                                       max_tokens=max_new_tokens, temperature=0)
                    answers[i], tokens[i] = r.choices[0].message.content, r.usage.completion_tokens

            t0 = time.perf_counter()
            workers = [threading.Thread(target=worker) for _ in range(c)]
            [w.start() for w in workers]
            [w.join() for w in workers]
            dt = time.perf_counter() - t0
            same = sum(a == b for a, b in zip(answers, base_answers))
            rows.append({"path": "Ray Serve app, openai clients", "clients": c, "requests": n_requests,
                         "seconds": round(dt, 2), "req_s": round(n_requests / dt, 3),
                         "tok_s": round(sum(tokens) / dt, 1), "tokens": sum(tokens),
                         "answers_equal_to_generate": f"{same}/{n_requests}",
                         "vs_one_by_one": round((n_requests / dt) / rows[0]["req_s"], 2)})
            print("   serve:", json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--part", choices=["all", "generate", "serve"], default="all")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    header("serve / generation speed", model=args.model, threads=args.threads, max_new_tokens=args.max_new_tokens)
    from transformers import AutoTokenizer

    base_path, model = build_model(args.model, args.threads)
    tok = AutoTokenizer.from_pretrained(base_path)
    out = {}
    if args.part in ("all", "generate"):
        out["generate"] = part_generate(model, tok, [int(x) for x in args.batch_sizes.split(",")],
                                        args.max_new_tokens, args.rounds)
    if args.part in ("all", "serve"):
        out["serve"] = part_serve(base_path, model, tok, [int(x) for x in args.concurrency.split(",")],
                                  args.requests, args.max_new_tokens, args.threads)
    print(f"   load average at end: {loadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
