"""Every head of every supported Hugging Face family against its `transformers` class.

The cases come from the key tables themselves (FAMILIES[...].architectures, plus the sentence-transformers
reading of each bare backbone), so a family or head added there without a tiny config and an output reader
here fails. Each case: a tiny random HF model (biases and norms moved off their init so a misplaced vector
shows), loaded by allformers; HF's output shapes exactly and values within 1e-4 with and without an
attention mask (right padding, the pad id in the padding), with and without token-type / language ids;
then exported, read back by transformers, and compared again."""
import json

import pytest
import torch
import transformers as T

from allformers import load
from allformers.checkpoints.hf import FAMILIES, architecture
from allformers.config import Config

V = 99
TOL = 1e-4
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V,
           max_position_embeddings=64)
DEC = dict(vocab_size=V, bos_token_id=0, eos_token_id=0)
DEBERTA_V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=32, norm_rel_ebd="layer_norm",
                  share_att_key=True, pos_att_type="p2c|c2p", position_biased_input=False)

# One tiny config per family, with the switches that make it different turned on (GPT-Neo's local layers with a
# window shorter than the inputs, Mixtral's experts and sliding window): ELECTRA's narrow embeddings and
# a hidden_act that is not its classifier's GELU, XLM's two languages, DeBERTa-v3's buckets plus segment ids, a
# T5 decoder deeper than its encoder, a BART decoder of another depth, head count and FFN width.
CONFIGS = {
    "bert": lambda: T.BertConfig(**ENC),
    "roberta": lambda: T.RobertaConfig(**ENC, pad_token_id=1, type_vocab_size=1),
    "electra": lambda: T.ElectraConfig(**ENC, embedding_size=16, hidden_act="relu"),
    "albert": lambda: T.AlbertConfig(**ENC, embedding_size=16),
    "distilbert": lambda: T.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=V,
                                             max_position_embeddings=64),
    "xlm": lambda: T.XLMConfig(emb_dim=32, n_layers=2, n_heads=4, vocab_size=V, max_position_embeddings=64, n_langs=2),
    "deberta-v2": lambda: T.DebertaV2Config(**ENC, type_vocab_size=2, **DEBERTA_V3),
    "gpt2": lambda: T.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, **DEC),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64,
                                        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, **DEC),
    "llama": lambda: T.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                   intermediate_size=64, max_position_embeddings=64, **DEC),
    "bloom": lambda: T.BloomConfig(n_layer=2, n_head=4, hidden_size=32, **DEC),
    "gpt_neo": lambda: T.GPTNeoConfig(num_layers=3, num_heads=4, hidden_size=32, max_position_embeddings=64,
                                      attention_types=[[["global", "local", "local"], 1]], window_size=5, **DEC),
    "mixtral": lambda: T.MixtralConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                       intermediate_size=48, max_position_embeddings=64, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=6, **DEC),
    "opt": lambda: T.OPTConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, ffn_dim=64,
                               max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1, **DEC),
    "ctrl": lambda: T.CTRLConfig(n_layer=2, n_head=4, n_embd=32, dff=64, n_positions=64, **DEC),
    "xlnet": lambda: T.XLNetConfig(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_inner=64),
    "t5": lambda: T.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                             feed_forward_proj="relu", decoder_start_token_id=0),
    "mt5": lambda: T.MT5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
                               num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0),
    "bart": lambda: T.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=48,
                                 max_position_embeddings=64, forced_eos_token_id=None),
}
TYPES = {"bert": "token_type_ids", "roberta": "token_type_ids", "electra": "token_type_ids",
         "albert": "token_type_ids", "deberta-v2": "token_type_ids", "xlm": "langs", "xlnet": "token_type_ids"}
LEFT_PADDED = {"xlnet"}  # XLNet's tokenizer pads on the left: its classifier reads the last position


# ---------------------------------------------------------------------- outputs, by task: a list of tensors (or None)
def _pooled(h, mask, how):
    """The sentence-transformers reading of a bare backbone: pooled token states, unit length."""
    if how == "mean":
        m = torch.ones(h.shape[:2]) if mask is None else mask.float()
        h = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    else:
        h = h[:, 0]
    return torch.nn.functional.normalize(h, dim=-1)


