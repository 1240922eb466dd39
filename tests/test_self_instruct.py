"""Self-instruct: ROUGE-L against the rouge-score package and a plain DP, each filter at its
bounds, list/input/output parsing, the loop with a scripted LM (exact counts, file, resume), the
loop and CLI with a tiny random chat model, and (slow) the real SmolLM2."""
import itertools
import json
import random
import string

import pytest
import torch

from allformers import Config, TransformerLM
from allformers.cli.main import main
from allformers.metrics import lcs_length, max_rouge_l, rouge_l, rouge_l_corpus, rouge_tokens
from allformers.tokenization import Tokenizer
from allformers.recipes.self_instruct import (
    REASONS, SEED_TASKS, ChatSampler, SelfInstructConfig, SelfInstructError, TaskPool, has_blacklisted_word,
    instruction_rejection, length_ok, load_tasks, needs_input, normalize, output_rejection, parse_input,
    parse_instructions, self_instruct, similar_enough, starts_well, trim_unfinished)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- ROUGE-L
def dp_lcs(a, b):  # the textbook O(|a| |b|) table, as the reference
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_matches_dynamic_programming():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS's example
    assert lcs_length([], ["a"]) == lcs_length(["a"], []) == 0
    rng = random.Random(0)
    for _ in range(300):  # lengths past 64 cross machine-word boundaries of the bit rows
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 150))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 150))]
        assert lcs_length(a, b) == dp_lcs(a, b)


def test_rouge_l_by_hand():
    assert rouge_tokens("Re: [ILUG] Hello, World! It's 9am") == ["re", "ilug", "hello", "world", "it", "s", "9am"]
    assert rouge_l("the cat sat", "The cat SAT!") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)  # Lin's example
    assert rouge_l("cat sat", "the cat sat down") == pytest.approx(2 / 3)  # P = 1, R = 1/2


def test_rouge_l_matches_rouge_score():
    scorer = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])  # in the `test` extra
    rng = random.Random(1)
    words = "the a cat dog sat ran on mat Mat, fast 42 x-ray naïve".split()
    pairs = [(" ".join(rng.choices(words, k=rng.randint(0, 30))), " ".join(rng.choices(words, k=rng.randint(0, 30))))
             for _ in range(300)]
    for c, r in pairs + [("Give three tips!", "give 3 tips"), ("", "")]:
        assert rouge_l(c, r) == pytest.approx(scorer.score(r, c)["rougeL"].fmeasure, abs=1e-12)
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    mean = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs)
    assert rouge_l_corpus(preds, refs) == pytest.approx(mean, abs=1e-12)


def test_max_rouge_l_and_corpus():
    rng = random.Random(2)
    kept = [[rng.choice("abcd") for _ in range(rng.randint(0, 20))] for _ in range(200)]
    for _ in range(50):
        c = [rng.choice("abcd") for _ in range(rng.randint(1, 20))]
        assert max_rouge_l(c, kept) == max(rouge_l(c, k) for k in kept)
    assert max_rouge_l("anything", []) == 0.0 and max_rouge_l("", [["a"]]) == 0.0
    assert rouge_l_corpus(["a b", "c"], ["a b", "d"]) == 0.5
    with pytest.raises(Exception, match="2 predictions but 1 references"):
        rouge_l_corpus(["a", "b"], ["a"])


# ---------------------------------------------------------------------- filters
KEPT = "Give three tips for staying healthy and happy every day"  # 10 words


