"""The generated dialogue sets: answers known by construction, held-out splits disjoint."""
import pytest

from allformers.dialogue.data import (answers, arithmetic_questions, final_answer, last_number, sotu_questions,
                                      tool_use_records)
from allformers.dialogue.retrieval import RetrievalError, sotu_passages
from allformers.dialogue.tools import calculate, parse_tool_call


def test_arithmetic_questions_are_exact_and_the_split_is_disjoint():
    train = arithmetic_questions(200, seed=0)
    test = arithmetic_questions(100, seed=1, exclude={q.question for q in train})
    assert len({q.question for q in train}) == 200 and not {q.question for q in train} & {q.question for q in test}
    assert all(q.answer == calculate(q.expression) for q in train + test)
    assert arithmetic_questions(5, seed=0) == train[:5]  # seeded


def test_tool_use_records_call_then_answer():
    q = arithmetic_questions(1, seed=3)[0]
    call, answer = tool_use_records([q])
    assert call["messages"][0]["role"] == "system" and "<tool_call>" in call["messages"][0]["content"]
    assert parse_tool_call(call["messages"][-1]["content"]).arguments == {"expression": q.expression}
    assert [m["role"] for m in answer["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert answer["messages"][3]["content"] == q.answer and last_number(answer["messages"][-1]["content"]) == q.answer
    assert final_answer("2 + 2", "4").endswith("4.")


@pytest.mark.parametrize("text,want", [("The answer is 9,716.", "9716"), ("347 * 28 = 9716", "9716"),
                                       ("It is -12.50 dollars", "-12.5"), ("no number", None),
                                       ("1. First, 2. then 45", "45"), ("so 3.3333333333.", "3.3333333333")])
def test_last_number_reads_numbers_as_the_calculator_writes_them(text, want):
    assert last_number(text) == want


def test_corpus_questions_quote_their_passage():
    passages = sotu_passages(addresses=[0, 71])
    qs = sotu_questions(passages, 10, seed=0)
    by_doc = {p.doc: p for p in passages}
    for q in qs:
        assert q.quote in q.question and any(q.quote in p.text for p in passages if p.doc == q.doc)
        assert q.answer == (by_doc[q.doc].info("surname") if q.kind == "president" else str(by_doc[q.doc].info("year")))
    held = sotu_questions(passages, 5, seed=1, exclude={q.quote for q in qs})
    assert not {q.quote for q in held} & {q.quote for q in qs}
    with pytest.raises(RetrievalError, match="quotable passages"):
        sotu_questions(passages[:3], 50)
    assert answers("It was Abraham Lincoln.", "Lincoln") and not answers("Lincolnshire", "Lincoln")
    assert answers("in 1861, said", "1861") and not answers("18612", "1861")
