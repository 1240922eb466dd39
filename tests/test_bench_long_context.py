"""benchmarks/bench_long_context.py --quick runs every section of this checkout and prints, last, one JSON
object with the acceptance keys (the numbers themselves come from the full run, not from this test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_prints_the_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_long_context.py"), "--quick",
                          "--sections", "moe,local,ctrl", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=900, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("moe_loss", "dense_loss", "moe_dropped_fraction", "ctrl_code_accuracy"):
        assert isinstance(result[key], float), key
    assert set(result["local_attention_prefill_ms"]) == set(result["dense_attention_prefill_ms"]) == {"256", "512"}
    # Equal active parameters but for the routers (one n_embd x n_expert matrix per layer).
    assert result["moe_params_active"] - result["dense_params"] == result["moe_router_params"]
    # the docs' picture draws from that JSON (the local section and the moe pair; no xl here)
    (tmp_path / "run.json").write_text(out.stdout)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_context_figure.py"), str(tmp_path / "run.json"),
                    "--out", str(tmp_path / "fig.png")], env=env, timeout=120, check=True)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