def test_similarity_threshold_is_exclusive():
    kept = [rouge_tokens(KEPT)]
    at = "Give three tips for staying calm when studying every day"  # 10 words, LCS 7: F = 14/20 = 0.7
    below = "Give three tips for staying calm while you study every day"  # 11 words, LCS 7: F = 14/21
    above = "Give three tips for staying healthy when studying every day"  # LCS 8: F = 0.8
    assert rouge_l(at, KEPT) == 0.7 and rouge_l(below, KEPT) == pytest.approx(2 / 3)
    assert similar_enough(rouge_tokens(at), kept, 0.7)  # kept only when strictly below 0.7
    assert not similar_enough(rouge_tokens(below), kept, 0.7)
    assert similar_enough(rouge_tokens(above), kept, 0.7)
    pool = TaskPool([{"instruction": KEPT}])
    assert pool.novelty_rejection(at) == "similar" and pool.novelty_rejection(below) is None
    assert pool.novelty_rejection("give THREE tips, for staying healthy and happy -- every day!") == "duplicate"
    assert pool.novelty_rejection(at, threshold=0.75) is None and len(pool) == 1


def test_content_filters():
    assert starts_well("Name a red fruit.") and starts_well("3 ways to relax")
    for bad in ["", "- Name a fruit", "\"Name a fruit\"", "¿Qué hora es?", "€5 deals", " Name"]:
        assert not starts_well(bad), bad
    words = lambda n: " ".join(["word"] * n)  # noqa: E731
    assert [length_ok(words(n)) for n in (2, 3, 150, 151)] == [False, True, True, False]
    for bad in ["Draw a cat.", "Describe the image below.", "Plot the sales", "Create a map of Paris",
                "Go to the store", "Summarize the VIDEO", "Open the file and count words"]:
        assert has_blacklisted_word(bad), bad
    for ok in ["Describe your drawer.", "Write your profile summary", "Explain mapping in math", "Go home"]:
        assert not has_blacklisted_word(ok), ok
    cfg = SelfInstructConfig()
    assert instruction_rejection(". Name a fruit", cfg) == "bad_start"
    assert instruction_rejection("Name fruit", cfg) == "length"
    assert instruction_rejection("Draw a red fruit", cfg) == "blacklist"
    assert instruction_rejection("Name a red fruit", cfg) is None
    assert normalize("  Name 3 fruits!! ") == normalize("name 3 FRUITS") == "name 3 fruits"


def test_output_filter():
    assert output_rejection("Name a red fruit.", "", "") == "empty_output"
    assert output_rejection("Name a red fruit.", "", " ... ") == "empty_output"
    assert output_rejection("Name a red fruit.", "", "name a red fruit") == "output_copy"
    assert output_rejection("Fix the spelling.", "I recieved it.", "I recieved it.") == "output_copy"
    assert output_rejection("Name a red fruit.", "", "A strawberry.") is None


def test_seed_file_and_needs_input():
    seeds = load_tasks(SEED_TASKS)
    assert len(seeds) == 20 and all(s["instruction"] and s["output"] for s in seeds)
    cfg = SelfInstructConfig()
    assert all(instruction_rejection(s["instruction"], cfg) is None for s in seeds)  # the seeds pass the filters
    assert max(rouge_l(a["instruction"], b["instruction"]) for a, b in itertools.combinations(seeds, 2)) < 0.7
    assert [needs_input(s["instruction"]) for s in seeds] == [bool(s["input"]) for s in seeds]
    assert not needs_input("Rewrite the sentence 'she walks home' in the past tense.")  # input given inline


