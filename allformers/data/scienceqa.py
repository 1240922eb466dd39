"""ScienceQA (Lu et al. 2022) in its original files, the prompt formats of the Multimodal-CoT
reference code, the answer parser and the paper's results table.

Files: problems.json ({qid: problem}), captions.json ({"captions": {qid: caption}}) and
pid_splits.json ({split: [qid]}); without pid_splits.json the splits come from each problem's
"split" field (the subset in ../shared/data/scienceqa_subset has no pid_splits.json).

Formats, "<input>-<output>" as in the reference (utils_prompt.py, with its build_train_pair):
  QCM-LE   Question, Context, Multiple options -> "Solution: <lecture> <solution>."   (stage 1: rationale)
  QCMG-A   the same input + the (generated) rationale -> "The answer is (X)."        (stage 2: answer)
  QCM-A    no rationale -> "The answer is (X)."                                     (one-stage baseline)
  QCM-ALE  -> "The answer is (X). BECAUSE: <lecture> <solution>"                    (one-stage, explain after)
Whitespace runs are collapsed to single spaces, as the reference's dataset does before tokenizing.

Scoring follows ScienceQA's: NAT / SOC / LAN by subject, TXT = has a text context (hint), IMG = has
an image, NO = neither, G1-6 / G7-12 by grade. An answer that does not parse counts as wrong (the
reference picks a random option instead); how many did not parse is reported."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

from ..errors import AllformersError

OPTIONS = "ABCDE"
FORMATS = ("QCM-LE", "QCMG-A", "QCM-A", "QCM-ALE")
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
ANSWER_RE = re.compile(r"The answer is \(([A-Z])\)")
# Multimodal-CoT, Table 4 (test set, 4,241 questions): the paper's numbers, for comparison.
PAPER = {"Multimodal-CoT Base (223M)": [87.52, 77.17, 85.82, 87.88, 82.90, 86.83, 84.65, 85.37, 84.91],
         "Multimodal-CoT Large (738M)": [95.91, 82.00, 90.82, 95.26, 88.80, 92.89, 92.44, 90.31, 91.68]}


class ScienceQAError(AllformersError, ValueError):
    """A ScienceQA file is missing or malformed, or a format name is unknown."""


# ---------------------------------------------------------------------- loading
def load_scienceqa(root, captions: bool = True) -> tuple[dict, dict]:
    """-> (problems {qid: problem with "caption" added}, splits {split: [qid]})."""
    root = Path(root)
    file = root / "problems.json"
    if not file.is_file():
        raise ScienceQAError(f"no problems.json in {root}; point at a folder with ScienceQA's problems.json "
                             f"(and optionally captions.json, pid_splits.json)")
    problems = json.loads(file.read_text())
    need = ("question", "choices", "answer", "hint", "image", "subject", "grade", "lecture", "solution")
    for qid, p in list(problems.items())[:50]:
        missing = [k for k in need if k not in p]
        if missing:
            raise ScienceQAError(f"{file}: problem {qid} lacks {missing}; is this ScienceQA's problems.json?")
    caps = {}
    if captions and (root / "captions.json").is_file():
        caps = json.loads((root / "captions.json").read_text()).get("captions", {})
    for qid, p in problems.items():
        p["caption"] = caps.get(qid, "") if captions else ""
    if (root / "pid_splits.json").is_file():
        splits = json.loads((root / "pid_splits.json").read_text())
    else:
        splits = {}
        for qid, p in problems.items():
            splits.setdefault(p.get("split", "train"), []).append(qid)
    return problems, {k: [str(q) for q in v] for k, v in splits.items()}


def load_captions(root, split: Optional[str] = None) -> list[str]:
    """The non-empty picture captions of captions.json, whitespace collapsed, in question-id order (text for
    the text towers of CLIP-style models); `split` keeps only that split's questions."""
    root = Path(root)
    file = root / "captions.json"
    if not file.is_file():
        raise ScienceQAError(f"no captions.json in {root}; ScienceQA's captions file is {{\"captions\": {{qid: caption}}}}")
    caps = json.loads(file.read_text()).get("captions", {})
    if split is not None:
        _, splits = load_scienceqa(root, captions=False)
        if split not in splits:
            raise ScienceQAError(f"split {split!r} is not among {sorted(splits)} in {root}")
        keep = set(splits[split])
        caps = {q: c for q, c in caps.items() if q in keep}
    return [_clean(caps[q]) for q in sorted(caps, key=lambda q: (len(q), q)) if caps[q].strip()]


def image_path(root, qid: str, problem: dict) -> Optional[Path]:
    """Where the problem's picture would be: images/<qid>/image.png or images/<split>/<qid>/image.png."""
    if not problem.get("image"):
        return None
    root = Path(root)
    for p in (root / "images" / qid / problem["image"], root / "images" / problem.get("split", "") / qid / problem["image"]):
        if p.is_file():
            return p
    return None


# ---------------------------------------------------------------------- prompts
def _clean(text: str) -> str:
    return " ".join(str(text).split())


