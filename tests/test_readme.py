"""Every Python example in the README runs, in order, as written. Blocks whose first line is
`# slow` (real models) run in the slow suite."""
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(blocks, tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples write under runs/
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


def test_readme_examples_run(tmp_path):
    _run([b for b in BLOCKS if not b.startswith("# slow")], tmp_path)


@pytest.mark.slow
def test_readme_real_model_examples_run(tmp_path):
    slow = [b for b in BLOCKS if b.startswith("# slow")]
    assert slow
    _run(slow, tmp_path)