HF_OUT = {
    "lm": lambda o, mask: [o.logits],
    "sequence-classification": lambda o, mask: [o.logits],
    "token-classification": lambda o, mask: [o.logits],
    "replaced-token-detection": lambda o, mask: [o.logits],
    "question-answering": lambda o, mask: [o.start_logits, o.end_logits],
    "pretraining": lambda o, mask: [o.prediction_logits,
                                    o.seq_relationship_logits if hasattr(o, "seq_relationship_logits") else o.sop_logits],
    "base": lambda o, mask: [o.last_hidden_state, o.pooler_output if hasattr(o, "pooler_output") else None],
    "embedding": lambda o, mask: [_pooled(o.last_hidden_state, mask, "mean")],
}
OURS_OUT = {
    "lm": lambda o: [o], "sequence-classification": lambda o: [o], "token-classification": lambda o: [o],
    "replaced-token-detection": lambda o: [o], "embedding": lambda o: [o],
    "question-answering": lambda o: list(o), "pretraining": lambda o: list(o),
    "base": lambda o: [o.last_hidden_state, o.pooler_output],
}


def _tasks(family):
    """The heads a family's table lists, plus "embedding": its bare backbone read as a sentence encoder."""
    tasks = sorted(family.architectures)
    return tasks + (["embedding"] if "base" in tasks else [])


CASES = [(mt, task, "") for mt, f in FAMILIES.items() for task in _tasks(f)]
# HF's switches that a head has or lacks: a BertModel saved without its pooler, one language (no language embeddings:
# exported as the DistilBERT it then equals).
VARIANTS = {("bert", "base", "no-pooler"): dict(init=dict(add_pooling_layer=False)),
            ("xlm", "base", "one-language"): dict(config=dict(n_langs=1), export_as="DistilBertModel"),
            ("electra", "replaced-token-detection", "gelu"): dict(config=dict(hidden_act="gelu", embedding_size=32)),
            # OPT-350m's post-norm layers (no final norm); OPT without biases, with an untied head
            ("opt", "lm", "post-norm"): dict(config=dict(do_layer_norm_before=False)),
            ("opt", "lm", "no-bias-untied"): dict(config=dict(enable_bias=False, tie_word_embeddings=False))}
CASES += list(VARIANTS)
EXPORT_AS = {("mt5", "lm"): "T5ForConditionalGeneration"}  # the same layout; allformers writes mT5 as T5


def test_every_family_head_is_covered():
    """A new family needs a tiny config here, a new head task an output reader on both sides."""
    missing = sorted(set(FAMILIES) - set(CONFIGS))
    assert not missing, f"families without a tiny config in {__file__}: {missing}"
    tasks = {t for f in FAMILIES.values() for t in _tasks(f)}
    assert tasks <= set(HF_OUT) and tasks <= set(OURS_OUT), f"head tasks without an output reader: {tasks - set(HF_OUT)}"
    assert {(mt, t) for mt, t, _ in CASES} == {(mt, t) for mt, f in FAMILIES.items() for t in _tasks(f)}