def test_load_tasks_errors(tmp_path):
    with pytest.raises(SelfInstructError, match="does not exist"):
        load_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    with pytest.raises(SelfInstructError, match="bad.jsonl line 2 is not valid JSON"):
        load_tasks(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(SelfInstructError, match="nofield.jsonl line 1 needs a non-empty 'instruction'"):
        load_tasks(tmp_path / "nofield.jsonl")


# ---------------------------------------------------------------------- parsing
def test_parse_instructions():
    text = " Name a red fruit.\n5. Say hi.\n6)  Write   a poem about rain\n7. 1. Nested number here\n\nSure, more!"
    assert parse_instructions(text, 4, True) == ["Name a red fruit.", "Say hi.", "Write a poem about rain",
                                                 "Nested number here"]
    # cut off by the token limit: the half line is dropped; reading stops at the first non-item
    assert parse_instructions(" Name a fruit.\n5. Write a sto", 4, False) == ["Name a fruit."]
    assert parse_instructions(" Name a fruit.\nHere are more:\n5. Say hi.", 4, True) == ["Name a fruit."]
    assert parse_instructions(" \"Quoted task here\"\n5. ", 4, True) == ["Quoted task here"]
    assert parse_instructions("", 4, False) == []


def test_trim_and_parse_input():
    assert trim_unfinished(" All done. ", True) == "All done."
    assert trim_unfinished("One. Two and thr", False) == "One."
    assert trim_unfinished("no end at all", False) == ""
    assert trim_unfinished("Line one\nline tw", False) == "Line one"
    assert parse_input(' "She walks home."\nOutput: She walked home.', False) == "She walks home."
    assert parse_input(" 4, 9, 1\n\nThe sorted list is", False) == "4, 9, 1"
    assert parse_input(" I love it. Then the model rambl", False) == "I love it."


# ---------------------------------------------------------------------- the loop, scripted
class ScriptedLM:
    """Answers the three kinds of request from scripts; records what it was asked."""

    def __init__(self, lists):
        self.lists, self.calls = list(lists), []

    def __call__(self, requests, max_new_tokens, stop=None):
        out = []
        for messages, prefix in requests:
            self.calls.append((messages, prefix))
            user = messages[-1]["content"]
            if prefix.endswith("4."):  # a list of tasks to continue
                out.append((self.lists.pop(0) if self.lists else " Nothing new here at all.\n5.", True))
            elif prefix == "Input:":
                out.append((" The soup was cold.\nOutput: Negative", False))
            elif "Repeat me exactly please" in user:
                out.append(("Repeat me exactly please", True))
            elif "Say nothing useful now" in user:
                out.append(("and then it went on and o", False))  # cut off, no sentence end -> empty
            else:
                out.append((f"Answer to: {user}. Done", False))  # trimmed back to "Answer to: ...."
        return out


LIST_1 = (" Name three animals that live in the sea.\n"
          "5. Name three animals that live in the ocean.\n"  # ROUGE 0.875 to the line above
          "6. Draw a picture of a house.\n"  # blacklist
          "7. Hi there\n"  # 2 words
          "8. - Dash start is bad here\n"  # bad start
          "9. Find the verb in the following sentence.\n"  # needs an input
          "10. Repeat me exactly please\n"  # the reply copies the instruction
          "11. Say nothing useful now\n"  # the reply is cut off before any sentence end
          "12. Give three tips for getting a good night's sleep.\n"  # a seed, verbatim
          "13. Explain how rainbows form in simple words.")  # the last line, complete (finished=True)
LIST_2 = (" NAME three animals that live in the sea!\n"  # duplicate of a kept task
          "5. Suggest a fun weekend activity for a family.\n"
          "6. Write a limerick about a clumsy cat.")


def test_loop_with_scripted_lm(tmp_path):
    out = tmp_path / "data.jsonl"
    cfg = SelfInstructConfig(num=6, batch_size=1, max_rounds=5, seed=3)
    lm = ScriptedLM([LIST_1, LIST_2])
    res = self_instruct(lm, load_tasks(SEED_TASKS), cfg, out=out, progress=False)
    kept = [r["instruction"] for r in res.records]
    assert kept == ["Name three animals that live in the sea.", "Find the verb in the following sentence.",
                    "Explain how rainbows form in simple words.", "Suggest a fun weekend activity for a family.",
                    "Write a limerick about a clumsy cat.", "Nothing new here at all."]
    assert res.records[1] == {"instruction": kept[1], "input": "The soup was cold.",
                              "output": f"Answer to: {kept[1]}\n\nThe soup was cold.."}
    assert res.records[0]["input"] == "" and res.records[0]["output"] == f"Answer to: {kept[0]}."
    assert dict(res.rejected) == {"similar": 1, "blacklist": 1, "length": 1, "bad_start": 1, "output_copy": 1,
                                  "empty_output": 1, "duplicate": 2}
    assert res.candidates == 10 + 3 + 1 and res.kept == 6 and res.unused == 0 and res.rounds == 3
    assert res.candidates == res.kept + sum(res.rejected.values()) + res.unused
    assert set(res.summary()["rejected"]) == set(REASONS)
    assert [json.loads(line) for line in out.read_text().splitlines()] == res.records
    # every list prompt shows 3 examples, seeds plus (once there are some) one kept machine task
    prompts = [p for _, p in lm.calls if p.endswith("4.")]
    assert len(prompts) == 3 and all(p.count("\n") == 3 for p in prompts)
    seeds = {s["instruction"] for s in load_tasks(SEED_TASKS)}
    first = [line[3:] for line in prompts[0].split("\n")[:3]]
    assert set(first) <= seeds
    second = [line[3:] for line in prompts[1].split("\n")[:3]]
    assert len(set(second) - seeds) == 1 and set(second) - seeds <= set(kept)

    # resume: the kept file is read back, counts as kept and as the ROUGE pool; only new tasks are added
    lm2 = ScriptedLM([LIST_2 + "\n7. Invent a new flavor of ice cream.\n8. List two uses for an old sock."])
    res2 = self_instruct(lm2, load_tasks(SEED_TASKS), SelfInstructConfig(num=7, batch_size=1, seed=3), out=out,
                         progress=False)
    assert [r["instruction"] for r in res2.records] == kept + ["Invent a new flavor of ice cream."]
    assert res2.rejected["duplicate"] == 3 and res2.kept == 1 and res2.unused == 1
    assert len(out.read_text().splitlines()) == 7


def test_loop_gives_up_after_max_rounds():
    res = self_instruct(ScriptedLM([]), load_tasks(SEED_TASKS)[:5], SelfInstructConfig(num=3, max_rounds=2,
                        batch_size=2), progress=False)
    assert res.rounds == 2 and len(res.records) == 1 and res.rejected["duplicate"] == 3  # the default list, 4 times
    with pytest.raises(SelfInstructError, match="no tasks"):
        self_instruct(ScriptedLM([]), [], SelfInstructConfig(num=1))
    with pytest.raises(SelfInstructError, match="threshold"):
        SelfInstructConfig(threshold=1.5)


# ---------------------------------------------------------------------- a tiny random chat model
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat():
    tok = Tokenizer.char(string.printable + "~")
    tok.chat_template, tok.eos_token = CHATML, "~"
    torch.manual_seed(0)
    model = TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=1, n_embd=32,
                                           n_head=2, block_size=1024)).eval()
    return model, tok


