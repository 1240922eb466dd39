"""CTRL: its position table, parity with every weight random (biases and norms too, tied and untied
heads, padding), and control codes in generation and on the command line."""
import math

import pytest
import torch
import transformers as T

from allformers import Config, TransformerLM, load
from allformers.blocks import SinusoidalPositions
from allformers.cli.main import main
from allformers.errors import AllformersError
from allformers.generation import control_prefix, generate_text
from allformers.tokenization import Tokenizer

from .conftest import VOCAB, padded_logits_diff

pytestmark = pytest.mark.usefixtures("one_thread")


def test_halves_layout_is_sin_then_cos():
    """dim 4: frequencies 1 and 1/100; row p = [sin p, sin p/100, cos p, cos p/100]."""
    table = SinusoidalPositions(5, 4, layout="halves").table
    for p in range(5):
        expected = [math.sin(p), math.sin(p / 100), math.cos(p), math.cos(p / 100)]
        assert torch.allclose(table[p], torch.tensor(expected), atol=1e-6)
    interleaved = SinusoidalPositions(5, 4).table
    assert torch.equal(interleaved[:, [0, 2, 1, 3]], table)


def random_ctrl(tie: bool):
    torch.manual_seed(1)
    cfg = T.CTRLConfig(n_layer=2, n_head=4, n_embd=32, dff=48, vocab_size=VOCAB, n_positions=64,
                       tie_word_embeddings=tie)
    model = T.CTRLLMHeadModel(cfg).eval()
    with torch.no_grad():  # every weight, bias and norm random, so a mis-mapped one cannot hide
        for p in model.parameters():
            p.normal_(0, 0.15 if p.dim() >= 2 else 0.3)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_parity_both_ways_with_padding(tie, tmp_path):
    hf = random_ctrl(tie)
    hf.save_pretrained(tmp_path / "hf")
    model = load(tmp_path / "hf")
    assert model.config.tie_embeddings == tie and model.config.embed_scale == math.sqrt(32)
    x = torch.randint(0, VOCAB, (3, 31), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, :7] = 0
    assert padded_logits_diff(hf, model, x, mask) <= 1e-4
    model.save(tmp_path / "out", format="hf")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is T.CTRLLMHeadModel
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-4


@pytest.fixture()
def coded(tmp_path):
    """A tiny random decoder whose tokenizer knows two control codes."""
    tok = Tokenizer.char("abcdefgh ").add_control_codes(["<A>", "<B>"])
    c = Config(n_layer=1, n_head=2, n_embd=16, vocab_size=tok.vocab_size, block_size=32, position="sinusoidal",
               sinusoidal_layout="halves", embed_scale=4.0, activation="relu", lm_head_bias=True, norm_eps=1e-6)
    torch.manual_seed(0)
    model = TransformerLM(c).eval()
    model.save(tmp_path / "m", tokenizer=tok)
    return load(tmp_path / "m")


def test_control_code_goes_before_the_prompt(coded):
    tok = coded.tokenizer
    assert tok.control_codes == ["<A>", "<B>"]
    a = control_prefix(tok, "<A>")
    assert len(a) == 1 and tok.decode(a, skip_special_tokens=False) == "<A>"
    with torch.no_grad():
        got = generate_text(coded, tok, "abc", control_code="<A>", max_new_tokens=6)
        ids = torch.tensor([a + tok.encode("abc")])
        expected = coded.generate(ids, max_new_tokens=6)[0, ids.shape[1]:]
    assert got == tok.decode(expected.tolist())
    with pytest.raises(AllformersError, match="not one this model was trained with"):
        control_prefix(tok, "<C>")


def test_cli_control_code(coded, tmp_path, capsys):
    folder = tmp_path / "m"
    assert main(["generate", str(folder), "ab", "--control-code", "<B>", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    expected = generate_text(coded, coded.tokenizer, "ab", control_code="<B>", max_new_tokens=5)
    assert out == "ab" + expected + "\n"
    assert main(["generate", str(folder), "ab", "--control-code", "<Z>"]) == 2
    assert "<Z>" in capsys.readouterr().err


def test_tagged_windows_start_with_their_code():
    from allformers.training.control_codes import TaggedWindows, tagged_corpus

    corpus = tagged_corpus({"<A>": "abcd" * 200, "<B>": "wxyz" * 200})
    tok = corpus.tokenizer
    rows = TaggedWindows(corpus.train, tok, 9, seed=0)
    x, y = rows.sample(16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # next-token targets; the code itself is never a target
    for r in range(16):
        code = tok.decode([int(x[r, 0])], skip_special_tokens=False)
        text = tok.decode(y[r].tolist())
        assert code in ("<A>", "<B>") and set(text) <= set("abcd" if code == "<A>" else "wxyz")
    assert {tok.decode([int(c)], skip_special_tokens=False) for c in x[:, 0]} == {"<A>", "<B>"}


def test_ngram_classifier_golden():
    from allformers.metrics import CharNGramClassifier

    clf = CharNGramClassifier(2).fit({"x": "ab ab ab", "y": "cd cd cd"})
    assert clf.predict("ab") == "x" and clf.predict("cd cd") == "y"
    # add-one smoothing: P("ab" | x) = (3 + 1) / (7 + V) with 7 bigrams in "ab ab ab" and V = 6 distinct bigrams
    assert math.isclose(clf.log_likelihoods("ab")["x"], math.log(4 / 13))


def test_a_trained_ctrl_follows_its_code():
    """Two sources that share no character: after 80 steps, text drawn after each code is that source's."""
    from allformers.training.control_codes import TaggedWindows, tagged_corpus
    from allformers.objectives import CausalLM
    from allformers.training import TrainConfig, Trainer

    corpus = tagged_corpus({"<A>": "abcab cba " * 300, "<B>": "xyzzy yx " * 300})
    tok = corpus.tokenizer
    c = Config.from_name("baby-ctrl-char", vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_embd=32, n_head=2,
                         intermediate_size=64, embed_scale=32 ** 0.5)
    torch.manual_seed(0)
    model = TransformerLM(c)
    cfg = TrainConfig(max_steps=80, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=0, eval_at_start=False,
                      checkpoint=False, device="cpu")
    Trainer(model, CausalLM(), TaggedWindows(corpus.train, tok, 16, seed=0), cfg, progress=False).fit()
    model.eval()
    for code, chars in (("<A>", set("abc ")), ("<B>", set("xyz "))):
        texts = generate_text(model, tok, ["", ""], control_code=code, max_new_tokens=12)
        assert all(set(t) <= chars for t in texts), (code, texts)
