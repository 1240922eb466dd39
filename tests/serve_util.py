"""Helpers for the server tests: a tiny chat model and a live uvicorn server on a free port."""
import socket
import threading
import time

import torch

from allformers import Config, TransformerLM
from allformers.tokenization import Tokenizer

PRINTABLE = [10] + list(range(32, 127))  # the bytes the tiny model may write: "\n" and printable ASCII


def tiny_chat_model(name: str = "smollm2-135m", seed: int = 0, **overrides):
    """A random 2-layer model of a zoo family over the byte-level ChatML tokenizer. Weights are
    large enough that logits are far from uniform, and an output bias keeps it to printable
    ASCII (eos only when a request asks for it with logit_bias)."""
    tok = Tokenizer.byte_level()
    kw = dict(n_layer=2, n_embd=64, n_head=4, intermediate_size=128, vocab_size=tok.vocab_size, block_size=256,
              lm_head_bias=True)
    if name.startswith("smollm2"):
        kw["n_kv_head"] = 2
    torch.manual_seed(seed)
    model = TransformerLM(Config.from_name(name, **{**kw, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
        bias = model.lm_head_bias if model.lm_head_bias is not None else model.lm_head.bias
        bias.fill_(-30.0)
        bias[PRINTABLE] = 0.0
    model.tokenizer = tok
    return model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` from a thread on 127.0.0.1:<free port>."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def engine_greedy(model, tok, prompts, max_tokens: int, **engine_kw):
    """Greedy completions of `prompts` (token lists) run together through the batching engine."""
    from allformers.serve.engine import Engine, SamplingParams, Seq

    eng = Engine(model, tok, **{"slots": len(prompts), "prefill_chunk": 8, "step_tokens": 24, **engine_kw})
    seqs = [Seq(p, SamplingParams(max_tokens=max_tokens, temperature=0.0), tok, lambda e: None) for p in prompts]
    eng.submit(seqs)
    while any(s.finish_reason is None for s in seqs):
        eng.step()
    return [s.generated for s in seqs]
