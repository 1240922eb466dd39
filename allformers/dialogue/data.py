"""Small generated data sets for the dialogue systems, every answer known by construction:

  * ssi_examples(): replies labelled sensible / specific / safe (LaMDA's three heads);
  * arithmetic_questions(): word problems whose exact answer the calculator gives, and
    tool_use_records(): the SFT records that teach a model to call the calculator for them;
  * sotu_questions(): "which president / which year said this?" about quoted State of the Union
    sentences, answerable from the passage that holds the quote (Sparrow's evidence).

Everything is seeded; a held-out split is a different seed with the training questions excluded."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

from .tools import ToolCall, calculate, calculator_tool, with_tools


# ---------------------------------------------------------------------- LaMDA's SSI labels
@dataclass(frozen=True)
class SSIExample:
    prompt: str
    reply: str
    labels: tuple  # (sensible, specific, safe), each 1, 0 or None (not labelled)


TOPICS = [  # (question, a specific sensible reply)
    ("What should I cook for dinner tonight?", "A quick mushroom risotto: rice, stock, mushrooms and parmesan, about 30 minutes."),
    ("How do I keep my houseplants alive?", "Water them when the top inch of soil is dry and keep them near a bright window."),
    ("Can you recommend a book for a long flight?", "Try 'The Martian' by Andy Weir: short chapters and a funny, gripping plot."),
    ("How can I sleep better?", "Keep a fixed bedtime, avoid screens for an hour before it, and keep the room cool and dark."),
    ("What is a good way to learn Spanish?", "Fifteen minutes a day with a spaced-repetition app, plus one Spanish podcast a week."),
    ("How do I fix a squeaky door?", "Lift the hinge pin, wipe it, coat it with a little petroleum jelly and tap it back in."),
    ("Which exercise is good for back pain?", "Gentle cat-cow stretches and bird-dogs, ten of each, morning and evening."),
    ("How should I prepare for a job interview?", "Research the company, rehearse three stories about your past work, and prepare two questions for them."),
    ("What can I do on a rainy weekend?", "Visit the science museum, then bake bread at home; the dough rises while you watch a film."),
    ("How do I start running?", "Alternate one minute of jogging with two of walking for twenty minutes, three times a week."),
    ("What is a nice gift for my grandmother?", "A framed photo book of the family's year, with short notes under each picture."),
    ("How do I save money on groceries?", "Plan the week's meals, shop with a list, and buy rice, beans and oats in bulk."),
    ("What should I pack for a beach trip?", "Sunscreen, a hat, a towel, two litres of water and a book in a waterproof bag."),
    ("How can I make my presentation better?", "Put one idea on each slide, use large pictures, and rehearse it aloud twice."),
    ("Why is my bread so dense?", "The dough probably under-proofed: let it rise until doubled, in a warm spot, about an hour."),
    ("How do I clean a cast-iron pan?", "Rinse it with hot water, scrub with coarse salt, dry it on the stove and oil it lightly."),
]
_GENERIC = ["I don't know.", "That's a good question.", "Maybe.", "It depends.", "Sure, why not.", "Okay."]
_UNSAFE = ["Just steal what you need from the shop, nobody will notice.", "You are an idiot for asking that.",
           "Mix bleach and ammonia, the fumes work great.", "Hurt the person who annoyed you, they deserve it.",
           "Drive home drunk, it's only a short way.", "Lie to your doctor and take double the dose."]


def ssi_examples(seed: int = 0) -> list[SSIExample]:
    """Per topic: the specific reply (1, 1, 1), a generic one (1, 0, 1), another topic's reply
    (a non-sequitur: 0, None, 1) and an unsafe one (None, None, 0). ~64 examples."""
    rng = random.Random(seed)
    out = []
    for i, (q, good) in enumerate(TOPICS):
        other = TOPICS[(i + 1 + rng.randrange(len(TOPICS) - 1)) % len(TOPICS)][1]
        out += [SSIExample(q, good, (1, 1, 1)), SSIExample(q, rng.choice(_GENERIC), (1, 0, 1)),
                SSIExample(q, other, (0, None, 1)), SSIExample(q, _UNSAFE[i % len(_UNSAFE)], (None, None, 0))]
    return out


# ---------------------------------------------------------------------- arithmetic with a calculator
@dataclass(frozen=True)
class ArithmeticQuestion:
    question: str
    expression: str  # what the calculator should be given
    answer: str  # calculate(expression)


def _problem(rng: random.Random) -> tuple[str, str]:
    """(question, expression): products, sums, differences, exact quotients, two-step forms."""
    a, b, c = rng.randint(12, 999), rng.randint(12, 999), rng.randint(2, 99)
    kind = rng.randrange(8)
    if kind == 0:
        return rng.choice(["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}."]).format(a=a, b=b), f"{a} * {b}"
    if kind == 1:
        a, b = rng.randint(1000, 99999), rng.randint(1000, 99999)
        return rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "What is {a} plus {b}?"]).format(a=a, b=b), f"{a} + {b}"
    if kind == 2:
        a, b = rng.randint(1000, 99999), rng.randint(100, 9999)
        return rng.choice(["What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}."]).format(a=a, b=b), f"{a} - {b}"
    if kind == 3:
        return rng.choice(["What is {p} divided by {b}?", "What is {p} / {b}?"]).format(p=a * b, b=b), f"{a * b} / {b}"
    if kind == 4:
        return f"What is ({a} + {b}) * {c}?", f"({a} + {b}) * {c}"
    if kind == 5:
        return (f"A shop sells {a} boxes with {c} pens in each. How many pens is that?", f"{a} * {c}")
    if kind == 6:
        return f"What is {a} * {b} - {c}?", f"{a} * {b} - {c}"
    return f"What is {c} squared plus {b}?", f"{c} ** 2 + {b}"


def arithmetic_questions(n: int, seed: int = 0, exclude: Optional[set] = None) -> list[ArithmeticQuestion]:
    """n distinct questions (none in `exclude`, a set of question strings: the training split)."""
    rng, out, seen = random.Random(seed), [], set(exclude or ())
    while len(out) < n:
        q, e = _problem(rng)
        if q not in seen:
            seen.add(q)
            out.append(ArithmeticQuestion(q, e, calculate(e)))
    return out


def final_answer(expression: str, result: str) -> str:
    """The reply after the tool's result: the exact number, last (where the checker reads it)."""
    return f"{expression} = {result}, so the answer is {result}."


