"""The calculator (exact, safe), the tool-call protocol, the tool loop and the passage index."""
import json

import pytest
import torch

from allformers import Config
from allformers.dialogue.retrieval import Passage, PassageIndex, RetrievalError, chunk, sotu_addresses, sotu_passages
from allformers.dialogue.tools import (CALL_STOP, ToolCall, ToolError, calculate, calculator_tool, parse_tool_call,
                                       run_tool, run_with_tools, search_tool, tools_system_prompt, with_tools)
from allformers.models import build_model
from allformers.tokenization import Tokenizer


@pytest.mark.parametrize("expr,want", [("37 * 48", "1776"), ("7 / 4", "1.75"), ("2^10", "1024"), ("1,234 + 5", "1239"),
                                       ("12 x 7", "84"), ("(3 + 4) * -2", "-14"), ("10 / 3", "3.3333333333"),
                                       ("0.1 + 0.2", "0.3"), ("17 // 5", "3"), ("17 % 5", "2"), ("2 ** -2", "0.25"),
                                       ("123456789 * 987654321", "121932631112635269"), ("6 / 3", "2"),
                                       ("1e3 + 1", "1001"), ("100 =", "100")])
def test_calculator_is_exact(expr, want):
    assert calculate(expr) == want


@pytest.mark.parametrize("expr,why", [
    ("__import__('os').system('true')", "not Call"), ("open('x')", "not Call"), ("a + 1", "not Name"),
    ("(1).__class__", "not Attribute"), ("[1, 2]", "not List"), ("1 if 1 else 2", "not IfExp"), ("'1' + '2'", "not Constant"),
    ("lambda: 1", "not Lambda"), ("1 / 0", "division by zero"), ("5 % 0", "division by zero"),
    ("2 ** 0.5", "whole-number powers"), ("9 ** 9 ** 9", "out of range"), ("10 ** 60 * 10 ** 60", "more than 60 digits"),
    ("1 +", "not an arithmetic expression"), ("", "needs an expression"), ("1" * 201, "longer than 200"),
    ("True + 1", "not Constant")])
def test_calculator_refuses_anything_but_arithmetic(expr, why):
    with pytest.raises(ToolError, match=why):
        calculate(expr)


def test_tool_call_protocol_round_trip():
    call = ToolCall("calculator", {"expression": "2 + 2"})
    assert parse_tool_call("Let me check. " + call.text()) == call
    assert parse_tool_call(call.text()[:-len(CALL_STOP)]) == call  # generation stopped at the closing tag
    assert parse_tool_call('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>') \
        == ToolCall("calculator", {"expression": "1"})  # OpenAI's arguments as a JSON string
    for text in ("no call here", "<tool_call>not json</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
                 '<tool_call>{"name": "x", "arguments": [1]}</tool_call>'):
        assert parse_tool_call(text) is None
    tools = {"calculator": calculator_tool()}
    assert run_tool(call, tools) == "4"
    assert run_tool(ToolCall("calculator", {"expression": "1/0"}), tools) == "error: division by zero"
    assert run_tool(ToolCall("weather", {}), tools).startswith("error: there is no tool 'weather'")
    assert "needs the argument" in run_tool(ToolCall("calculator", {}), tools)
    assert "takes ['expression']" in run_tool(ToolCall("calculator", {"expression": "1", "x": 2}), tools)


def test_system_prompt_lists_the_schemas_and_merges_with_a_system_message():
    tools = [calculator_tool()]
    prompt = tools_system_prompt(tools)
    line = prompt.splitlines()[-1]
    assert json.loads(line)["name"] == "calculator" and "<tool_call>" in prompt
    msgs = with_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools)
    assert len(msgs) == 2 and msgs[0]["content"].startswith("Be brief.\n\n") and msgs[1]["content"] == "hi"


