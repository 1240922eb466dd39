"""DDP on CPU (gloo) under torchrun: 2 processes x half the batch == 1 process x the whole batch,
and a DDP run resumed from a checkpoint matches an uninterrupted DDP run exactly.

Run as a test it launches itself under `torchrun --nproc_per_node 2` (this file's __main__)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

STEPS = 20


def run_tiny(out=None, grad_accum=1, stop_at=None, resume=False, max_steps=STEPS):
    """The same tiny run in every process: same init, same data seed, global batch 8."""
    from allformers import Config, TransformerLM
    from allformers.objectives import CausalLM
    from allformers.training import RandomWindows, TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    data = torch.randint(32, (4000,), generator=g)
    data[1::2] = (data[::2] * 7 + 3) % 32  # something to learn
    torch.manual_seed(0)
    model = TransformerLM(Config(name="tiny", vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(max_steps=max_steps, batch_size=8, grad_accum=grad_accum, warmup_steps=5, lr=3e-3,
                      min_lr=3e-4, log_interval=1, eval_interval=0, eval_at_start=False,
                      checkpoint_interval=10 if out else 0, threads=1)
    trainer = Trainer(model, CausalLM(), RandomWindows(data, 16, seed=0), cfg, out=out, progress=False)
    if resume:
        trainer.load_checkpoint()
    trainer.fit(stop_at=stop_at)
    return trainer


def test_two_processes_equal_one(tmp_path):
    result = tmp_path / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(result), str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads(result.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_tiny().history_train_losses()
    finally:
        torch.set_num_threads(threads)
    assert ddp["world_size"] == 2 and len(single) == STEPS
    for key in ("plain", "accum"):  # 2 ranks x 4 rows, and 2 ranks x 2 micro-batches x 2 rows
        assert max(abs(a - b) for a, b in zip(ddp[key], single)) < 1e-5, (key, ddp[key], single)
    assert ddp["resumed"] == ddp["plain"]  # DDP resume is exact too


if __name__ == "__main__":  # one torchrun worker
    import torch.distributed as dist

    out, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    plain = run_tiny()
    accum = run_tiny(grad_accum=2)
    run_tiny(out=ckpt, stop_at=10)  # interrupted after the step-10 checkpoint
    resumed = run_tiny(out=ckpt, resume=True)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"world_size": dist.get_world_size(), "plain": plain.history_train_losses(),
                                   "accum": accum.history_train_losses(),
                                   "resumed": resumed.history_train_losses()}))
    # Both ranks reach here before either tears gloo down: without it, one rank's teardown while the
    # other still wrote its result once aborted the other ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