def test_chat_sampler_is_batched_and_seeded(tiny_chat):
    model, tok = tiny_chat
    reqs = [([{"role": "user", "content": "Name a fruit."}], "1."), ([{"role": "user", "content": "Hi"}], "")] * 3
    a = ChatSampler(model, tok, temperature=1.0, top_p=0.95, batch_size=4, seed=7)(reqs, 12, ["\n"])
    b = ChatSampler(model, tok, temperature=1.0, top_p=0.95, batch_size=4, seed=7)(reqs, 12, ["\n"])
    assert a == b and len(a) == 6
    for text, finished in a:
        assert "\n" not in text and "~" not in text  # cut at the stop string; EOS never shown
        assert finished or len(text) == 12  # unfinished rows used every token (one char each)
    with pytest.raises(SelfInstructError, match="chat template"):
        ChatSampler(model, Tokenizer.char("abc"))


def check_records(rows, cfg):
    """Every kept record has the Alpaca fields and passed every filter, in order."""
    pool = [rouge_tokens(s["instruction"]) for s in load_tasks(SEED_TASKS)]
    for r in rows:
        assert set(r) == {"instruction", "input", "output"}
        assert instruction_rejection(r["instruction"], cfg) is None
        assert output_rejection(r["instruction"], r["input"], r["output"]) is None
        assert max_rouge_l(r["instruction"], pool) < cfg.threshold
        pool.append(rouge_tokens(r["instruction"]))


