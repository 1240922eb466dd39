"""Speculative decoding: greedy output identical to plain greedy; sampling keeps the target's distribution."""
import itertools

import pytest
import torch

from allformers import Config, InputError, TransformerLM
from allformers.generation import ModelDraft, NgramDraft, generate, generate_text, speculative_generate
from allformers.tokenization import Tokenizer

from .test_kv_cache import DECODERS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def small(seed: int, vocab: int = 101, n_layer: int = 2, scale: float = 20.0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    m = TransformerLM(Config.from_name("gpt2", n_layer=n_layer, n_head=4, n_embd=32, vocab_size=vocab,
                                       block_size=128, **kw)).eval()
    with torch.no_grad():  # peaked logits: rounding alone cannot flip a greedy choice
        m.wte.weight.mul_(scale)
    return m


def prompt(seed: int, vocab: int = 101, T: int = 12) -> torch.Tensor:
    # a repeated stretch gives prompt lookup something to find
    p = torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([p, p[: T // 2]])[None]


def rewindable(name):
    model = tiny(name)
    return model if getattr(model.new_cache(1, 60), "rewindable", False) else None


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_is_plain_greedy_for_every_decoder(name):
    model = rewindable(name)
    ids = prompt(0, 101)
    if model is None:  # local layers keep a ring of keys: refused, not wrong
        with pytest.raises(InputError, match="cannot be rewound"):
            generate(model or tiny(name), ids, max_new_tokens=30, draft="ngram")
        return
    ref = generate(model, ids, max_new_tokens=30)
    assert torch.equal(generate(model, ids, max_new_tokens=30, draft="ngram", draft_tokens=3), ref)
    assert torch.equal(generate(model, ids, max_new_tokens=30, draft=model, draft_tokens=2), ref)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_identical_for_several_k_and_drafts(k):
    target, other = small(0), small(1, n_layer=1)
    for seed in range(3):
        ids = prompt(seed)
        ref = generate(target, ids, max_new_tokens=40)
        for draft in ("ngram", NgramDraft(max_ngram=2), other, ModelDraft(target)):
            stats = {}
            out = generate(target, ids, max_new_tokens=40, draft=draft, draft_tokens=k, stats=stats)
            assert torch.equal(out, ref), (seed, k, draft)
            assert stats["target_passes"] == stats["rounds"] + 1
    # drafting with the target itself accepts everything: k + 1 tokens per pass
    stats = {}
    generate(target, ids, max_new_tokens=40, draft=target, draft_tokens=k, stats=stats)
    assert stats["accepted"] == stats["proposed"] and stats["rounds"] == -(-39 // (k + 1))


def test_eos_inside_an_accepted_draft_ends_generation():
    target = small(0)
    ids = prompt(2)
    free = generate(target, ids, max_new_tokens=40)[0, ids.shape[1]:].tolist()
    for at in (3, 6, 11):
        eos = free[at]
        ref = generate(target, ids, max_new_tokens=40, eos_id=eos)
        assert ref[0, -1] == eos
        for draft, k in ((target, 4), (target, 7), ("ngram", 5), (small(1, n_layer=1), 3)):
            assert torch.equal(generate(target, ids, max_new_tokens=40, eos_id=eos, draft=draft, draft_tokens=k), ref)


def test_max_new_tokens_stop_strings_and_streaming_match_plain():
    text = "the quick brown fox jumps over the lazy dog. " * 4
    tok = Tokenizer.char(text)
    torch.manual_seed(0)
    model = TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=2)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(20)
    free = generate_text(model, tok, "the quick ", max_new_tokens=25)
    for n in (0, 1, 2, 25):
        assert generate_text(model, tok, "the quick ", max_new_tokens=n, draft="ngram") == free[:n]
    stop = free[5:7]
    streamed = []
    cut = generate_text(model, tok, "the quick ", max_new_tokens=25, stop=[stop], draft="ngram", draft_tokens=4,
                        stream=streamed.append)
    assert cut == generate_text(model, tok, "the quick ", max_new_tokens=25, stop=[stop])
    assert "".join(streamed).startswith(cut)
    # repetition penalty: each verified place sees the drafts before it
    assert (generate_text(model, tok, "the quick ", max_new_tokens=25, repetition_penalty=1.3, draft=model)
            == generate_text(model, tok, "the quick ", max_new_tokens=25, repetition_penalty=1.3))


def test_ngram_proposes_the_continuation_of_the_latest_full_match():
    d = NgramDraft(max_ngram=3)
    assert d.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3, None, None)[0] == [8, 9, 1]
    assert d.propose([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3], 2, None, None)[0] == [5, 6]  # latest 2-gram match
    assert d.propose([4, 4, 4], 5, None, None)[0] == [4]  # the longest n-gram wins, even with a short run
    assert d.propose([1, 2, 3], 3, None, None)[0] == []


def test_refusals():
    target = small(0)
    ids = prompt(0)
    with pytest.raises(InputError, match="batch 1"):
        generate(target, ids.expand(2, -1), max_new_tokens=5, draft="ngram")
    with pytest.raises(InputError, match="vocabulary"):
        generate(target, ids, max_new_tokens=5, draft=small(1, vocab=120))
    with pytest.raises(InputError, match="draft_tokens"):
        generate(target, ids, max_new_tokens=5, draft="ngram", draft_tokens=0)
    with pytest.raises(InputError, match="ngram"):
        generate(target, ids, max_new_tokens=5, draft="bigram")
    local = TransformerLM(Config.from_name("gpt2", n_layer=2, n_head=4, n_embd=32, vocab_size=101, block_size=128,
                                           attention_pattern=["global", "local"], window_size=8)).eval()
    with pytest.raises(InputError, match="cannot be rewound"):
        generate(local, ids, max_new_tokens=20, draft="ngram")
    # one padded row: the padding is dropped, the output is the unpadded prompt's
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    assert torch.equal(generate(target, padded, attention_mask=mask, max_new_tokens=10, draft="ngram")[:, 3:],
                       generate(target, ids, max_new_tokens=10))


# ------------------------------------------------------------------ sampling keeps the target's distribution
V, N_NEW = 4, 3


def exact_joint(model, ids, sampling):
    """P(the first N_NEW tokens = each of the V**N_NEW continuations) under the target, by enumeration."""
    from allformers.generation.speculative import Sampling

    s = Sampling(**sampling)
    conts = torch.tensor(list(itertools.product(range(V), repeat=N_NEW)))  # (V^n, n)
    seqs = torch.cat([ids.expand(len(conts), -1), conts], 1)
    with torch.no_grad():
        logits = model(seqs)[:, ids.shape[1] - 1:-1]  # (V^n, n, V): the distribution before each new token
    logp = torch.stack([s.logits(logits[:, j], None).log_softmax(-1) for j in range(N_NEW)], 1)
    return logp.gather(2, conts[..., None])[..., 0].sum(1).exp().double()  # (V^n,)


def chi_square(counts: torch.Tensor, probs: torch.Tensor):
    """(statistic, degrees of freedom); cells expected below 5 times are pooled into one."""
    expected = probs * counts.sum()
    assert counts[probs == 0].sum() == 0, "a continuation of probability 0 was sampled"
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def drafter_far_from(seed: int) -> TransformerLM:
    # its own head, peaked: proposals the target often rejects (tied heads this small agree too much)
    d = small(seed, vocab=V, n_layer=1, scale=1, tie_embeddings=False)
    with torch.no_grad():
        d.lm_head.weight.mul_(20)
    return d


def check_sampling(draft_kind: str, sampling: dict, samples: int):
    target = small(0, vocab=V, scale=2)
    ids = torch.tensor([[0, 1, 2, 3, 0, 1]])
    drafter = drafter_far_from(5)
    draft = drafter if draft_kind == "model" else "ngram"
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V ** N_NEW, dtype=torch.float64)
    accepted = proposed = 0
    for _ in range(samples):  # tokens 2 and 3 go through accept / reject, or are the free token
        stats = {}
        out = speculative_generate(target, ids, draft, draft_tokens=2, max_new_tokens=N_NEW + 1, generator=g,
                                   stats=stats, **sampling)[0, ids.shape[1]:ids.shape[1] + N_NEW].tolist()
        counts[sum(t * V ** (N_NEW - 1 - j) for j, t in enumerate(out))] += 1
        accepted, proposed = accepted + stats["accepted"], proposed + stats["proposed"]
    p = exact_joint(target, ids, sampling)
    stat, df = chi_square(counts, p)
    assert stat < df + 4.3 * (2 * df) ** 0.5, (stat, df)  # about the p = 1e-4 quantile for df 20..63
    assert 0 < accepted < proposed  # both accepted and rejected drafts were exercised
    if draft_kind == "model":  # power: the draft's distribution is far from the target's, so a rule
        q = exact_joint(drafter, ids, sampling)  # that kept its proposals too often would show
        assert 0.5 * float((p - q).abs().sum()) > 0.3
        assert chi_square(counts, q.clamp(min=1e-12))[0] > 10 * df


def test_sampling_keeps_the_target_distribution_prompt_lookup():
    check_sampling("ngram", dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0), 1000)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [
    dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0),
    dict(temperature=0.8, top_k=3, top_p=None, repetition_penalty=1.0),
])
def test_sampling_keeps_the_target_distribution_draft_model(sampling):
    check_sampling("model", sampling, 3000)


def test_sampling_with_a_draft_model_quick():
    """The fast suite's version of the slow check, on fewer samples."""
    check_sampling("model", dict(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0), 400)


# ------------------------------------------------------------------ the command line
def test_cli_speculative_ngram_and_draft_path_print_plain_greedy(tmp_path, capsys):
    from allformers.cli.main import main

    text = "to be or not to be, that is the question. "
    tok = Tokenizer.char(text)
    torch.manual_seed(0)
    TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=2)).save(tmp_path / "t", tokenizer=tok)
    TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=1)).save(tmp_path / "d", tokenizer=tok)
    args = ["generate", str(tmp_path / "t"), "to be or not to be", "--max-new-tokens", "20"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative", "ngram", "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--speculative", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out.endswith(plain)  # after the draft's load report
    assert main(args + ["--speculative", "ngram", "--draft-tokens", "0"]) == 2
    assert "draft_tokens" in capsys.readouterr().err