# ---------------------------------------------------------------------- models and inputs
def _hf_model(model_type, task, variant):
    spec = VARIANTS.get((model_type, task, variant), {})
    cfg = CONFIGS[model_type]()
    for k, v in spec.get("config", {}).items():
        setattr(cfg, k, v)
    arch = FAMILIES[model_type].architectures["base" if task == "embedding" else task]
    torch.manual_seed(0)
    model = getattr(T, arch)(cfg, **spec.get("init", {})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            else:  # nonzero biases and norms off 1
                p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(hf_config):
    """ids (3, 12) without padding; the same rows padded with the pad id (on the family's side) and their mask;
    segment/language ids 0 then 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (3, 12), generator=g)  # 0..2 are pad / bos / eos ids in every family here but XLNet
    mask = torch.ones_like(ids)
    if hf_config.model_type in LEFT_PADDED:
        mask[1, :3] = 0
        mask[2, :8] = 0
    else:
        mask[1, 9:] = 0
        mask[2, 4:] = 0
    pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    padded = ids.masked_fill(mask == 0, pad)
    types = torch.zeros_like(ids)
    n_types = getattr(hf_config, "type_vocab_size", None) or getattr(hf_config, "n_langs", 2)
    types[:, 6:] = 1 if n_types > 1 else 0  # RoBERTa has one segment: explicit zeros
    return ids, padded, mask, types


def _runs(model_type, hf_config):
    """(name, ids, mask, types): every combination the family takes."""
    ids, padded, mask, types = _inputs(hf_config)
    runs = [("no mask", ids, None, None), ("padded", padded, mask, None)]
    if model_type in TYPES:
        runs += [("types", ids, None, types), ("padded+types", padded, mask, types)]
    return runs


def _call_hf(model, model_type, ids, mask, types, decoder_ids):
    kw = dict(attention_mask=mask)
    if types is not None:
        kw[TYPES[model_type]] = types
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = decoder_ids
    with torch.no_grad():
        return model(ids, **kw)


def _call_ours(model, ids, mask, types, decoder_ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(ids, decoder_ids, attention_mask=mask)
        return model(ids, attention_mask=mask, **({} if types is None else dict(token_type_ids=types)))


def _compare(ref, got, mask, what):
    """Shapes exactly HF's; values within TOL (per-token outputs on the real tokens). Returns the max |diff|."""
    assert len(ref) == len(got), what
    worst = 0.0
    for r, o in zip(ref, got):
        assert (r is None) == (o is None), f"{what}: HF gives {None if r is None else tuple(r.shape)}, ours " \
                                           f"{None if o is None else tuple(o.shape)}"
        if r is None:
            continue
        assert tuple(o.shape) == tuple(r.shape), f"{what}: HF's shape {tuple(r.shape)}, ours {tuple(o.shape)}"
        keep = mask.bool() if mask is not None and r.shape[:2] == mask.shape else slice(None)
        diff = (r[keep] - o[keep]).abs().max().item()
        assert diff <= TOL, f"{what}: max |diff| {diff:.3g}"
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("model_type, task, variant", CASES, ids=lambda x: x or "main")
def test_head_matches_transformers_both_ways(model_type, task, variant, tmp_path):
    hf = _hf_model(model_type, task, variant)
    hf.save_pretrained(tmp_path / "hf")
    if task == "embedding":  # what sentence-transformers writes beside the backbone
        (tmp_path / "hf" / "1_Pooling").mkdir()
        (tmp_path / "hf" / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    ours = load(tmp_path / "hf")
    assert ours.config.task == task
    decoder_ids = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(1))
    refs = {}
    for name, ids, mask, types in _runs(model_type, hf.config):
        refs[name] = ref = HF_OUT[task](_call_hf(hf, model_type, ids, mask, types, decoder_ids), mask)
        got = OURS_OUT[task](_call_ours(ours, ids, mask, types, decoder_ids))
        diff = _compare(ref, got, None if hf.config.is_encoder_decoder else mask, f"{model_type} {task} import, {name}")
        print(f"{model_type} {task} {variant or 'main'} import {name}: max|diff| {diff:.2e}")

    ours.save(tmp_path / "out", format="hf")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = out_cfg["architectures"][0]
    spec = VARIANTS.get((model_type, task, variant), {})
    assert arch == spec.get("export_as", EXPORT_AS.get((model_type, task), type(hf).__name__))
    assert arch == architecture(FAMILIES[out_cfg["model_type"]], ours.config)
    back = getattr(T, arch).from_pretrained(tmp_path / "out", **spec.get("init", {})).eval()
    for name, ids, mask, types in _runs(model_type, hf.config):
        if out_cfg["model_type"] not in TYPES and types is not None:
            continue  # exported as a family without segment ids (one-language XLM -> DistilBERT)
        got = HF_OUT[task](_call_hf(back, out_cfg["model_type"], ids, mask, types, decoder_ids), mask)
        diff = _compare(refs[name], got, None if hf.config.is_encoder_decoder else mask,
                        f"{model_type} {task} export ({arch}), {name}")
        print(f"{model_type} {task} {variant or 'main'} export {name}: max|diff| {diff:.2e}")


# ---------------------------------------------------------------------- encoder and decoder stacks of different sizes
def test_decoder_stack_sizes_are_its_own_and_are_checked():
    from allformers.errors import ConfigError

    c = Config(is_encoder_decoder=True, n_layer=2, n_decoder_layer=3, n_embd=32, n_head=4, n_decoder_head=2,
               intermediate_size=64, decoder_intermediate_size=48, vocab_size=V, block_size=64)
    dec, enc = c.decoder_config(), c.encoder_config()
    assert (dec.n_layer, dec.n_head, dec.head_dim, dec.n_kv_head, dec.intermediate_size) == (3, 2, 16, 2, 48)
    assert (enc.n_layer, enc.n_head, enc.head_dim, enc.intermediate_size) == (2, 4, 8, 64)
    assert c.replace(n_head=8).n_decoder_head == 2  # explicit: kept
    assert Config(is_encoder_decoder=True, n_embd=32, n_head=4).replace(n_head=8).n_decoder_head == 8  # derived: follows
    with pytest.raises(ConfigError, match="n_decoder_head"):
        Config(is_encoder_decoder=True, n_embd=32, n_head=4, n_decoder_head=3)
    with pytest.raises(ConfigError, match="only apply to encoder-decoders"):
        Config(n_embd=32, n_head=4, decoder_intermediate_size=48)


def test_t5_refuses_what_its_config_cannot_say(tmp_path):
    """T5 shares heads and d_ff between its stacks: such a config goes out as BART or not at all."""
    from allformers.checkpoints.hf import hf_family
    from allformers.errors import CheckpointError

    ours = load(_save(tmp_path, "t5"))
    assert hf_family(ours.config).model_type == "t5"
    for change in (dict(n_decoder_head=2), dict(decoder_intermediate_size=48)):
        other = ours.config.replace(**change)
        assert hf_family(other) is None
        from allformers.models import build_model

        with pytest.raises(CheckpointError, match="no Hugging Face equivalent"):
            build_model(other).save(tmp_path / "refused", format="hf")


def _save(tmp_path, model_type):
    hf = _hf_model(model_type, "lm", "")
    hf.save_pretrained(tmp_path / model_type)
    return tmp_path / model_type


# ---------------------------------------------------------------------- XLM without language ids
def test_xlm_adds_no_language_without_language_ids(tmp_path):
    hf = _hf_model("xlm", "base", "")
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    assert ours.config.default_token_type is None
    ids = torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        zeros = ours(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        none = ours(ids).last_hidden_state
    assert (zeros - none).abs().max() > 1e-3  # language 0 is an embedding of its own, not the default


# ---------------------------------------------------------------------- a bare encoder: HF-shaped and still embeddable
def test_bare_encoder_outputs_and_embeddings(tmp_path):
    from allformers.inference import embed
    from allformers.models import BaseModelOutput, sentence_embedding
    from allformers.tokenization import Tokenizer

    hf = _hf_model("bert", "base", "")
    hf.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    ids, padded, mask, _ = _inputs(hf.config)
    with torch.no_grad():
        out = ours(padded, attention_mask=mask)
    assert isinstance(out, BaseModelOutput)
    h, pooled = out  # a tuple too, as HF's return_dict=False
    assert h.shape == (3, 12, 32) and pooled.shape == (3, 32)
    assert torch.allclose(sentence_embedding(h, mask), _pooled(h, mask, "mean"), atol=1e-6)
    assert torch.allclose(sentence_embedding(h, mask, "first", normalize=False), h[:, 0])
    # embed(): a bare encoder is mean-pooled and normalised (sentence-transformers' default), overrides apply
    ours.tokenizer = Tokenizer.char("a bare encoder gives token states")
    e = embed(ours, ["a bare encoder", "gives token states"])
    b = ours.tokenizer.batch(["a bare encoder", "gives token states"])
    with torch.no_grad():
        h = ours(b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"]).last_hidden_state
    assert torch.allclose(e, _pooled(h, b["attention_mask"], "mean"), atol=1e-6)
    assert torch.allclose(embed(ours, ["a bare encoder"], pooling="first", normalize=False), h[:1, 0], atol=1e-6)
