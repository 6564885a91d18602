"""``qadapter <command>``: one entry point for the pipeline stages and for using a trained adapter.

    qadapter run [--config P] [--stop-after STAGE] [--section.key VALUE ...]    the whole pipeline (pipelines/full.py)
    qadapter preprocess | train | tune | evaluate | report ...                   one stage (pipelines/<stage>.py)
    qadapter generate --adapter DIR [--input FILE] [--output OUT.jsonl] ...      answer prompts (file or stdin)
    qadapter chat --adapter DIR                                                  an interactive conversation
    qadapter serve --adapter DIR [--port 8000]                                   OpenAI-compatible HTTP API (Ray Serve)

The stage commands are thin: they call that stage's ``main(argv)`` with the rest of the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

_ROOT = str(Path(__file__).resolve().parent.parent)

# stage -> (module, what it does, its own options, the config sections it reads)
STAGES = {
    "run": ("pipelines.full", "preprocess -> tune -> train -> evaluate -> report, resumable",
            ["--stop-after {preprocess,tune,train,evaluate}  end the run after this stage"],
            ["model", "adapter", "q", "data", "train", "tune", "eval", "run"]),
    "preprocess": ("pipelines.preprocess", "preference files -> tokenized Parquet splits (Ray Data)", [],
                   ["model", "data", "run"]),
    "train": ("pipelines.train", "train one adapter (Ray Train + DeepSpeed)",
              ["--data DIR  preprocess output (Parquet train/ and eval/)", "--out DIR  output directory"],
              ["model", "adapter", "q", "data", "train", "run"]),
    "tune": ("pipelines.tune", "hyperparameter sweep of the train stage (Ray Tune)",
             ["--data DIR  preprocess output", "--out DIR  output directory"],
             ["model", "adapter", "q", "data", "train", "tune", "run"]),
    "evaluate": ("pipelines.evaluate", "base vs adapters, the dial (Ray Data batch inference)",
                 ["--adapter NAME=DIR  an adapter to evaluate (repeatable)", "--data-dir DIR", "--out-dir DIR"],
                 ["model", "q", "data", "eval", "run"]),
    "report": ("pipelines.report", "tables and plots from the evaluate results",
               ["--results FILE  JSON with the results dict", "--out-dir DIR"], ["eval", "run"]),
}
COMMON = ["--config FILE  YAML profile (default: configs/default.yaml)",
          "--<section>.<key> VALUE  any config key below, e.g. --train.lr 1e-4"]
USE_KEYS = ["model.path", "model.dtype", "model.trust_remote_code", "eval.max_new_tokens"]


def config_keys(sections: Sequence[str]) -> list[str]:
    """'section.key (default)' for every key of the given config sections, from qcore.config's dataclasses."""
    from qcore.config import Config

    def default(f):  # the declared default ("auto" stays "auto"; an instance would show what it resolved to)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    def walk(prefix, cls):
        for f in dataclasses.fields(cls):
            typ = f.default_factory if f.default is dataclasses.MISSING else None
            if dataclasses.is_dataclass(typ):
                yield from walk(f"{prefix}.{f.name}", typ)
            else:
                yield f"{prefix}.{f.name} ({default(f)!r})"

    fields = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    return [line for sec in sections for line in walk(sec, fields[sec])]


def _epilog(options: Sequence[str], keys: Sequence[str]) -> str:
    out = []
    if options:
        out += ["options:"] + [f"  {o}" for o in options]
    out += ["", "config keys read:"] + [f"  {k}" for k in keys]
    return "\n".join(out)


def _stage(name: str, argv: list[str]) -> int:
    module, what, options, sections = STAGES[name]
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: qadapter {name} [options] [--section.key VALUE ...]\n\n{what} ({module.replace('.', '/')}.py)\n")
        print(_epilog([*options, *COMMON], config_keys(sections)))
        return 0
    import importlib
    import logging

    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    logging.basicConfig(level=logging.INFO)
    importlib.import_module(module).main(argv)
    return 0


# ---------------------------------------------------------------------------------------------------------- use
def _adapters(specs: Sequence[str]) -> dict[str, str]:
    """['DIR'] or ['name=DIR', ...] -> {name: dir}; an unnamed single adapter is called 'qadapter'."""
    out: dict[str, str] = {}
    for i, spec in enumerate(specs):
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or ("qadapter" if len(specs) == 1 else f"a{i}")
        if name in out:
            raise SystemExit(f"--adapter: name {name!r} given twice")
        if not (Path(path) / "adapter_config.json").exists():
            raise SystemExit(f"--adapter {spec!r}: {path} has no adapter_config.json (not an adapter directory)")
        out[name] = path
    return out


