"""The command line: zoo, generate, convert, and errors without tracebacks."""
import json
import subprocess
import sys

import pytest
import torch

from allformers import Config, TransformerLM, load
from allformers.cli.main import main
from allformers.config import REGISTRY
from allformers.tokenization import Tokenizer
from allformers.zoo import count_params

TEXT = "to be or not to be, that is the question. "


@pytest.fixture()
def tiny_dir(tmp_path):
    tok = Tokenizer.char(TEXT)
    torch.manual_seed(0)
    model = TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=1))
    model.save(tmp_path / "tiny", tokenizer=tok)
    return tmp_path / "tiny"


def test_zoo_json_lists_every_config_with_its_size(capsys):
    assert main(["zoo", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(REGISTRY)
    gpt2 = next(r for r in rows if r["name"] == "gpt2")
    assert gpt2["params"] == count_params(Config.from_name("gpt2")) == 124_439_808
    assert all(r["description"] and r["params"] > 0 for r in rows)


def test_zoo_table(capsys):
    main(["zoo"])
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "134.5M" in out and "pythia-70m" in out


def test_generate_streams_text(tiny_dir, capsys):
    assert main(["generate", str(tiny_dir), "to be", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("to be") and len(out.strip()) == len("to be") + 12


def test_generate_batch(tiny_dir, capsys):
    assert main(["generate", str(tiny_dir), "to be", "that is", "--max-new-tokens", "5", "--temperature", "0.8",
                 "--top-k", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.count("---") == 2


def test_convert_to_hf_and_back(tiny_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_dir), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    x = torch.randint(0, 10, (1, 9))
    assert torch.allclose(load(tiny_dir)(x), load(tmp_path / "back")(x), atol=1e-6)


def test_errors_are_one_clear_line(tiny_dir, capsys):
    assert main(["generate", str(tiny_dir / "nope"), "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["generate", str(tiny_dir), "to be " * 20, "--max-new-tokens", "10"]) == 2
    assert "context of 64" in capsys.readouterr().err


def test_entry_point_runs_as_a_program(tiny_dir):
    r = subprocess.run([sys.executable, "-m", "allformers.cli.main", "generate", str(tiny_dir), "to",
                        "--max-new-tokens", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("to")


def test_convert_overwrite_adds_the_checkpoint_beside_user_files(tiny_dir, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    assert main(["convert", str(tiny_dir), str(thesis)]) == 2  # refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err and sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]
    assert main(["convert", str(tiny_dir), str(thesis), "--to", "hf", "--overwrite"]) == 0
    assert (thesis / "thesis.tex").read_text() == "years of work"  # kept, untouched
    x = torch.randint(0, 10, (1, 9))
    assert torch.allclose(load(tiny_dir)(x), load(thesis)(x), atol=1e-6)
    assert main(["convert", str(tiny_dir), str(thesis)]) == 0  # now a checkpoint folder: replaced without --overwrite
    assert (thesis / "thesis.tex").read_text() == "years of work"
