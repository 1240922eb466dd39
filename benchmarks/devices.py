"""Where a speed benchmark runs: CUDA in bf16 when a GPU is present (or asked for), else the CPU in fp32.

    --device auto|cpu|cuda    auto: cuda when torch sees a GPU
    --dtype auto|float32|bfloat16|float16    auto: bfloat16 on a GPU that has it (else float16), float32 on the CPU

Timings synchronise the GPU before and after (its kernels run asynchronously). Nothing here needs a GPU:
on a machine without one, auto is the CPU and --device cuda is refused with the reason."""
from __future__ import annotations

import time

import torch


def add_device_args(ap) -> None:
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when a GPU is present, else cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 (float16 where it lacks bf16) on a GPU, float32 on the CPU")


def pick(args) -> tuple:
    """-> (torch.device, torch.dtype) from --device / --dtype."""
    want = args.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no GPU (torch.cuda.is_available() is False); "
                         "use --device cpu or auto")
    device = torch.device(want)
    if args.dtype != "auto":
        return device, getattr(torch, args.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def read_bandwidth(device="cpu", mb: int = 1024, reps: int = 5) -> float:
    """Bytes per second that a sum over a `mb` MB fp32 tensor on `device` reads (the best of `reps`):
    the ceiling of batch-1 decode, which reads every weight once per token."""
    x = torch.ones(mb * 2 ** 20 // 4, device=device)
    x.sum()
    return x.numel() * 4 / min(timed(x.sum, device) for _ in range(reps))


def describe(device, dtype) -> dict:
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return {"device": name, "dtype": str(dtype).replace("torch.", "")}