def context_text(problem: dict, use_caption: bool = True) -> str:
    caption = problem.get("caption", "") if use_caption else ""
    return " ".join([problem.get("hint", "") or "", caption or ""]).strip() or "N/A"


def choice_text(choices: Sequence[str]) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(choices))


def rationale_text(problem: dict) -> str:
    """The gold rationale, as stage 1 learns to write it (the reference's "Solution: L E." target)."""
    lecture = problem.get("lecture", "").replace("\n", "\\n")
    solution = problem.get("solution", "").replace("\n", "\\n")
    return _clean(f"Solution: {lecture} {solution}.")


def build_pair(problem: dict, fmt: str, rationale: Optional[str] = None, use_caption: bool = True) -> tuple[str, str]:
    """One problem -> (source, target) text in `fmt` (FORMATS). For QCMG-A, `rationale` is the stage-1
    output to condition on; None uses the gold one (how the reference trains stage 2)."""
    if fmt not in FORMATS:
        raise ScienceQAError(f"prompt format {fmt!r} is not one of {FORMATS}")
    if len(problem["choices"]) > len(OPTIONS):
        raise ScienceQAError(f"{len(problem['choices'])} choices; at most {len(OPTIONS)} are lettered")
    lecture = problem.get("lecture", "").replace("\n", "\\n")
    solution = problem.get("solution", "").replace("\n", "\\n")
    q = f"Question: {problem['question']}\nContext: {context_text(problem, use_caption)}\nOptions: {choice_text(problem['choices'])}\n"
    answer = f"({OPTIONS[problem['answer']]})"
    if fmt == "QCMG-A":
        source = q + (f"{rationale}\n" if rationale is not None else f"Solution: {lecture} {solution}\n") + "Answer:"
    else:
        source = q + ("Solution:" if fmt == "QCM-LE" else "Answer:")
    target = {"QCM-LE": f"Solution: {lecture} {solution}.", "QCMG-A": f"The answer is {answer}.",
              "QCM-A": f"The answer is {answer}.", "QCM-ALE": f"The answer is {answer}. BECAUSE: {lecture} {solution}"}[fmt]
    return _clean(source), _clean(target)


def parse_answer(text: str, n_choices: int) -> Optional[int]:
    """"... The answer is (B). ..." -> 1. None when there is no such phrase or the letter is not one of
    the n_choices options (counted as unparseable, scored wrong)."""
    m = ANSWER_RE.search(text or "")
    if not m:
        return None
    idx = OPTIONS.find(m.group(1))
    return idx if 0 <= idx < n_choices else None


# ---------------------------------------------------------------------- scoring
def categories(problem: dict) -> list[str]:
    """The table columns a problem counts in (besides Avg)."""
    subject = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}.get(problem["subject"])
    out = [subject] if subject else []
    has_text, has_image = bool(problem.get("hint")), bool(problem.get("image"))
    out += (["TXT"] if has_text else []) + (["IMG"] if has_image else []) + ([] if has_text or has_image else ["NO"])
    grade = int(re.sub(r"\D", "", str(problem["grade"])) or 0)
    out.append("G1-6" if grade <= 6 else "G7-12")
    return out


def score(problems: dict, predictions: dict) -> dict:
    """predictions {qid: choice index or None} -> {column: accuracy % or None if empty, "n": {column: count},
    "unparseable": count, "total": count}."""
    hits = {c: 0 for c in COLUMNS}
    counts = {c: 0 for c in COLUMNS}
    unparseable = 0
    for qid, pred in predictions.items():
        p = problems[qid]
        ok = pred is not None and pred == p["answer"]
        unparseable += pred is None
        for c in categories(p) + ["Avg"]:
            counts[c] += 1
            hits[c] += ok
    acc = {c: (100.0 * hits[c] / counts[c] if counts[c] else None) for c in COLUMNS}
    return {**acc, "n": counts, "unparseable": unparseable, "total": len(predictions)}


def chance(problems: dict, qids: Sequence) -> dict:
    """The accuracy of guessing uniformly among each question's choices, per column (the paper's "Random
    chance" row, for these questions)."""
    hits, counts = {c: 0.0 for c in COLUMNS}, {c: 0 for c in COLUMNS}
    for q in qids:
        p = problems[q]
        for c in categories(p) + ["Avg"]:
            counts[c] += 1
            hits[c] += 1.0 / len(p["choices"])
    return {c: (100.0 * hits[c] / counts[c] if counts[c] else None) for c in COLUMNS}


def format_table(rows: dict, extra: Sequence[str] = ()) -> str:
    """{row name: score() dict (plus any `extra` keys such as "ROUGE-L")} -> the paper's table as text."""
    cols = list(COLUMNS) + list(extra)
    width = max([len(r) for r in rows] + [10])
    lines = [f"{'Model':<{width}} " + " ".join(f"{c:>7}" for c in cols)]
    for name, s in rows.items():
        s = s if isinstance(s, dict) else dict(zip(COLUMNS, s))  # a PAPER row is a plain list
        cells = [f"{s[c]:>7.2f}" if isinstance(s.get(c), (int, float)) else f"{'-':>7}" for c in cols]
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)
