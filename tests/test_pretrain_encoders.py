"""Encoder pretraining from scratch (BERT MLM and ELECTRA) on a slice of State of the Union:
the tokenizer, the sparse-head losses against the library's, a few steps of each recipe,
the shared embeddings, the two-network checkpoint, fine-tuning the result, and the command.
Tiny settings (50k characters, 500-token vocabulary, 32-token rows): a few seconds each."""
import json

import pytest
import torch

import allformers
from allformers.cli.main import main
from allformers.objectives import MLMMasker, electra_loss, mlm_loss
from allformers.training.data import DataError
from allformers.recipes.finetune import finetune
from allformers.recipes.pretrain_encoders import (ELECTRA_EQUAL_FLOP_STEPS, ElectraTrainer, PretrainRecipe,
                                                   build_models, check_phases, encode_rows, equal_flop_steps,
                                                   get_pretrain_recipe, phase_steps,
                                                   read_text, recipe_step_flops, resolve_text, run_pretrain_recipe,
                                                   sparse_electra_loss, sparse_mlm_loss, split_rows, train_wordpiece)
from allformers.recipes import RECIPES, UnknownRecipeError

CHARS, VOCAB, SEQ = 50_000, 500, 32
TINY = {"max_chars": CHARS, "vocab_size": VOCAB, "seq_len": SEQ, "batch_size": 8, "eval_rows": 16,
        "log_interval": 2, "eval_interval": 0, "threads": 1}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def text():
    try:
        return read_text(resolve_text(), CHARS)
    except DataError:
        pytest.skip("sotu/sotu.txt not found under ../shared/data")


@pytest.fixture(scope="module")
def tok(text):
    return train_wordpiece(text, VOCAB)


@pytest.fixture(scope="module")
def rows(tok, text):
    return encode_rows(tok, text, SEQ)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text):
    """Both recipes, 16 steps each, on the slice (the tokenizer trained by the first, shared)."""
    root = tmp_path_factory.mktemp("pretrain")
    threads = torch.get_num_threads()  # the Trainer sets threads=1 for the process: put it back after
    bert = run_pretrain_recipe("bert-mlm-sotu-tiny", out=root / "bert", max_steps=16, overrides=TINY,
                               progress=False, verbose=False)
    electra = run_pretrain_recipe("electra-sotu-tiny", out=root / "electra", max_steps=16, overrides=TINY,
                                  tokenizer=root / "bert" / "encoder", progress=False, verbose=False,
                                  return_model=True)
    torch.set_num_threads(threads)
    return {"root": root, "bert": bert, "electra": electra}


def train_losses(run) -> list:
    lines = open(run["metrics"]).read().splitlines()
    return [json.loads(ln)["loss"] for ln in lines if json.loads(ln)["event"] == "train"]