def test_run_with_tools_feeds_results_back_until_a_plain_reply():
    seen = []

    def model(messages):  # calls the calculator once, then states what the tool said
        seen.append(messages)
        if messages[-1]["role"] == "tool":
            return f"It is {messages[-1]['content']}."
        return ToolCall("calculator", {"expression": "37 * 48"}).text()

    turn = run_with_tools(model, [{"role": "user", "content": "37 times 48?"}], [calculator_tool()])
    assert turn.reply == "It is 1776."
    assert [m["role"] for m in turn.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert turn.calls[0][1] == "1776" and len(seen) == 2

    looping = run_with_tools(lambda m: ToolCall("calculator", {"expression": "1"}).text(),
                             [{"role": "user", "content": "?"}], [calculator_tool()], max_calls=2)
    assert len(looping.calls) == 2  # stops calling after max_calls


def test_chunk_keeps_sentences_whole():
    text = "One two three. Four five six seven. Eight nine. Many " + " ".join(["w"] * 24) + ". Last one."
    parts = chunk(text, words=6)
    assert parts[0] == "One two three." and parts[1] == "Four five six seven. Eight nine."
    assert all(len(p.split()) <= 6 for p in parts[2:])
    assert " ".join(parts).split() == text.split()


def test_sotu_metadata_matches_the_corpus():
    addresses = sotu_addresses()
    assert len(addresses) == 233
    by_year = {(a.year, a.surname) for a in addresses}
    assert (1862, "Lincoln") in by_year and (1790, "Washington") in by_year and (2021, "Biden") in by_year
    assert addresses[71].president == "Abraham Lincoln" and addresses[71].year == 1861
    passages = sotu_passages(addresses=[71])
    assert passages and all(p.source == "1861, Lincoln" and p.info("year") == 1861 for p in passages)
    assert passages[0].citation(60).startswith("1861, Lincoln: ") and passages[0].citation(60).endswith(" ...")


def test_sotu_metadata_refuses_another_corpus(tmp_path):
    (tmp_path / "sotu.txt").write_text("An address.\n\nAnother one.\n")
    with pytest.raises(RetrievalError, match="2 addresses but the metadata lists 233"):
        sotu_addresses(str(tmp_path / "sotu.txt"))


def tiny_encoder():
    tok = Tokenizer.byte_level()
    torch.manual_seed(0)
    model = build_model(Config.from_name("all-minilm-l6-v2", n_layer=1, n_embd=32, n_head=2, intermediate_size=64,
                                         vocab_size=tok.vocab_size, block_size=128)).eval()
    model.tokenizer = tok
    return model


def test_index_is_cached_by_corpus_and_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLFORMERS_CACHE", str(tmp_path))
    enc = tiny_encoder()
    passages = [Passage(t, f"doc {i}", i) for i, t in enumerate(["the cat sat", "a tax on tea", "war and peace",
                                                                  "the cat sat down"])]
    index = PassageIndex.build(passages, enc)
    assert index.path.parent == tmp_path / "retrieval" and index.path.is_file()
    hits = index.search("the cat sat", k=2)
    assert hits[0].passage.text == "the cat sat" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.rank for h in hits] == [0, 1]
    assert index.search("the cat sat", k=4, docs={1, 2})[0].passage.doc in (1, 2)

    mtime = index.path.stat().st_mtime_ns
    again = PassageIndex.build(passages, enc)  # read back, not recomputed
    assert again.path == index.path and index.path.stat().st_mtime_ns == mtime
    assert torch.equal(again.embeddings, index.embeddings)
    other = PassageIndex.build(passages[:3], enc)  # another corpus: another file
    assert other.path != index.path
    with torch.no_grad():
        enc.body.blocks[0].mlp.fc.weight.add_(1.0)
    assert PassageIndex.build(passages, enc).path != index.path  # another encoder: another file
    index.path.write_bytes(b"torn")
    assert PassageIndex.build(passages, tiny_encoder()).embeddings.shape == (4, 32)  # a torn cache is rebuilt

    tool = search_tool(index, k=1)
    assert tool({"query": "tea"}).startswith("[1] doc ")


def test_batched_tool_loop_equals_the_loop_one_by_one():
    from allformers.dialogue.tools import run_with_tools_batch

    def model(messages):  # calls the calculator as often as the question has '?', then answers
        n_tool = sum(m["role"] == "tool" for m in messages)
        if n_tool < messages[1]["content"].count("?"):
            return ToolCall("calculator", {"expression": f"{n_tool + 1} * 7"}).text()
        return f"done after {n_tool}"

    questions = [[{"role": "user", "content": q}] for q in ("a", "b?", "c???", "d??")]
    batches = []
    turns = run_with_tools_batch(lambda cs: batches.append(len(cs)) or [model(c) for c in cs], questions,
                                 [calculator_tool()], max_calls=2)
    one_by_one = [run_with_tools(model, q, [calculator_tool()], max_calls=2) for q in questions]
    assert [t.reply for t in turns] == [t.reply for t in one_by_one] == ["done after 0", "done after 1",
                                                                       ToolCall("calculator", {"expression": "3 * 7"}).text(),
                                                                       "done after 2"]
    assert [t.messages for t in turns] == [t.messages for t in one_by_one]
    assert batches == [4, 3, 2]  # only the conversations still calling go on
    assert [r for _, r in turns[2].calls] == ["7", "14"]
