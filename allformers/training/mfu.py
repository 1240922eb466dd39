"""Model FLOPs utilisation: the FLOP/s a run achieves divided by what this machine can do.

The peak is measured, not looked up: a few large fp32 matmuls are timed once per process
(~0.5 s), so MFU means the same thing on a laptop CPU and on a GPU. On the CPU in fp32 the peak is
the faster of torch.matmul (MKL) and oneDNN's packed matmul (models/packed.py, what inference runs
on): on some CPUs (this machine's AMD EPYC) MKL reaches half of what the cores can do."""
from __future__ import annotations

import time

import torch

_PEAK_CACHE: dict = {}


def measured_peak_flops(device="cpu", dtype=torch.float32, n: int = 2048, seconds: float = 0.5) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul over ~`seconds`, cached per (device, dtype, threads)."""
    device = torch.device(device)
    key = (device.type, device.index, dtype, torch.get_num_threads())
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up: thread pool, allocator, kernel choice
    sync()
    kernels = [lambda: torch.matmul(a, b)]
    if device.type == "cpu" and dtype == torch.float32:
        from ..models.packed import onednn_available, pack_weight, packed_linear

        if onednn_available():  # (building a module to ask would draw from the global RNG: exact resume)
            packed = pack_weight(b.t().contiguous())  # a @ b as a Linear with weight b^T

            def onednn():
                with torch.inference_mode():
                    packed_linear(a, packed, None)
            onednn()  # warm-up
            kernels.append(onednn)
    best = float("inf")
    for kernel in kernels:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / len(kernels):
            t = time.perf_counter()
            kernel()
            sync()
            best = min(best, time.perf_counter() - t)
    _PEAK_CACHE[key] = 2 * n ** 3 / best
    return _PEAK_CACHE[key]


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: everything but lookup-only embeddings.
    Position tables are lookups; the token table counts only when it is tied to the LM head."""
    n = sum(p.numel() for p in model.parameters())
    wpe = getattr(model, "wpe", None)
    if isinstance(getattr(wpe, "weight", None), torch.nn.Parameter):
        n -= wpe.weight.numel()
    wte = getattr(model, "wte", None)
    if wte is not None and getattr(model, "lm_head", None) is not None:  # untied: the table is a lookup
        n -= wte.weight.numel()
    return n


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 * L * H * Q * T
    (forward + backward of the weights, plus the attention scores and their weighted sum)."""
    c = model.config
    return 6 * matmul_params(model) + 12 * c.n_layer * c.n_head * c.head_dim * seq_len
