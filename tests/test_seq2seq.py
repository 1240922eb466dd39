"""Encoder-decoders against tiny random `transformers` models: logits (import and export) and
cached generation, greedy and beam search, token for token."""
import pytest
import torch
import transformers as T

from allformers import load

V = 99


def tiny(kind, decoder_layers=None):
    torch.manual_seed(0)
    if kind in ("t5v10", "t5v11", "mt5"):
        cls, cfg_cls = (T.MT5ForConditionalGeneration, T.MT5Config) if kind == "mt5" else (T.T5ForConditionalGeneration, T.T5Config)
        cfg = cfg_cls(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=decoder_layers,
                      num_heads=4, feed_forward_proj="relu" if kind == "t5v10" else "gated-gelu",
                      tie_word_embeddings=kind == "t5v10", decoder_start_token_id=0)
        model, eos, pad = cls(cfg), 1, 0
    else:
        cfg = T.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=decoder_layers or 2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_position_embeddings=64, forced_eos_token_id=None)
        model, eos, pad = T.BartForConditionalGeneration(cfg), 2, 1
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval(), eos, pad


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, V, (2, 11), generator=g)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    return x, mask


@pytest.mark.parametrize("kind", ["t5v10", "t5v11", "mt5", "bart"])
def test_logits_import_and_export(kind, tmp_path):
    hf, _, _ = tiny(kind, decoder_layers=3)  # a decoder deeper than the encoder
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    x, mask = inputs()
    y = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        assert (ours(x, y, attention_mask=mask) - ref).abs().max().item() <= 1e-4
    ours.save(tmp_path / "out", format="hf")
    back = T.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (back(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits - ref).abs().max().item() <= 1e-4


def _push_eos(hf, eos, amount):
    """Make EOS likely part-way through, so finished beams and padding are exercised."""
    with torch.no_grad():
        if hasattr(hf, "final_logits_bias"):
            hf.final_logits_bias[0, eos] += amount
        else:
            hf.lm_head.weight[eos] *= 1 + amount


GEN_CASES = [(kind, beams, {}, push) for kind in ("t5v10", "t5v11", "bart") for beams in (1, 4) for push in (0.0, 2.5)]
GEN_CASES += [("t5v10", 4, dict(no_repeat_ngram_size=2), 0.0), ("bart", 4, dict(no_repeat_ngram_size=2), 2.5),
              ("t5v10", 4, dict(length_penalty=2.0, early_stopping=True), 2.5),
              ("bart", 4, dict(length_penalty=0.5, early_stopping="never"), 2.5)]


@pytest.mark.parametrize("kind, beams, kw, eos_push", GEN_CASES)
def test_generation_equals_transformers(kind, beams, kw, eos_push, tmp_path):
    hf, eos, pad = tiny(kind)
    _push_eos(hf, eos, eos_push)
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    x, mask = inputs()
    ref = hf.generate(x, attention_mask=mask, max_new_tokens=30, num_beams=beams, do_sample=False,
                      eos_token_id=eos, pad_token_id=pad, **kw)
    got = ours.generate(x, mask, max_new_tokens=30, num_beams=beams, eos_id=eos, pad_id=pad, **kw)
    assert torch.equal(got, ref), (got, ref)


def test_cached_decoding_equals_full_decoder_pass(tmp_path):
    hf, _, _ = tiny("t5v10")
    hf.save_pretrained(tmp_path / "hf")
    m = load(tmp_path / "hf")
    x, mask = inputs()
    y = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        enc = m.encode(x, mask)
        full = m(None, y, attention_mask=mask, encoder_out=enc)
        cache = m.new_cache(2, 16)
        steps = [m(None, y[:, t:t + 1], attention_mask=mask, encoder_out=enc, cache=cache) for t in range(9)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert cache.cross[0].k is not None  # cross-attention keys were projected once and kept


def test_shift_right_and_errors(tmp_path):
    hf, _, _ = tiny("bart")
    hf.save_pretrained(tmp_path / "hf")
    m = load(tmp_path / "hf")
    labels = torch.tensor([[5, 6, -100]])
    assert m.shift_right(labels).tolist() == [[2, 5, 6]]
    from allformers import ContextLengthError
    from allformers.errors import AllformersError

    with pytest.raises(ContextLengthError, match="max_new_tokens"):
        m.generate(torch.tensor([[5, 6]]), max_new_tokens=100)
    with pytest.raises(AllformersError, match="temperature=0"):
        m.generate(torch.tensor([[5, 6]]), num_beams=2, temperature=1.0)


def test_generate_command_for_an_encoder_decoder(tmp_path, capsys):
    """Text in, text out through the CLI: source tokenized with the tokenizer's own </s>."""
    from tokenizers import processors

    from allformers.cli.main import main
    from allformers.generation import generate_text
    from allformers.tokenization import Tokenizer

    tok = Tokenizer.train_bpe(["summarise this e-mail about the meeting"] * 10, vocab_size=300,
                              special_tokens=("<pad>", "</s>", "<unk>"))
    tok.eos_token, tok.pad_token = "</s>", "<pad>"
    tok.backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.eos_id)])
    torch.manual_seed(0)
    hf = T.T5ForConditionalGeneration(T.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, decoder_start_token_id=0))
    hf.save_pretrained(tmp_path / "hf")
    load(tmp_path / "hf").save(tmp_path / "m", tokenizer=tok)
    m = load(tmp_path / "m")
    assert m.tokenizer.batch(["summarise this"])["input_ids"][0, -1].item() == tok.eos_id
    expected = generate_text(m, m.tokenizer, ["summarise this", "the meeting"], max_new_tokens=6, num_beams=2)
    assert main(["generate", str(tmp_path / "m"), "summarise this", "the meeting", "--max-new-tokens", "6",
                 "--num-beams", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
