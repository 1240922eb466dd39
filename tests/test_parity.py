"""Parity with `transformers` on tiny random models: import, export, and greedy generation."""
import torch
import transformers as T

from allformers import load
from allformers.checkpoints.hf import FAMILIES, hf_to_ours, ours_to_hf, read_hf_weights
from allformers.generation import generate, left_pad

from .conftest import VOCAB

TOL = 1e-4


def test_import_logits_match(hf_folder):
    family, hf, folder = hf_folder
    model = load(folder)
    x = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= TOL, f"{family}: max abs logits diff {diff}"
    assert not model.load_report.missing and not model.load_report.unexpected


def test_export_reload_in_transformers(hf_folder, tmp_path):
    family, hf, folder = hf_folder
    model = load(folder)
    model.save(tmp_path / "out", format="hf")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    x = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max().item() <= TOL
        assert (back(x).logits - hf(x).logits).abs().max().item() <= TOL


def test_greedy_30_tokens_equal_transformers(hf_folder):
    family, hf, folder = hf_folder
    model = load(folder)
    x = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    ref = hf.generate(x, max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    ours = generate(model, x, max_new_tokens=30)
    assert ours.shape == ref.shape == (1, 42)
    assert torch.equal(ours, ref)


def test_left_padded_batch_equals_transformers(hf_folder):
    family, hf, folder = hf_folder
    model = load(folder)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (4, 11, 7)]
    ids, mask = left_pad(seqs, pad_id=0)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=15, min_new_tokens=15, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, ids, attention_mask=mask, max_new_tokens=15), ref)


def test_key_maps_round_trip_both_directions(hf_folder):
    """HF -> ours -> HF gives back every tensor unchanged, for every family's template table."""
    family, hf, folder = hf_folder
    model = load(folder)
    hf_state = read_hf_weights(folder)  # the names on disk, which is what the maps are for
    ours, leftover = hf_to_ours(hf_state, model.config, FAMILIES[family])
    assert leftover == []
    back = ours_to_hf(ours, model.config, FAMILIES[family])
    assert set(back) <= set(hf_state)
    for k, v in back.items():
        assert torch.equal(v, hf_state[k]), k
    # the in-memory names of newer transformers load too
    in_memory, leftover = hf_to_ours(hf.state_dict(), model.config, FAMILIES[family])
    assert leftover == [] and set(in_memory) == set(ours)
    # and ours -> HF -> ours
    again, _ = hf_to_ours(back, model.config, FAMILIES[family])
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)
