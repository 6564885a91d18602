"""Serve the customized policy behind an OpenAI-compatible HTTP API, on Ray Serve.

    qadapter serve --adapter runs/default/train/qadapter-<key>/adapter [--port 8000]
    serve run configs/serve.yaml                                  # the same app from a config (KubeRay RayService)

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` = server-sent
events, ``data: {...}`` chunks then ``data: [DONE]``). Every route wants ``Authorization: Bearer <token>`` (401
without it); the token comes from a file (``token_file`` / $QADAPTER_API_TOKEN_FILE) or $QADAPTER_API_TOKEN.

The policy: softmax((Q + alpha_0 log pi_pre) / alpha_tilde), both passes of every step in one decoder call
(qcore.generation, PEFT mixed-adapter batch). Extra body fields, per request (the OpenAI client's ``extra_body``):
``alpha_0`` (>= 0), ``alpha_tilde`` (> 0) - default: the adapter's qadapter.json - and ``weights`` ({adapter: w}
or a list in /v1/models order) to compose several adapters loaded on the same base (qcore.compose).
``temperature`` 0 = greedy (OpenAI's default is 1: sampling), ``top_p``, ``seed``, ``max_tokens``, ``stop``.

Batching: concurrent requests are collected by ``@serve.batch`` (max_batch_size, batch_wait_timeout_s) and decoded
as one batch, each row with its own dial, limits and sampler; the batch stops when its last row is done (static
batching: a request arriving meanwhile waits for the next batch). A request is validated before it joins a batch:
a bad one (unknown model, alpha_tilde <= 0, over-long prompt, ...) gets a 4xx with an OpenAI-style error body and
never reaches the model.
"""
# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation of the class-based
# routes (as strings it took `request` for a query parameter: 422 on every call).
import asyncio
import hmac
import json
import logging
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from ray import serve  # noqa: E402

log = logging.getLogger("qadapter.serve")

TOKEN_ENV = "QADAPTER_API_TOKEN"
TOKEN_FILE_ENV = "QADAPTER_API_TOKEN_FILE"
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
               "response_format": (None,)}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def read_token(token_file: Optional[str] = None, token_env: str = TOKEN_ENV) -> str:
    """The bearer token: token_file, else the file named by $QADAPTER_API_TOKEN_FILE, else $QADAPTER_API_TOKEN."""
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"API token file {p} not found")
        token = p.read_text().strip()
        where = str(p)
    else:
        token, where = os.environ.get(token_env, "").strip(), f"${token_env}"
    if not token:
        raise ValueError(f"no API token: set token_file, ${TOKEN_FILE_ENV} or ${token_env} (or auth: false to serve "
                         f"without authentication, e.g. behind your own gateway)")
    if len(token) < 16:
        raise ValueError(f"the API token in {where} is too short ({len(token)} chars, want >= 16)")
    return token


@dataclass
class Job:
    """One row of a decode batch: a validated request (one prompt)."""
    ids: list[int]
    model: str
    max_new_tokens: int
    alpha_0: float
    alpha_tilde: float
    weights: Optional[list[float]]  # one per loaded adapter; None = the model's adapter alone, weight 1
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: list[str]


