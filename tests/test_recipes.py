"""The one recipe registry: `allformers train --list` lists every recipe, `allformers train --recipe`
runs any of them, and the one overrides parser puts each setting where it belongs."""
import json
import math

import pytest

from allformers.cli.main import main
from allformers.errors import AllformersError
from allformers.recipes import RECIPES, RecipeError, apply_overrides, get_recipe, parse_set
from allformers.training.data import default_data_root

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny settings that make each recipe run in seconds to a minute (flags of `allformers train`).
CHAR = ["--max-steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--eval-iters", "1",
        "--samples", "0"]
ENCODER = ["--max-steps", "2", "--set", "max_chars=20000", "--set", "vocab_size=300", "--batch-size", "4",
           "--eval-interval", "0"]
SEQ2SEQ = ["--max-steps", "2", "--set", "quick=true", "--batch-size", "4"]
MMCOT = ["--max-steps", "2", "--batch-size", "4", "--set", "n_train=24", "--set", "n_val=4", "--set", "n_test=6",
         "--set", "max_train=24", "--set", "max_eval=6", "--set", "max_rationale_tokens=6", "--set", "vocab_size=400",
         "--set", "d_model=32", "--set", "eval_batch_size=8"]
SMOLLM2_RLHF = ["--set", "train_prompts=4", "--set", "eval_prompts=4", "--set", "best_of_prompts=2", "--set",
                "best_of=2", "--set", "pair_tokens=4", "--set", "eval_tokens=4", "--set", "reward.steps=2", "--set",
                "dpo.steps=2", "--set", "ppo.iterations=1", "--set", "ppo.rollout_batch=4", "--set",
                "ppo.minibatch=4", "--set", "ppo.max_new_tokens=4", "--set", "batch_size=4"]
CTRL = ["--max-steps", "2", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch-size", "2",
        "--set", "eval_batches=1", "--set", "samples_per_code=1", "--set", "sample_chars=4"]
SMOKE = {
    "shakespeare-char-cpu": CHAR, "shakespeare-char-long": CHAR, "ctrl-sources": CTRL, "ctrl-sources-quick": CTRL,
    "bert-mlm-sotu-tiny": ENCODER, "bert-two-phase-sotu-tiny": ENCODER, "electra-sotu-tiny": ENCODER,
    **{name: SEQ2SEQ for name in ("t5-span-corruption-sotu", "bart-denoising-sotu", "t5-subject-lines",
                                  "t5-pretrained-subject-lines", "bart-subject-lines", "bart-pretrained-subject-lines",
                                  "flan-mixture")},
    "spam-minilm": ["--max-steps", "2", "--set", "max_records=40", "--set", "max_length=32"],
    "self-instruct-smollm2": ["--set", "num=1", "--set", "max_rounds=1", "--set", "output_tokens=8", "--set",
                              "instruction_tokens=24", "--batch-size", "1"],
    "sft-smollm2-lora": ["--max-steps", "2", "--batch-size", "2", "--set", "max_length=64"],
    "koala-smollm2-lora": ["--max-steps", "2", "--batch-size", "2", "--set", "max_length=64", "--set", "mixture_size=12"],
    "rlhf-smollm2": SMOLLM2_RLHF, "rlhf-smollm2-quick": SMOLLM2_RLHF,
    "mmcot-synthetic-t5-vit": MMCOT,
    "mmcot-scienceqa-t5": MMCOT,
    "mmcot-scienceqa-smollm2": MMCOT[:2] + ["--batch-size", "2", "--set", "max_train=4", "--set", "max_eval=2",
                                            "--set", "max_rationale_tokens=4", "--set", "eval_batch_size=2"],
    **{name: ["--set", "quick=true"] for name in ("shapes-judge", "dalle-shapes", "glide-shapes", "ldm-shapes",
                                                  "imagen-shapes")},
}

