"""Recipes: every named experiment, in one registry, on top of the training engine.

    from allformers.recipes import RECIPES, run_recipe
    result = run_recipe("shakespeare-char-cpu", out="runs/x", max_steps=200)

`allformers train --list` lists them all, `allformers train --recipe NAME` runs any of them.
Each module below registers its recipes (a `Recipe` subclass holding every setting of one
experiment, with its `run`); registry.py has the registry and the one overrides parser."""
from .registry import (RECIPES, Recipe, RecipeError, UnknownRecipeError, apply_overrides, describe, get_recipe,
                       parse_set, prepare, register, run_recipe)
from . import char_lm, pretrain_encoders, seq2seq, finetune, sft, self_instruct, rlhf, mmcot, text_to_image, ctrl, koala  # noqa: F401,E402  (register)
from .char_lm import CharLMRecipe  # noqa: E402

__all__ = ["RECIPES", "Recipe", "CharLMRecipe", "RecipeError", "UnknownRecipeError", "apply_overrides", "describe", "get_recipe",
           "parse_set", "prepare", "register", "run_recipe"]
