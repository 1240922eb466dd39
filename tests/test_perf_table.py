"""The README's performance table is generated from benchmarks/results/*.json (benchmarks/perf_table.py)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("perf_table", ROOT / "benchmarks" / "perf_table.py")
perf_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(perf_table)


def test_the_readme_table_is_the_generated_one():
    assert (ROOT / "benchmarks" / "results" / "decoder.json").exists()
    assert perf_table.main(["--check", str(ROOT / "README.md")]) == 0


def test_rows_from_a_decoder_result(tmp_path):
    (tmp_path / "decoder.json").write_text(json.dumps({
        "forward_tok_s": 2000.4, "forward_tok_s_hf": 1000.0, "forward_ratio": 2.0004, "decode_tok_s": 30.25,
        "decode_tok_s_hf": 20.0, "decode_ratio": 1.5125, "batch": 8, "seq": 256}))
    block = perf_table.table(tmp_path).splitlines()
    assert block[0] == perf_table.BEGIN and block[-1] == perf_table.END
    assert block[3] == ("| GPT-2 124M forward, batch 8 × 256, fp32 | 2,000 tok/s | 1,000 tok/s | 2.00× | ≥ 1.15× "
                        "| `bench_decoder.py` |")
    assert block[4] == ("| GPT-2 124M greedy decode, batch 1, fp32 (share of the measured memory bandwidth) | 30.2 tok/s "
                        "| 20.0 tok/s | 1.51× | ≥ 1.4×, ≥ 80% of bandwidth | `bench_decoder.py` |")
    assert len(block) == 6  # the other benchmarks' files are absent: their rows are left out
    full = json.loads((tmp_path / "decoder.json").read_text())
    (tmp_path / "decoder.json").write_text(json.dumps({**full, "decode_bandwidth_fraction": 0.761,
                                                       "decode_bandwidth_fraction_hf": 0.5}))
    assert "| 30.2 tok/s (76% of bandwidth) | 20.0 tok/s (50% of bandwidth) |" in perf_table.table(tmp_path)


def test_write_then_check(tmp_path):
    (tmp_path / "train_step.json").write_text(json.dumps({
        "model": "m", "batch": 4, "seq": 256, "train_tok_s": 150.0, "train_tok_s_hf": 100.0, "mfu": 0.5,
        "train_step_ratio": 1.5}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{perf_table.BEGIN}\nstale\n{perf_table.END}\noutro\n")
    assert perf_table.main(["--check", str(readme), "--results", str(tmp_path)]) == 1
    assert perf_table.main(["--write", str(readme), "--results", str(tmp_path)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "stale" not in text
    assert "| 150 tok/s (MFU 50%) | 100 tok/s | 1.50× | ≥ 1.2× |" in text
    assert perf_table.main(["--check", str(readme), "--results", str(tmp_path)]) == 0


def test_errors_name_the_file_and_the_fix(tmp_path):
    (tmp_path / "seq2seq.json").write_text('{"greedy_tok_s": 1}')
    with pytest.raises(SystemExit, match="seq2seq.json: not the JSON line its benchmark prints last"):
        perf_table.table(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    (tmp_path / "seq2seq.json").unlink()
    with pytest.raises(SystemExit, match="the README has no generated table"):
        perf_table.main(["--check", str(readme), "--results", str(tmp_path)])