def run_cli(name, tmp_path, capsys, extra=()):
    code = main(["train", "--recipe", name, "--out", str(tmp_path / name), "--no-progress", "--json",
                 *SMOKE[name], *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    out = captured.out
    return json.loads(out[out.index("{"):])


def test_list_shows_every_recipe_of_every_kind(capsys):
    assert main(["train", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    kinds = {r.kind for r in RECIPES.values()}
    assert kinds == {"char-lm", "encoder-pretraining", "seq2seq", "fine-tuning", "sft", "self-instruct", "rlhf",
                     "multimodal-cot", "text-to-image", "ctrl"}
    assert all(f"[{k}]" in out for k in kinds)
    assert set(SMOKE) == set(RECIPES)  # a new recipe adds its smoke settings here, so the slow test runs it


def test_overrides_go_where_the_field_is():
    char = get_recipe("shakespeare-char-cpu")
    r = apply_overrides(char, {"lr": 1e-2, "n_layer": 1, "eval_iters": 3, "train.beta2": 0.9, "dropout": None})
    assert (r.train.lr, r.train.beta2, r.eval_iters, r.model_overrides["n_layer"]) == (1e-2, 0.9, 3, 1)
    assert r.model_overrides["dropout"] == char.model_overrides["dropout"] and char.train.lr == 3e-3  # None skipped
    s2s = apply_overrides(get_recipe("t5-pretrained-subject-lines"), {"batch_size": 4, "finetune.lr": 1e-4})
    assert s2s.pretrain.batch_size == s2s.finetune.batch_size == 4 and s2s.finetune.lr == 1e-4
    assert s2s.pretrain.lr == get_recipe("t5-pretrained-subject-lines").pretrain.lr
    rl = apply_overrides(get_recipe("rlhf-smollm2"), {"lr": 1e-4, "seed": 3})
    assert rl.reward.lr == rl.ppo.lr == rl.dpo.lr == 1e-4
    assert rl.seed == 3 and rl.ppo.seed == 0  # a recipe's own field wins: the stages keep their seeds
    with pytest.raises(RecipeError, match="did you mean n_layer"):
        apply_overrides(char, {"n_layers": 2})
    with pytest.raises(RecipeError, match="unknown setting 'ppo.nope'"):
        apply_overrides(get_recipe("rlhf-smollm2"), {"ppo.nope": 1})
    assert parse_set(["lr=3e-4", "quick=true", "model=minilm", "phases=[[1.0, 64]]"]) == \
        {"lr": 3e-4, "quick": True, "model": "minilm", "phases": [[1.0, 64]]}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_set(["lr"])


def test_max_steps_reaches_every_stage():
    assert get_recipe("t5-pretrained-subject-lines").with_max_steps(5).finetune.max_steps == 5
    assert get_recipe("t5-pretrained-subject-lines").with_max_steps(5).pretrain.max_steps == 5
    mm = get_recipe("mmcot-synthetic-t5-vit").with_max_steps(7)
    assert mm.rationale_steps == mm.answer_steps == 7
    assert get_recipe("spam-minilm").with_max_steps(3).max_steps == 3
    with pytest.raises(AllformersError, match="reward.steps=4"):
        get_recipe("rlhf-smollm2").with_max_steps(4)


def test_unknown_recipe_and_setting_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--recipe", "shakespeare-char-cpuu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Did you mean: shakespeare-char-cpu" in err and "Traceback" not in err
    assert main(["train", "--recipe", "spam-minilm", "--set", "epochz=2", "--out", str(tmp_path)]) == 2
    assert "did you mean epochs" in capsys.readouterr().err


needs_data = pytest.mark.skipif(default_data_root() is None, reason="../shared/data is not here")


@needs_data
def test_train_runs_an_encoder_pretraining_recipe(tmp_path, capsys):
    r = run_cli("electra-sotu-tiny", tmp_path, capsys)
    assert r["steps"] == 2 and r["objective"] == "electra" and math.isfinite(r["val_loss"])
    assert (tmp_path / "electra-sotu-tiny" / "encoder" / "model.safetensors").exists()


@needs_data
def test_train_runs_the_fine_tuning_recipe(tmp_path, capsys):
    r = run_cli("spam-minilm", tmp_path, capsys)
    assert r["settings"]["steps"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and r["labels"] == ["ham", "spam"]


@needs_data
def test_train_runs_the_ctrl_recipe(tmp_path, capsys):
    r = run_cli("ctrl-sources-quick", tmp_path, capsys)
    assert r["steps"] == 2 and set(r["per_code"]) == {"<shakespeare>", "<sotu>"} and 0.0 <= r["code_accuracy"] <= 1.0
    assert r["classifier_accuracy_on_real_text"] > 0.5
    assert main(["generate", r["model_dir"], "", "--control-code", "<sotu>", "--max-new-tokens", "3"]) == 0


def test_train_runs_a_multimodal_cot_recipe(tmp_path, capsys):
    r = run_cli("mmcot-synthetic-t5-vit", tmp_path, capsys)
    assert r["scores"]["total"] == 6 and (tmp_path / "mmcot-synthetic-t5-vit" / "mmcot.json").exists()


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_runs_through_train(name, tmp_path, capsys):
    r = run_cli(name, tmp_path, capsys)
    assert r  # each recipe returns its summary; its own tests check what is in it
    assert (tmp_path / name).is_dir()


# ---------------------------------------------------------------------- one set of argument names
def test_old_argument_names_still_work_with_a_deprecation_message(tmp_path, capsys):
    from allformers.cli.main import build_parser
    from allformers.training import TrainConfig

    args = build_parser().parse_args(["train", "--out-dir", str(tmp_path), "--max-iters", "3", "--num-threads", "1",
                                      "--data-dir", "d", "--warmup-iters", "2"])
    assert (args.out, args.max_steps, args.threads, args.data, args.o_warmup_steps) == (str(tmp_path), 3, 1, "d", 2)
    err = capsys.readouterr().err
    assert "--out-dir is deprecated, use --out" in err and "--max-iters is deprecated, use --max-steps" in err
    args = build_parser().parse_args(["train", "--out", "o", "--max-steps", "4", "--threads", "2", "--data", "x"])
    assert (args.out, args.max_steps, args.threads, args.data) == ("o", 4, 2, "x") and not capsys.readouterr().err
    with pytest.warns(DeprecationWarning, match="max_iters= is deprecated, use max_steps="):
        cfg = TrainConfig(max_iters=7, warmup_iters=2, num_threads=1)
    assert (cfg.max_steps, cfg.warmup_steps, cfg.threads) == (7, 2, 1)
    with pytest.warns(DeprecationWarning, match="use .max_steps"):
        assert cfg.max_iters == 7
    with pytest.warns(DeprecationWarning):
        assert TrainConfig.from_dict({"max_iters": 9}).max_steps == 9 and cfg.replace(max_iters=5).max_steps == 5
    with pytest.warns(DeprecationWarning, match="use max_steps="):
        assert apply_overrides(get_recipe("shakespeare-char-cpu"), {"max_iters": 11}).train.max_steps == 11
    with pytest.raises(TypeError, match="pass only max_steps="):
        TrainConfig(max_iters=1, max_steps=2)
