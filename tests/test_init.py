"""models/init.py: the init schemes a fresh model gets from Config.init, against the oracles' own
initialisation (the spread of every weight, by HF name, on configs wide enough to estimate it)."""
import pytest
import torch
import transformers

from allformers import Config, TransformerLM
from allformers.checkpoints.hf import hf_family, ours_to_hf
from allformers.config import INITS
from allformers.errors import ConfigError
from allformers.models import Seq2SeqLM
from allformers.models.init import INIT_SCHEMES, init_weights


def _spreads(state: dict) -> dict:
    return {k: v.float().std().item() for k, v in state.items() if v.dim() >= 2}


def _compare(ours: dict, theirs: dict, rel: float = 0.1):
    assert set(ours) == set(theirs)
    off = {k: (ours[k], theirs[k]) for k in ours if abs(ours[k] - theirs[k]) > rel * theirs[k]}
    assert not off, off


def test_every_config_init_has_a_scheme():
    assert set(INITS) == set(INIT_SCHEMES)
    with pytest.raises(ConfigError, match="init='xavier' is not one of"):
        Config(init="xavier")


@pytest.mark.parametrize("name", ["t5-small", "flan-t5-small"])
def test_t5_scheme_matches_hf_t5_init(name):
    c = Config.from_name(name, n_layer=2, n_decoder_layer=2, vocab_size=512)
    assert c.init == "t5"
    torch.manual_seed(0)
    ours = ours_to_hf(Seq2SeqLM(c).state_dict(), c, hf_family(c))
    fam = hf_family(c)
    hf_cfg = transformers.T5Config(**fam.config_to_hf(c))
    torch.manual_seed(0)
    theirs = transformers.T5ForConditionalGeneration(hf_cfg).state_dict()
    theirs = {k: v for k, v in theirs.items() if k in ours}
    _compare(_spreads(ours), _spreads(theirs))
    # the norms start at one, as HF's
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in ours.items() if k.endswith("layer_norm.weight"))


def test_gpt2_and_bert_schemes_match_hf():
    c = Config.from_name("gpt2", n_layer=4, vocab_size=512, block_size=128)
    assert c.init == "gpt2"
    torch.manual_seed(0)
    ours = ours_to_hf(TransformerLM(c).state_dict(), c, hf_family(c))
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_family(c).config_to_hf(c))).state_dict()
    _compare(_spreads(ours), _spreads({k: v for k, v in theirs.items() if k in ours}))

    b = Config.from_name("bert-base-uncased", n_layer=2, vocab_size=512, init="bert", task="base")
    torch.manual_seed(0)
    model = TransformerLM(b)
    spreads = {n: p.std().item() for n, p in model.named_parameters() if p.dim() >= 2}
    # BERT: N(0, 0.02) for every matrix, the residual projections too (GPT-2 would shrink them by 1/sqrt(2 L))
    assert all(abs(s - 0.02) < 0.002 for s in spreads.values()), spreads
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith(".bias"))


def test_init_weights_skips_what_it_is_told_to_keep():
    c = Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, block_size=8)
    model = TransformerLM(c)
    before = model.wte.weight.clone()
    init_weights(model, c, skip=lambda n: n == "wte.weight")
    assert torch.equal(model.wte.weight, before)
    with pytest.raises(ConfigError, match="init='t5' does not know"):
        init_weights(model, c, scheme="t5")  # GPT-2's layout has parts T5's scheme has no rule for
