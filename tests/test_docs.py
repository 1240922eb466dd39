"""Every Python example in docs/*.md runs, file by file, in order, as written (like tests/test_readme.py).

A block whose first line is `# slow` runs in the slow suite; one whose first line starts with
`# not run:` says why it cannot run here (a 30-minute job, a file the reader brings) and is only
compiled, so a syntax error in it still fails."""
import os
import re
from pathlib import Path

import pytest

DOCS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))


def blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)


def _run(doc: Path, codes: list[str], tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples write under runs/
    try:
        env = {"__name__": "__docs__"}  # one namespace per file: later blocks build on earlier ones
        for i, code in enumerate(codes):
            compiled = compile(code, f"{doc.name} python block {i + 1}", "exec")
            if not code.startswith("# not run:"):
                exec(compiled, env)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("doc", [d for d in DOCS if any(not b.startswith("# slow") for b in blocks(d))],
                         ids=lambda d: d.name)
def test_doc_examples_run(doc, tmp_path):
    _run(doc, [b for b in blocks(doc) if not b.startswith("# slow")], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(b.startswith("# slow") for b in blocks(d))],
                         ids=lambda d: d.name)
def test_doc_slow_examples_run(doc, tmp_path):
    _run(doc, [b for b in blocks(doc) if b.startswith("# slow")], tmp_path)