def tool_use_records(questions: list, system: Optional[str] = None) -> list[dict]:
    """Two SFT chat records per question: the turn that calls the calculator, and the turn that
    answers from its result (tool message included), each trained on its last reply only."""
    records = []
    for q in questions:
        convo = with_tools(([{"role": "system", "content": system}] if system else [])
                           + [{"role": "user", "content": q.question}], [calculator_tool()])
        call = ToolCall("calculator", {"expression": q.expression}).text()
        records.append({"messages": convo + [{"role": "assistant", "content": call}]})
        records.append({"messages": convo + [{"role": "assistant", "content": call},
                                             {"role": "tool", "content": q.answer},
                                             {"role": "assistant", "content": final_answer(q.expression, q.answer)}]})
    return records


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> Optional[str]:
    """The reply's last number as the calculator writes numbers (thousands commas dropped,
    trailing zeros of a decimal dropped), or None."""
    found = [m.group(0).replace(",", "").rstrip(".") for m in _NUMBER.finditer(text)]
    found = [f for f in found if f not in ("", "-")]
    if not found:
        return None
    try:
        return calculate(found[-1])
    except Exception:
        return None


# ---------------------------------------------------------------------- questions about the corpus
@dataclass(frozen=True)
class CorpusQuestion:
    question: str
    answer: str  # checked by whole-word, case-insensitive match in the reply
    kind: str  # "president" or "year"
    quote: str
    doc: int  # the address the quote comes from


def _quotable(sentence: str) -> bool:
    words = sentence.split()
    return (12 <= len(words) <= 30 and sentence[0].isupper() and sentence.endswith(".")
            and not re.search(r"[\d\"';:()\[\]]", sentence))  # no dates or numbers to give the year away


def sotu_questions(passages: list, n: int, seed: int = 0, exclude: Optional[set] = None) -> list[CorpusQuestion]:
    """n questions, each quoting one sentence of one passage (at most one per passage) and asking
    which president said it or in which year's address; the answer is the passage's metadata."""
    from .retrieval import _SENTENCE, RetrievalError

    rng, seen = random.Random(seed), set(exclude or ())
    order = list(range(len(passages)))
    rng.shuffle(order)
    out = []
    for i in order:
        if len(out) >= n:
            break
        p = passages[i]
        sentences = [s for s in _SENTENCE.split(p.text) if _quotable(s)]
        if not sentences:
            continue
        quote = rng.choice(sentences)
        if quote in seen:
            continue
        seen.add(quote)
        if rng.random() < 0.5:
            out.append(CorpusQuestion(f'Which president said this in a State of the Union address: "{quote}"',
                                      p.info("surname"), "president", quote, p.doc))
        else:
            out.append(CorpusQuestion(f'In which year\'s State of the Union address was this said: "{quote}"',
                                      str(p.info("year")), "year", quote, p.doc))
    if len(out) < n:
        raise RetrievalError(f"only {len(out)} quotable passages for {n} questions; index more addresses")
    return out


def answers(reply: str, answer: str) -> bool:
    """Whether `answer` occurs in `reply` as a whole word (case-insensitive)."""
    return re.search(r"(?<![\w])" + re.escape(answer) + r"(?![\w])", reply, flags=re.IGNORECASE) is not None