def test_loop_with_tiny_random_model(tiny_chat, tmp_path):
    model, tok = tiny_chat
    out = tmp_path / "junk.jsonl"
    cfg = SelfInstructConfig(num=50, batch_size=4, max_rounds=2, instruction_tokens=60, input_tokens=16,
                             output_tokens=16)
    res = self_instruct(ChatSampler(model, tok, temperature=1.0, seed=0), load_tasks(SEED_TASKS), cfg, out=out,
                        progress=False)
    assert res.rounds == 2 and res.candidates == res.kept + sum(res.rejected.values()) + res.unused
    assert set(res.rejected) <= set(REASONS)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == res.records and len(rows) == res.kept
    check_records(rows, cfg)

    # random characters rarely make a 3-word list item: script the lists, let the model write
    # the inputs and outputs, so its replies go through parsing, trimming and the output filters
    sampler = ChatSampler(model, tok, temperature=1.0, batch_size=3, seed=1)
    scripted = ScriptedLM([LIST_1, LIST_2])

    def hybrid(requests, max_new_tokens, stop=None):
        if requests[0][1].endswith("4."):
            return scripted(requests, max_new_tokens, stop)
        return sampler(requests, max_new_tokens, stop)

    cfg = SelfInstructConfig(num=20, batch_size=1, max_rounds=2, input_tokens=16, output_tokens=24)
    res = self_instruct(hybrid, load_tasks(SEED_TASKS), cfg, out=out, resume=False, progress=False)
    assert res.candidates == 13 and res.candidates == res.kept + sum(res.rejected.values())
    assert {k: res.rejected[k] for k in ("similar", "blacklist", "length", "bad_start", "duplicate")} == {
        "similar": 1, "blacklist": 1, "length": 1, "bad_start": 1, "duplicate": 2}
    assert res.kept + res.rejected["output_copy"] + res.rejected["empty_output"] + res.rejected["no_input"] == 7
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == res.records
    check_records(rows, cfg)


def test_cli(tiny_chat, tmp_path, capsys):
    model, tok = tiny_chat
    model.save(tmp_path / "tiny", tokenizer=tok)
    out = tmp_path / "si.jsonl"
    assert main(["self-instruct", "--model", str(tmp_path / "tiny"), "--num", "3", "--out", str(out),
                 "--batch-size", "2", "--max-rounds", "1", "--output-tokens", "8", "--seed", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rounds"] == 1 and summary["seed_tasks"] == 20 and summary["wall_s"] >= 0
    assert json.loads((tmp_path / "si.stats.json").read_text()) == summary
    assert len(out.read_text().splitlines()) == summary["total_records"] == summary["kept"]
    assert main(["self-instruct", "--model", str(tmp_path / "tiny"), "--out", str(out),
                 "--seed-tasks", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_self_instruct(tmp_path):
    import allformers
    from allformers.zoo.assets import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except allformers.AllformersError as e:
        pytest.skip(str(e))
    model = allformers.load(path)
    seeds = load_tasks(SEED_TASKS)
    cfg = SelfInstructConfig(num=10, batch_size=8, output_tokens=64, seed=0)
    res = self_instruct(ChatSampler(model, model.tokenizer, temperature=0.8, top_p=0.95, seed=0), seeds, cfg,
                        out=tmp_path / "si.jsonl", progress=False)
    assert len(res.records) == 10 and res.rounds <= 3, res.summary()
    assert res.candidates == res.kept + sum(res.rejected.values()) + res.unused
    pool = [rouge_tokens(s["instruction"]) for s in seeds]
    for r in res.records:
        assert instruction_rejection(r["instruction"], cfg) is None and r["output"]
        assert max_rouge_l(r["instruction"], pool) < 0.7, r
        pool.append(rouge_tokens(r["instruction"]))