def _use_parser(name: str, help_text: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"qadapter {name}", description=help_text,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=_epilog([], [*USE_KEYS, "(only with --config; the flags win)"]))
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="a saved adapter directory; repeat (NAME=DIR) to compose several (see --weights)")
    p.add_argument("--base", default=None, help="base model (dir, 'tiny', 'smollm2-135m'); default: model.path of "
                                                "--config, else the base recorded in the adapter's qadapter.json")
    p.add_argument("--config", default=None, help="YAML profile to read the model.* keys from")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: model.dtype, else float32)")
    p.add_argument("--alpha-0", type=float, default=None, help="weight of log pi_pre (default: the adapter's)")
    p.add_argument("--alpha-tilde", type=float, default=None, help="temperature of the policy (default: the adapter's)")
    p.add_argument("--weights", default=None, help="composition weights, comma separated, one per --adapter")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: eval.max_new_tokens (64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


class Generator:
    """What generate, chat and the server share: the model(s), the tokenizer, encoding and decoding."""

    def __init__(self, args):
        import torch
        from transformers import AutoTokenizer

        from qcore.base_models import resolve_model_path
        from qcore.compose import base_model_of, load_adapters
        from qcore.config import load_config

        if args.threads:
            torch.set_num_threads(args.threads)
        self.adapters = _adapters(args.adapter)
        cfg = load_config(args.config, []) if args.config else None
        base = args.base or (cfg.model.path if cfg else None) or base_model_of(next(iter(self.adapters.values())))
        if not base:
            raise SystemExit("no base model: pass --base (or --config with model.path)")
        self.base = resolve_model_path(base)
        dtype = args.dtype or (cfg.model.dtype if cfg else "float32")
        trust = bool(cfg.model.trust_remote_code) if cfg else False
        self.max_new_tokens = args.max_new_tokens or (cfg.eval.max_new_tokens if cfg else 64)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base, trust_remote_code=trust)
        self.model = load_adapters(self.base, self.adapters, dtype=dtype, trust_remote_code=trust)
        self.names = list(self.adapters)
        self.weights = None
        if args.weights is not None:
            w = [float(x) for x in args.weights.split(",")]
            if len(w) != len(self.names):
                raise SystemExit(f"--weights: {len(w)} values for {len(self.names)} adapters ({self.names})")
            self.weights = w
        elif len(self.names) > 1:
            raise SystemExit("several --adapter need --weights (one per adapter)")
        a0, at = self.model.dials[self.names[0]]
        self.alpha_0 = a0 if args.alpha_0 is None else args.alpha_0
        self.alpha_tilde = at if args.alpha_tilde is None else args.alpha_tilde
        if self.alpha_0 < 0 or self.alpha_tilde <= 0:
            raise SystemExit(f"need --alpha-0 >= 0 and --alpha-tilde > 0, got {self.alpha_0}, {self.alpha_tilde}")
        self.temperature, self.top_p = args.temperature, args.top_p
        self.rng = torch.Generator().manual_seed(args.seed)
        tok = self.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        from qcore.generation import eos_ids

        self.eos = sorted(set(eos_ids(self.model)) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))

    def encode(self, prompt) -> list[int]:
        from qcore.data import encode_prompt

        return encode_prompt(prompt, self.tokenizer)

    def stream(self, prompts: Sequence, max_new_tokens: Optional[int] = None):
        """Yields (row, new text piece, done) as tokens come; done rows yield once more with piece ''."""
        from qcore.generation import generate, left_pad

        ids, mask = left_pad([self.encode(p) for p in prompts], self.pad, self.model.device)
        new = [[] for _ in prompts]
        shown = [""] * len(prompts)
        done = [False] * len(prompts)
        steps = generate(self.model, ids, mask, max_new_tokens=max_new_tokens or self.max_new_tokens,
                         do_sample=self.temperature > 0, temperature=self.temperature or 1.0, top_p=self.top_p,
                         alpha_0=self.alpha_0, alpha_tilde=self.alpha_tilde, eos_token_id=self.eos,
                         pad_token_id=self.pad, generator=self.rng, stream=True,
                         adapters=self.names if self.weights is not None else None, weights=self.weights)
        for tok, finished in steps:
            for i, t in enumerate(tok.tolist()):
                if done[i]:
                    continue
                if t not in self.eos:
                    new[i].append(t)
                text = self.tokenizer.decode(new[i], skip_special_tokens=True)
                if bool(finished[i]):  # the rest, including a held-back partial character
                    done[i] = True
                    yield i, text[len(shown[i]):], True
                elif not text.endswith("\ufffd") and len(text) > len(shown[i]):  # else: wait for the rest of a
                    yield i, text[len(shown[i]):], False                           # multi-byte character
                    shown[i] = text
        for i in range(len(prompts)):
            if not done[i]:
                yield i, "", True

    def answer(self, prompts: Sequence) -> list[str]:
        texts = [""] * len(prompts)
        for i, piece, _ in self.stream(prompts):
            texts[i] += piece
        return [t.strip() for t in texts]


