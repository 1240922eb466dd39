"""benchmarks/bench_speculative.py --quick on the real SmolLM2 prints, last, one JSON object with the
acceptance keys, and its speculative outputs equal plain greedy's (the timings are not asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_prints_the_keys_and_is_identical():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_speculative.py"), "--quick", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=900, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("speculative_ratio", "plain_tok_s", "speculative_tok_s", "acceptance_rate", "tokens_per_target_pass"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["identical"] is True
    assert result["new_tokens"] > 0 and result["quick"] is True
