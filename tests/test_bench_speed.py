"""The speed benchmarks added for issue 16 run small and print, last, the JSON keys the README's
performance table is generated from (benchmarks/perf_table.py); timings are not asserted."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def last_json(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=600,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_rows(name: str, result: dict) -> list:
    spec = importlib.util.spec_from_file_location("perf_table", ROOT / "benchmarks" / "perf_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SOURCES[name](result)


@pytest.mark.slow
def test_prefill_curve_small():
    r = last_json(ROOT / "benchmarks" / "bench_prefill.py", "--layers", "2", "--lengths", "64,512", "--reps", "1",
                  "--threads", "1")
    assert [p["tokens"] for p in r["prefill"]] == [64, 512]
    for p in r["prefill"]:
        assert p["tok_s"] > 0 and p["tok_s_hf"] > 0 and p["peak_mb"] >= 0 and p["runs"] == 1
    assert r["longest_vs_shortest"] > 0 and r["n_layer"] == 2
    assert len(table_rows("prefill", r)) == 3


@pytest.mark.slow
def test_train_step_small():
    r = last_json(ROOT / "benchmarks" / "bench_train_step.py", "--layers", "1", "--batch", "2", "--seq", "32",
                  "--steps", "1", "--threads", "1")
    assert abs(r["first_loss"] - r["first_loss_hf"]) < 1e-3  # the same weights and maths on both sides
    assert r["train_tok_s"] > 0 and r["train_tok_s_hf"] > 0 and 0 < r["mfu"] < 1
    assert table_rows("train_step", r)[0][3].endswith("×")


def test_decode_profile_splits_a_run_per_token():
    import torch

    spec = importlib.util.spec_from_file_location("bench_decoder", ROOT / "benchmarks" / "bench_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = torch.randn(256, 256)
    out = mod.decode_profile(lambda: [a @ a for _ in range(4)], new_tokens=4, top=1)
    assert list(out) == ["aten::mm", "other ops"]  # the matmuls dominate this run; the rest is summed
    assert out["aten::mm"] > 0 and out["other ops"] >= 0
