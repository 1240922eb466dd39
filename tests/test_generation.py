"""Sampling processors against transformers', stop strings, streaming and context errors."""
import pytest
import torch
import transformers as T

from allformers import Config, ContextLengthError, TransformerLM
from allformers.generation import generate, generate_text, left_pad, process_logits
from allformers.tokenization import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(scope="module")
def char_model():
    tok = Tokenizer.char(TEXT)
    torch.manual_seed(0)
    model = TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=2)).eval()
    return model, tok


@pytest.mark.parametrize("kw, procs", [
    (dict(temperature=0.7, top_k=None, top_p=None, repetition_penalty=1.0), [T.TemperatureLogitsWarper(0.7)]),
    (dict(temperature=1.0, top_k=5, top_p=None, repetition_penalty=1.0), [T.TopKLogitsWarper(5)]),
    (dict(temperature=1.0, top_k=None, top_p=0.8, repetition_penalty=1.0), [T.TopPLogitsWarper(0.8)]),
    (dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.3), [T.RepetitionPenaltyLogitsProcessor(1.3)]),
    (dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2),
     [T.RepetitionPenaltyLogitsProcessor(1.2), T.TemperatureLogitsWarper(0.9), T.TopKLogitsWarper(20), T.TopPLogitsWarper(0.9)]),
])
def test_processors_match_transformers(kw, procs):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    seen = torch.randint(0, 50, (4, 12), generator=g)
    ref = logits.clone()
    for p in procs:
        ref = p(seen, ref)
    assert torch.equal(process_logits(logits, seen, **kw).isinf(), ref.isinf())
    finite = ~ref.isinf()
    assert torch.allclose(process_logits(logits, seen, **kw)[finite], ref[finite])


def test_seeded_sampling_is_reproducible(char_model):
    model, tok = char_model
    ids = torch.tensor([tok.encode("the ")])
    a = generate(model, ids, max_new_tokens=20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    b = generate(model, ids, max_new_tokens=20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_stop_string_and_eos_end_generation(char_model):
    model, tok = char_model
    free = generate_text(model, tok, "the ", max_new_tokens=30)
    assert len(free) == 30
    stop = free[3:5]
    cut = generate_text(model, tok, "the ", max_new_tokens=30, stop=[stop])
    assert cut == free[: free.index(stop)]
    eos = tok.encode(free[4])[0]
    out = generate(model, torch.tensor([tok.encode("the ")]), max_new_tokens=30, eos_id=eos)
    assert out[0, -1].item() == eos and out.shape[1] <= 4 + 30


def test_streaming_gives_the_same_text(char_model):
    model, tok = char_model
    pieces = []
    text = generate_text(model, tok, "over ", max_new_tokens=25, stream=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1


def test_streaming_never_splits_a_utf8_character():
    tok = Tokenizer.gpt2()
    from allformers.generation import TextStream

    pieces = []
    stream = TextStream(tok, pieces.append)
    for i in tok.encode("naïve café 日本語 🙂 done"):
        stream(i)
    assert "".join(pieces) == "naïve café 日本語 🙂 done" and all("\ufffd" not in p for p in pieces)


def test_batch_of_prompts(char_model):
    model, tok = char_model
    outs = generate_text(model, tok, ["the ", "a lazy dog", "fox"], max_new_tokens=10)
    assert outs == [generate_text(model, tok, p, max_new_tokens=10) for p in ["the ", "a lazy dog", "fox"]]


def test_prompt_longer_than_context_is_a_clear_error(char_model):
    model, tok = char_model
    ids = torch.tensor([tok.encode(TEXT[:60])])
    with pytest.raises(ContextLengthError, match=r"60 tokens and max_new_tokens=10: 70 > the model's context of 64"):
        generate(model, ids, max_new_tokens=10)
    with pytest.raises(ContextLengthError, match="block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_bad_arguments(char_model):
    model, tok = char_model
    with pytest.raises(Exception, match="temperature"):
        generate(model, torch.tensor([[1]]), temperature=-1)
    with pytest.raises(Exception, match="tokenizer"):
        generate(model, torch.tensor([[1]]), stop=["x"])
    with pytest.raises(Exception, match="at least one token"):
        left_pad([[1], []], 0)