def _number(body: dict, key: str, default, lo=None, lo_open=False, hi=None):
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"'{key}' must be a number, got {v!r}", param=key)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise APIError(400, f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", param=key)
    if hi is not None and v > hi:
        raise APIError(400, f"'{key}' must be <= {hi}, got {v}", param=key)
    return float(v)


api = FastAPI(title="Q-Adapter (customized policy), OpenAI-compatible")


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError):
    return err.response()


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(api)
class QAdapterServer:
    """One replica: the base model with every adapter loaded (inference only), the tokenizer, the batch queue."""

    def __init__(self, base: str, adapters: dict[str, str], dtype: str = "float32", max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.02, max_prompt_tokens: Optional[int] = None,
                 max_tokens_limit: int = 1024, default_max_tokens: int = 64, auth: bool = True,
                 token_file: Optional[str] = None, token_env: str = TOKEN_ENV, num_threads: int = 0,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoTokenizer

        from qcore.base_models import resolve_model_path
        from qcore.compose import load_adapters
        from qcore.generation import eos_ids

        self.token = read_token(token_file, token_env) if auth else None
        if num_threads:
            torch.set_num_threads(num_threads)
        base = resolve_model_path(base)
        self.tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
        self.model = load_adapters(base, adapters, dtype=dtype, trust_remote_code=trust_remote_code)
        self.names = list(adapters)
        tok = self.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos = sorted(set(eos_ids(self.model)) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.max_prompt_tokens = max_prompt_tokens or self.context
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self._model_lock = threading.Lock()  # one decode thread at a time (the mixed-batch hooks are per model)
        self._decode.set_max_batch_size(max_batch_size)
        self._decode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    # ---------------------------------------------------------------------------------------------- checks
    def _auth(self, request: Request):
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise APIError(401, "missing or invalid API token (Authorization: Bearer <token>)",
                           code="invalid_api_key", type_="authentication_error")

    async def _body(self, request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any unparsable body
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def _job(self, body: dict, ids: list[int]) -> Job:
        model = body.get("model")
        if model not in self.names:
            raise APIError(404, f"The model '{model}' does not exist; this server has {self.names}", param="model",
                           code="model_not_found")
        for key, allowed in UNSUPPORTED.items():
            if key in body and body[key] not in allowed:
                raise APIError(400, f"'{key}' is not supported by this server", param=key)
        n = body.get("n", 1)
        if n not in (None, 1):
            raise APIError(400, "only n = 1 is supported", param="n")
        d0, dt = self.model.dials[model]
        alpha_0 = _number(body, "alpha_0", d0, lo=0)
        alpha_tilde = _number(body, "alpha_tilde", dt, lo=0, lo_open=True)
        weights = self._weights(body.get("weights"))
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_new = _number(body, max_key, self.default_max_tokens, lo=1, hi=self.max_tokens_limit)
        if max_new != int(max_new):
            raise APIError(400, f"'{max_key}' must be an integer", param=max_key)
        temperature = _number(body, "temperature", 1.0, lo=0)
        top_p = _number(body, "top_p", 1.0, lo=0, lo_open=True, hi=1)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, "'seed' must be an integer", param="seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = self.max_prompt_tokens
        if limit and len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server accepts at most {limit}",
                           param="prompt", code="context_length_exceeded")
        if self.context and len(ids) + int(max_new) > self.context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({int(max_new)}) exceeds the model's "
                                f"context of {self.context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return Job(ids, model, int(max_new), alpha_0, alpha_tilde, weights, temperature, top_p, seed, stop)

    def _weights(self, w) -> Optional[list[float]]:
        if w is None:
            return None
        if isinstance(w, dict):
            unknown = sorted(set(w) - set(self.names))
            if unknown:
                raise APIError(400, f"'weights' names unknown adapters {unknown}; loaded: {self.names}",
                               param="weights")
            w = [w.get(n, 0.0) for n in self.names]
        if not isinstance(w, list) or len(w) != len(self.names) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
            raise APIError(400, f"'weights' must be {{adapter: number}} or a list of {len(self.names)} numbers",
                           param="weights")
        return [float(x) for x in w]

    # ---------------------------------------------------------------------------------------------- decoding
    def _steps(self, jobs: list[Job]):
        import torch

        from qcore.generation import generate, left_pad

        ids, mask = left_pad([j.ids for j in jobs], self.pad, self.model.device)
        composed = any(j.weights is not None for j in jobs) or len({j.model for j in jobs}) > 1
        if composed:  # one row block per loaded adapter; a plain request is the one-hot row of its adapter
            adapters = self.names
            weights = torch.tensor([j.weights if j.weights is not None else
                                    [float(n == j.model) for n in self.names] for j in jobs])
        else:  # every row on the same adapter alone: the ordinary customized policy, bit for bit
            adapters, weights = [jobs[0].model], None
        a0 = torch.tensor([j.alpha_0 for j in jobs])
        sample = [j.temperature > 0 for j in jobs]
        gens = None
        if any(sample):
            gens = [torch.Generator().manual_seed(j.seed if j.seed is not None else secrets.randbits(63))
                    for j in jobs]
        return generate(self.model, ids, mask, max_new_tokens=[j.max_new_tokens for j in jobs],
                        do_sample=torch.tensor(sample), temperature=torch.tensor([j.temperature or 1.0 for j in jobs]),
                        top_p=torch.tensor([j.top_p for j in jobs]), alpha_0=a0,
                        alpha_tilde=torch.tensor([j.alpha_tilde for j in jobs]), eos_token_id=self.eos,
                        pad_token_id=self.pad, generator=gens, need_base=bool((a0 > 0).any()) or composed,
                        adapters=adapters, weights=weights, stream=True)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _decode(self, jobs: list[Job]):
        """Yields, per decode step, one (token, finished) per job (StopIteration once a job is done)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():  # the forwards run on a thread: the replica keeps answering (health checks, new requests)
            with self._model_lock:
                try:
                    steps = self._steps(jobs)
                    try:
                        for tok, fin in steps:
                            loop.call_soon_threadsafe(queue.put_nowait, ("step", tok.tolist(), fin.tolist()))
                            if cancel.is_set():
                                break
                    finally:
                        steps.close()  # removes the mixed-batch hooks now, not at garbage collection
                    loop.call_soon_threadsafe(queue.put_nowait, ("end", None, None))
                except BaseException as err:  # noqa: BLE001 - handed to every waiting request
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", err, None))

        threading.Thread(target=work, daemon=True, name="qadapter-decode").start()
        done = [False] * len(jobs)
        try:
            while True:
                kind, a, b = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise a
                out = []
                for i, (tok, fin) in enumerate(zip(a, b)):
                    out.append(StopIteration if done[i] else (tok, fin))
                    done[i] = done[i] or fin
                yield out
        finally:
            cancel.set()

    async def _pieces(self, job: Job):
        """Yields (text piece, finish_reason | None, completion tokens) for one job; the last has a reason."""
        new: list[int] = []
        shown = text = ""
        async for tok, fin in self._decode(job):
            if tok in self.eos:  # the rest (text held back for a stop string or a partial character)
                yield text[len(shown):], "stop", len(new) + 1
                return
            new.append(tok)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            hit = min((text.find(s) for s in job.stop if s in text), default=-1)
            if hit >= 0:
                yield text[len(shown):hit] if hit > len(shown) else "", "stop", len(new)
                return
            if fin:
                yield text[len(shown):], "length", len(new)
                return
            hold = max((len(s) - 1 for s in job.stop), default=0)  # a stop string may be cut across tokens
            ready = len(text) - hold
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                ready = min(ready, len(text) - 1)
            if ready > len(shown):
                yield text[len(shown):ready], None, len(new)
                shown = text[:ready]
        yield "", "length", len(new)

    async def _complete(self, job: Job) -> tuple[str, str, int]:
        text, reason, n = "", "length", 0
        async for piece, reason_, n in self._pieces(job):
            text += piece
            reason = reason_ or reason
        return text, reason, n

    # ---------------------------------------------------------------------------------------------- routes
    def _dial(self, job: Job) -> dict:
        out = {"alpha_0": job.alpha_0, "alpha_tilde": job.alpha_tilde}
        if job.weights is not None:
            out["weights"] = dict(zip(self.names, job.weights))
        return out

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        data = [{"id": n, "object": "model", "created": self.created, "owned_by": "qadapter",
                 "alpha_0": self.model.dials[n][0], "alpha_tilde": self.model.dials[n][1]} for n in self.names]
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        """Raw-text continuation (no chat template; BOS where the model expects one), as OpenAI's completions."""
        from qcore.data import prepend_bos

        self._auth(request)
        body = await self._body(request)
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        jobs = [self._job(body, prepend_bos(self.tokenizer(p, add_special_tokens=False)["input_ids"], self.tokenizer))
                for p in prompts]
        rid, model = f"cmpl-{uuid.uuid4().hex}", body["model"]
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "qadapter": self._dial(jobs[0])}
        if body.get("stream"):
            if len(jobs) > 1:
                raise APIError(400, "streaming takes one prompt", param="prompt")

            async def events():
                async for piece, reason, _ in self._pieces(jobs[0]):
                    chunk = {**head, "choices": [{"text": piece, "index": 0, "logprobs": None,
                                                  "finish_reason": reason}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        results = await asyncio.gather(*(self._complete(j) for j in jobs))
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r} for i, (t, r, _) in enumerate(results)]
        completion = sum(n for _, _, n in results)
        prompt_tokens = sum(len(j.ids) for j in jobs)
        return {**head, "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                                      "total_tokens": prompt_tokens + completion}}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """A conversation, rendered with the tokenizer's chat template (qcore.data.encode_prompt, as in training)."""
        from qcore.data import encode_prompt

        self._auth(request)
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(content, str):
                raise APIError(400, f"messages[{i}] needs a role (system|user|assistant) and text content",
                               param="messages")
            clean.append({"role": m["role"], "content": content})
        try:
            ids = encode_prompt(clean, self.tokenizer)
        except ValueError as err:  # the chat template refused the conversation
            raise APIError(400, f"messages: {err}", param="messages") from None
        job = self._job(body, ids)
        rid, model = f"chatcmpl-{uuid.uuid4().hex}", body["model"]
        head = {"id": rid, "created": int(time.time()), "model": model, "qadapter": self._dial(job)}
        if body.get("stream"):
            async def events():
                delta = {"role": "assistant", "content": ""}
                first = {**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                yield f"data: {json.dumps(first)}\n\n"
                async for piece, reason, _ in self._pieces(job):
                    delta = {"content": piece} if piece or reason is None else {}
                    chunk = {**head, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        text, reason, n = await self._complete(job)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}


def app_builder(args: dict[str, Any]):
    """``serve run pipelines.serve:app_builder base=... adapters=...`` / configs/serve.yaml's ``args`` (Serve wants
    a builder of exactly one argument; the deployment options go in the YAML's ``deployments``)."""
    return build_app(args)


def build_app(args: dict[str, Any], options: Optional[dict] = None):
    """The Serve application: ``args`` are QAdapterServer's keyword arguments, ``adapters`` a {name: dir} mapping
    or one dir (named 'qadapter'); ``options``: deployment options (num_replicas, ray_actor_options, ...)."""
    import inspect

    args = dict(args)
    adapters = args.pop("adapters", None) or args.pop("adapter", None)
    if isinstance(adapters, str):
        adapters = {"qadapter": adapters}
    if not adapters or not isinstance(adapters, dict):
        raise ValueError("serve app: 'adapters' ({name: adapter dir}) is required")
    if "base" not in args:
        from qcore.compose import base_model_of

        args["base"] = base_model_of(next(iter(adapters.values())))
        if not args["base"]:
            raise ValueError("serve app: 'base' is required (the adapter records no base model)")
    # serve.ingress subclasses the class with a (*args, **kwargs) __init__: read ours further up the MRO
    params = next(p for c in QAdapterServer.func_or_class.__mro__
                  if "base" in (p := inspect.signature(c.__init__).parameters))
    unknown = set(args) - set(params)
    if unknown:
        raise ValueError(f"serve app: unknown args {sorted(unknown)}")
    batch = int(args.get("max_batch_size", 16))
    opts = {"max_ongoing_requests": max(64, 4 * batch), **(options or {})}
    return QAdapterServer.options(**opts).bind(adapters=adapters, **args)


def default_token_file() -> Path:
    """~/.cache/qadapter/serve_token: created once (0600) when no token is configured."""
    p = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qadapter" / "serve_token"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return p


def serve_main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="qadapter serve", description=__doc__.split("\n\n")[0],
                                epilog="config keys read (with --config): model.path, model.dtype, "
                                       "model.trust_remote_code, eval.max_new_tokens (the default max_tokens)")
    p.add_argument("--adapter", action="append", required=True, metavar="[NAME=]DIR",
                   help="adapter directory; repeat NAME=DIR to serve several (each a model; compose with 'weights')")
    p.add_argument("--base", default=None, help="base model (default: model.path of --config, else the adapter's)")
    p.add_argument("--config", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", default=None, help=f"bearer token file (else ${TOKEN_FILE_ENV}, ${TOKEN_ENV}, "
                                                       f"else one is created in ~/.cache/qadapter/serve_token)")
    p.add_argument("--no-auth", action="store_true", help="serve without authentication (behind your own gateway)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (Ray resources)")
    p.add_argument("--num-gpus", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per replica (0: torch's default)")
    args = p.parse_args(argv)

    import ray

    from qadapter.cli import _adapters
    from qcore.config import load_config

    adapters = {n: str(Path(d).resolve()) for n, d in _adapters(args.adapter).items()}
    cfg = load_config(args.config, []) if args.config else None
    kw: dict[str, Any] = {"adapters": adapters, "max_batch_size": args.max_batch_size,
                          "batch_wait_timeout_s": args.batch_wait_ms / 1000, "max_tokens_limit": args.max_tokens_limit,
                          "num_threads": args.threads, "auth": not args.no_auth,
                          "dtype": args.dtype or (cfg.model.dtype if cfg else "float32")}
    if args.base or cfg:
        kw["base"] = args.base or cfg.model.path
    if cfg:
        kw["default_max_tokens"] = cfg.eval.max_new_tokens
        kw["trust_remote_code"] = cfg.model.trust_remote_code
    if args.max_prompt_tokens:
        kw["max_prompt_tokens"] = args.max_prompt_tokens
    token_file = None
    if not args.no_auth:
        token_file = args.token_file or os.environ.get(TOKEN_FILE_ENV)
        if not token_file and not os.environ.get(TOKEN_ENV):
            token_file = str(default_token_file())
        if token_file:
            kw["token_file"] = str(Path(token_file).expanduser().resolve())
        read_token(kw.get("token_file"))  # fail here, not in the replica
    app = build_app(kw, options={"num_replicas": args.num_replicas,
                               "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}})
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="qadapter", route_prefix="/")
    print(f"serving {list(adapters)} at http://{args.host}:{args.port}/v1 (OpenAI-compatible)")
    if token_file:
        print(f"bearer token: in {kw['token_file']}  (e.g. export OPENAI_API_KEY=$(cat {kw['token_file']}))")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(serve_main())