# ---------------------------------------------------------------------- tokenizer and rows
def test_wordpiece_has_bert_specials_and_frames_batches(tok, rows, text):
    assert [tok.token_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    b = tok.batch(["The Congress of the United States", "Peace"], max_length=16)
    ids = b["input_ids"]
    assert ids[0, 0] == 2 and ids[0, int(b["attention_mask"][0].sum()) - 1] == 3  # [CLS] ... [SEP]
    assert ids[1, -1] == tok.pad_id == 0
    assert tok.encode("The Congress")[0] != 2  # plain encode adds nothing
    masker = MLMMasker.from_tokenizer(tok)
    assert masker.mask_id == 4 and {0, 1, 2, 3, 4} <= set(masker.special_ids)
    # rows: [CLS] + stream + [SEP], and the stream continues from row to row
    assert rows.shape[1] == SEQ and (rows[:, 0] == 2).all() and (rows[:, -1] == 3).all()
    assert not torch.isin(rows[:, 1:-1], torch.tensor([0, 2, 3, 4])).any()
    tok.batch(["x"], max_length=4)  # leaves truncation switched on in the backend ...
    assert torch.equal(encode_rows(tok, text, SEQ), rows)  # ... which encode_rows turns off
    train, held = split_rows(rows, 10)
    assert len(held) == len(rows) // 10 and len(train) + len(held) == len(rows)


# ---------------------------------------------------------------------- sparse heads = the library's losses
def test_sparse_losses_equal_the_library_losses(tok, rows):
    recipe = get_pretrain_recipe("electra-sotu-tiny")
    import dataclasses

    recipe = dataclasses.replace(recipe, seq_len=SEQ)
    masker = MLMMasker.from_tokenizer(tok)
    batch = masker.apply({"input_ids": rows[:6]}, torch.Generator().manual_seed(0))
    bert = build_models(dataclasses.replace(get_pretrain_recipe("bert-mlm-sotu-tiny"), seq_len=SEQ), tok.vocab_size, 0)
    sparse, logits, labels = sparse_mlm_loss(bert, batch)
    assert torch.allclose(sparse, mlm_loss(bert, batch), atol=1e-5)
    assert logits.shape == (int((batch["labels"] != -100).sum()), tok.vocab_size)

    pair = build_models(recipe, tok.vocab_size, 0)
    lib, lib_parts = electra_loss(pair, batch, sample_generator=torch.Generator().manual_seed(7), return_parts=True)
    ours, parts = sparse_electra_loss(pair, batch, sample_generator=torch.Generator().manual_seed(7))
    assert torch.equal(parts["corrupted"], lib_parts["corrupted"])  # the same samples, token for token
    assert torch.allclose(ours, lib, atol=1e-4)
    assert torch.allclose(parts["gen_loss"], lib_parts["gen_loss"], atol=1e-5)


def test_equal_flop_steps_and_electra_costs_more_per_step(tok, rows):
    f_bert = recipe_step_flops("bert-mlm-sotu-tiny", tok, rows, batch_size=4, overrides={"seq_len": SEQ})
    f_electra = recipe_step_flops("electra-sotu-tiny", tok, rows, batch_size=4, overrides={"seq_len": SEQ})
    assert 0 < f_bert["counted"] < f_electra["counted"] and f_bert["attention"] < f_electra["attention"]
    steps = equal_flop_steps(300, f_bert, f_electra)
    assert steps < 300 and steps * f_electra["total"] <= 300 * f_bert["total"] < (steps + 1) * f_electra["total"]


def test_recipes_are_registered():
    assert {"bert-mlm-sotu-tiny", "electra-sotu-tiny"} <= {n for n, r in RECIPES.items() if isinstance(r, PretrainRecipe)}
    bert, electra = get_pretrain_recipe("bert-mlm-sotu-tiny"), get_pretrain_recipe("electra-sotu-tiny")
    assert electra.train.max_steps == ELECTRA_EQUAL_FLOP_STEPS < bert.train.max_steps
    assert electra.train.replace(max_steps=1) == bert.train.replace(max_steps=1)  # same optimizer and schedule shape
    assert electra.model_overrides == bert.model_overrides  # discriminator = the BERT's size
    with pytest.raises(UnknownRecipeError, match="Did you mean"):
        get_pretrain_recipe("electra-sotu-tin")


def test_bert_two_phase_recipe_pins_90_10(tmp_path, text, monkeypatch):
    recipe = get_pretrain_recipe("bert-two-phase-sotu-tiny")
    assert recipe.phases == ((0.9, 128), (0.1, 512)) and recipe.objective == "mlm"
    assert phase_steps(recipe.phases, recipe.train.max_steps) == [720, 80]
    assert phase_steps(recipe.phases, 1_000_000) == [900_000, 100_000]  # the BERT paper's split
    with pytest.raises(Exception, match="sum to 1"):
        check_phases(((0.9, 128), (0.2, 512)))
    # A 20-step run records the row length of every batch the Trainer draws: 18 short, then 2 long.
    from allformers.objectives import MaskedLMData

    seen, sample = [], MaskedLMData.sample
    monkeypatch.setattr(MaskedLMData, "sample", lambda self, n: seen.append(len(self.data["input_ids"][0]))
                        or sample(self, n))
    out = run_pretrain_recipe("bert-two-phase-sotu-tiny", out=tmp_path, max_steps=20, progress=False,
                              verbose=False, overrides={**TINY, "phases": ((0.9, SEQ), (0.1, 4 * SEQ))})
    assert seen == [SEQ] * 18 + [4 * SEQ] * 2
    assert out["phases"] == [{"steps": 18, "seq_len": SEQ}, {"steps": 2, "seq_len": 4 * SEQ}]
    assert out["model_config"]["block_size"] == 4 * SEQ and out["steps"] == 20


# ---------------------------------------------------------------------- training runs
def test_both_recipes_train_with_finite_decreasing_losses(runs):
    for name in ("bert", "electra"):
        r = runs[name]
        losses = train_losses(r)
        assert r["steps"] == 16 and len(losses) == 8
        assert all(map(torch.isfinite, torch.tensor(losses)))
        assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, (name, losses)  # it learns
        assert r["flops_per_step"]["total"] > 0 and r["train_flops"] == 16 * r["flops_per_step"]["total"]
    parts = runs["electra"]["train_parts"]
    assert set(parts) == {"gen_loss", "disc_loss", "disc_acc", "replaced_fraction"}
    assert 0 < parts["replaced_fraction"] < 0.2  # ~15% selected, minus the samples that hit the original
    assert {"val_gen_loss", "val_disc_loss", "val_disc_acc"} <= set(runs["electra"]["val_metrics"])
    assert "val_mlm_acc" in runs["bert"]["val_metrics"]
    assert runs["bert"]["params"]["encoder"] == pytest.approx(runs["electra"]["params"]["encoder"], rel=0.01)


def test_electra_generator_and_discriminator_share_embeddings_after_training(runs):
    pair = runs["electra"]["model"]
    for name in ("wte", "wpe", "wtt", "embed_norm"):
        assert getattr(pair.generator, name) is getattr(pair.discriminator.body, name)
    # the saved folders agree too: the generator's copy of the embeddings is the discriminator's
    gen = allformers.load(runs["electra"]["generator"])
    disc = allformers.load(runs["electra"]["encoder"])
    assert torch.equal(gen.wte.weight, disc.body.wte.weight) and torch.equal(gen.wpe.weight, disc.body.wpe.weight)
    assert torch.equal(disc.body.wte.weight, pair.discriminator.body.wte.weight)
    assert gen.config.n_embd * 4 == disc.config.n_embd  # generator 1/4 of the discriminator's width


def test_electra_checkpoint_resumes_exactly(tmp_path, runs):
    over = {**TINY, "checkpoint_interval": 3}
    tok_dir = runs["root"] / "bert" / "encoder"
    straight = run_pretrain_recipe("electra-sotu-tiny", out=tmp_path / "a", max_steps=6, overrides=over,
                                   tokenizer=tok_dir, progress=False, verbose=False, return_model=True)
    # stop after 3 steps (the checkpoint), then resume to 6
    import allformers.recipes.pretrain_encoders as pe

    calls = {}
    original_fit = ElectraTrainer.fit

    def fit_three(self, stop_at=None):
        calls["n"] = calls.get("n", 0) + 1
        return original_fit(self, stop_at=3 if calls["n"] == 1 else stop_at)

    pe.ElectraTrainer.fit = fit_three
    try:
        run_pretrain_recipe("electra-sotu-tiny", out=tmp_path / "b", max_steps=6, overrides=over,
                            tokenizer=tok_dir, progress=False, verbose=False)
        assert (tmp_path / "b" / "checkpoint" / "discriminator" / "model.safetensors").exists()
        resumed = run_pretrain_recipe("electra-sotu-tiny", out=tmp_path / "b", max_steps=6, overrides=over,
                                      tokenizer=tok_dir, progress=False, verbose=False, resume=True,
                                      return_model=True)
    finally:
        pe.ElectraTrainer.fit = original_fit
    assert resumed["steps"] == 6
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_pretrained_encoders_load_and_finetune(runs, tmp_path):
    try:
        from allformers.recipes.finetune import resolve_data

        data = resolve_data(None)
    except Exception:
        pytest.skip("spam_assassin/train.jsonl not found under ../shared/data")
    for name in ("bert", "electra"):
        model = allformers.load(runs[name]["encoder"])
        assert model.tokenizer.token_id("[MASK]") == 4 and model.load_report.missing == []
        r = finetune(runs[name]["encoder"], data, tmp_path / name, epochs=1, batch_size=8, max_length=32,
                     max_records=40, lr=1e-3, progress=False, verbose=False)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["split"]["heldout"] > 0
        assert sorted(r["newly_initialised"]) == ["head.dense.bias", "head.dense.weight", "head.out.bias",
                                                  "head.out.weight"]
        clf = allformers.load(tmp_path / name)
        assert clf.config.task == "sequence-classification" and clf.config.n_embd == 128


# ---------------------------------------------------------------------- the command
def test_pretrain_command_lists_and_runs(tmp_path, capsys):
    assert main(["pretrain", "--list"]) == 0
    assert "electra-sotu-tiny" in capsys.readouterr().out
    code = main(["pretrain", "--recipe", "bert-mlm-sotu-tiny", "--out", str(tmp_path / "cli"), "--max-steps", "2",
                 "--max-chars", "20000", "--vocab-size", "300", "--batch-size", "4", "--threads", "1",
                 "--eval-interval", "0", "--no-progress", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["vocab_size"] <= 300 and (tmp_path / "cli" / "encoder" / "tokenizer.json").exists()
    assert main(["pretrain", "--recipe", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown recipe" in capsys.readouterr().err