def _read_prompts(path: Optional[str]) -> list:
    """One prompt per line; a line that is a JSON object takes its 'prompt' (a string or a list of messages)."""
    f = open(path) if path and path != "-" else sys.stdin
    prompts = []
    with f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"{path or '<stdin>'}:{n}: not JSON: {err}") from None
                if "prompt" not in row:
                    raise SystemExit(f"{path or '<stdin>'}:{n}: a JSON line needs a 'prompt' key")
                prompts.append(row["prompt"])
            else:
                prompts.append(line)
    return prompts


def cmd_generate(argv: list[str]) -> int:
    p = _use_parser("generate", "Answer prompts with the customized policy (chat template applied). Prompts: one "
                                "per line, or JSON lines with 'prompt' (text or messages), from --input or stdin. "
                                "Answers stream to stdout in prompt order (one per line, batched underneath), or "
                                "go to JSON lines (--output FILE, --jsonl for stdout).")
    p.add_argument("--input", default=None, help="prompt file (default: stdin)")
    p.add_argument("--output", default=None, help="write JSON lines {prompt, response, alpha_0, ...} to this file")
    p.add_argument("--jsonl", action="store_true", help="JSON lines on stdout instead of streamed text")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be >= 1")
    gen = Generator(args)  # first: a bad adapter or dial fails before any input is read
    prompts = _read_prompts(args.input)
    if not prompts:
        raise SystemExit("no prompts (empty input)")
    out = open(args.output, "w") if args.output else (sys.stdout if args.jsonl else None)
    try:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            texts, done, cur = [""] * len(chunk), [False] * len(chunk), 0
            for i, piece, finished in gen.stream(chunk):
                texts[i] += piece
                done[i] = done[i] or finished
                if out is not None:
                    continue
                if i == cur:  # the row being shown streams; later rows wait in texts[] until their turn
                    print(piece, end="", flush=True)
                while cur < len(chunk) and done[cur]:
                    print(flush=True)
                    cur += 1
                    if cur < len(chunk):
                        print(texts[cur], end="", flush=True)
            if out is None:
                continue
            for prompt, text in zip(chunk, texts):
                rec = {"prompt": prompt, "response": text.strip(), "alpha_0": gen.alpha_0,
                       "alpha_tilde": gen.alpha_tilde}
                if gen.weights is not None:
                    rec["weights"] = dict(zip(gen.names, gen.weights))
                out.write(json.dumps(rec) + "\n")
            out.flush()
    finally:
        if args.output and out is not None:
            out.close()
    return 0


def cmd_chat(argv: list[str]) -> int:
    p = _use_parser("chat", "Talk to the customized policy. Commands: /reset (new conversation), "
                            "/alpha_0 X, /alpha_tilde X (turn the dial), /quit.")
    args = p.parse_args(argv)
    gen = Generator(args)
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            continue
        if line.startswith(("/alpha_0 ", "/alpha_tilde ")):
            key, _, value = line[1:].partition(" ")
            try:
                v = float(value)
            except ValueError:
                print(f"/{key} needs a number", file=sys.stderr)
                continue
            if (key == "alpha_0" and v < 0) or (key == "alpha_tilde" and v <= 0):
                print("need alpha_0 >= 0 and alpha_tilde > 0", file=sys.stderr)
                continue
            setattr(gen, key, v)
            continue
        history.append({"role": "user", "content": line})
        print("assistant> " if interactive else "", end="", flush=True)
        text = ""
        for _, piece, done in gen.stream([history]):
            text += piece
            print(piece, end="\n" if done else "", flush=True)
        history.append({"role": "assistant", "content": text.strip()})
    return 0


def cmd_serve(argv: list[str]) -> int:
    from pipelines.serve import serve_main

    return serve_main(argv)


USE = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**{k: v[1] for k, v in STAGES.items()},
                "generate": "answer prompts from a file or stdin (JSONL out)", "chat": "interactive conversation",
                "serve": "OpenAI-compatible HTTP API on Ray Serve"}
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\ncommands:")
        for k, v in commands.items():
            print(f"  {k:11s}{v}")
        print("\n`qadapter <command> --help` lists a command's options and the config keys it reads.")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    if cmd in STAGES:
        return _stage(cmd, rest)
    if cmd in USE:
        return USE[cmd](rest) or 0
    print(f"qadapter: unknown command {cmd!r}; one of {', '.join(commands)}", file=sys.stderr)
    return 2
