"""benchmarks/bench_dialogue.py --quick runs both parts on the real SmolLM2 and prints, last, one JSON
object with the acceptance keys (the numbers come from the full run, not from this test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_prints_the_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALLFORMERS_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dialogue.py"), "--quick", "--threads", "1",
                          "--no-progress", "--tool-test", "6", "--sparrow-test", "4"],
                         capture_output=True, text=True, env=env, timeout=1800, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    tools, sparrow = result["tools"], result["sparrow"]
    for key in ("accuracy_without_tool", "accuracy_base_offered_tool", "accuracy_with_tool", "tool_call_rate"):
        assert 0.0 <= tools[key] <= 1.0, key
    assert tools["test_questions"] == 6 and tools["sft"]["steps"] == 6
    for key in ("accuracy_plain", "accuracy_sparrow", "accuracy_sparrow_with_citation", "retrieval_recall_at_k",
                "accuracy_oracle_candidate"):
        assert 0.0 <= sparrow[key] <= 1.0, key
    assert sparrow["accuracy_oracle_candidate"] >= sparrow["accuracy_sparrow"]  # the pick is one of the candidates
    assert sparrow["test_questions"] == 4 and result["cpu_s"] > 0
