"""The one registry of named experiments, and the one way to change a recipe's settings.

A recipe is a dataclass (a `Recipe` subclass) that holds every setting of one experiment and
knows how to run it: `recipe.run(out=..., data=..., progress=..., resume=...)` -> a summary dict.
`register` puts it into RECIPES under its name; `run_recipe(name, ...)` (and `allformers train
--recipe NAME`) looks it up, applies the caller's changes and runs it.

Changing settings (`apply_overrides`, the CLI's flags and `--set KEY=VALUE`):
  * a key that is a field of the recipe itself is set there (`epochs`, `seq_len`, `model` ...);
  * otherwise it is set in every nested settings object that has that field: a TrainConfig
    (`lr`, `batch_size`, `seed`, ...), several at once for multi-stage recipes, or an RLHF
    stage's PPOConfig / DPOConfig;
  * a dotted key names one nested object (`ppo.lr`, `finetune.max_steps`);
  * otherwise, when the recipe builds a model from a zoo config, a model Config field goes into
    its `model_overrides` (`n_layer`, `dropout`, `block_size` ...);
  * anything else is refused with the close matches named.
`max_steps` is one hook per recipe (`with_max_steps`): by default it sets every TrainConfig's
max_steps; recipes whose stages are counted otherwise say how to size them."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

from ..deprecation import renamed_kwargs
from ..errors import AllformersError
from ..training.trainer import TrainConfig

RECIPES: dict[str, "Recipe"] = {}
NOT_OVERRIDABLE = {"name", "description", "target"}


class UnknownRecipeError(AllformersError, KeyError):
    def __init__(self, name, known):
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        self.msg = f"unknown recipe {name!r}.{hint} Known recipes: {', '.join(sorted(known))}"
        super().__init__(self.msg)

    def __str__(self):  # KeyError would quote the message
        return self.msg


class RecipeError(AllformersError, ValueError):
    """A recipe is registered twice, or a change to its settings does not fit it."""


@dataclass(kw_only=True)
class Recipe:
    """Base of every named experiment. Subclasses add their settings as fields and implement run()."""

    name: str = ""
    description: str = ""
    target: str = ""  # what the recipe is tuned to reach, for docs and `allformers train --list`
    kind: ClassVar[str] = "recipe"  # what it trains, shown by --list

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        raise NotImplementedError(f"{type(self).__name__} does not implement run()")

    def with_max_steps(self, n: int) -> "Recipe":
        """The recipe with every TrainConfig set to n optimizer steps."""
        if not train_configs(self):
            raise RecipeError(f"recipe {self.name!r} ({self.kind}) has no TrainConfig to cut to {n} steps; "
                              f"change its own step settings with --set (see `allformers train --list`)")
        return set_everywhere(self, {"max_steps": n}, only=TrainConfig)

    def report(self, result: dict) -> str:
        """A few human lines about a finished run (the CLI prints them; --json prints the result)."""
        return json.dumps(printable(result), indent=2, default=str)


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise RecipeError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str, kind: Optional[type] = None) -> Recipe:
    """The registered recipe `name` (of class `kind` when given)."""
    known = {n: r for n, r in RECIPES.items() if kind is None or isinstance(r, kind)}
    if name not in known:
        raise UnknownRecipeError(name, known)
    return known[name]


def settings_of(recipe: Recipe) -> dict:
    """{field: value} of the recipe's own settings (name, description and target left out): the
    keyword arguments of the function a flat recipe wraps."""
    return {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe) if f.name not in NOT_OVERRIDABLE}


def printable(result: dict) -> dict:
    """The JSON-friendly part of a result (models and tensors dropped)."""
    return {k: v for k, v in result.items() if k not in ("model", "trained_model", "table")}


# ---------------------------------------------------------------------- settings
def _nested(obj) -> dict:
    """{field name: value} of obj's dataclass-valued fields (its TrainConfigs, stage configs ...)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
            if dataclasses.is_dataclass(getattr(obj, f.name)) and not isinstance(getattr(obj, f.name), type)}


def train_configs(recipe) -> dict:
    return {k: v for k, v in _nested(recipe).items() if isinstance(v, TrainConfig)}


def _field_names(obj) -> set:
    return {f.name for f in dataclasses.fields(obj)}


def set_everywhere(recipe, changes: dict, only: Optional[type] = None):
    """recipe with each change applied in every nested settings object that has that field."""
    updates = {}
    for fname, sub in _nested(recipe).items():
        if only is not None and not isinstance(sub, only):
            continue
        mine = {k: v for k, v in changes.items() if k in _field_names(sub)}
        if mine:
            updates[fname] = dataclasses.replace(sub, **mine)
    return dataclasses.replace(recipe, **updates) if updates else recipe


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, true/false/null, lists, objects), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_set(items) -> dict:
    """["key=value", ...] (the CLI's --set) -> {key: value}."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE (e.g. --set lr=3e-4 or --set ppo.kl_coef=0.5)")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def known_keys(recipe) -> list[str]:
    keys = _field_names(recipe) - NOT_OVERRIDABLE
    for fname, sub in _nested(recipe).items():
        keys |= _field_names(sub) | {f"{fname}.{k}" for k in _field_names(sub)}
    if "model_overrides" in _field_names(recipe):
        keys |= _model_keys()
    return sorted(keys)


def apply_overrides(recipe: Recipe, overrides: Optional[dict]) -> Recipe:
    """recipe with every (key, value) of `overrides` applied (None values are skipped); see the module
    doc. The changes to one nested object are applied together, so its checks see the final values."""
    own, nested = _field_names(recipe), _nested(recipe)
    top, inner, model = {}, {name: {} for name in nested}, {}
    for key, value in renamed_kwargs(dict(overrides or {}), f"recipe {recipe.name!r}").items():
        if value is None:
            continue
        head, dot, rest = key.partition(".")
        if dot and head in nested and rest in _field_names(nested[head]):
            inner[head][rest] = value
        elif not dot and key in own and key not in NOT_OVERRIDABLE:
            top[key] = value
        elif not dot and any(key in _field_names(sub) for sub in nested.values()):
            for name, sub in nested.items():
                if key in _field_names(sub):
                    inner[name][key] = value
        elif not dot and "model_overrides" in own and key in _model_keys():
            model[key] = value
        else:
            raise _unknown(recipe, key)
    changes = {name: dataclasses.replace(nested[name], **c) for name, c in inner.items() if c}
    if model:
        changes["model_overrides"] = {**recipe.model_overrides, **model}
    changes.update(top)  # a whole nested object given at the top replaces the one changed above
    return dataclasses.replace(recipe, **changes) if changes else recipe


def _model_keys() -> set:
    from ..config import Config

    return _field_names(Config) - {"name", "description", "family"}


def _unknown(recipe: Recipe, key: str) -> RecipeError:
    known = known_keys(recipe)
    close = difflib.get_close_matches(key, known, n=3)
    return RecipeError(f"unknown setting {key!r} for recipe {recipe.name!r} ({recipe.kind})"
                       + (f"; did you mean {', '.join(close)}?" if close else "")
                       + f" (it takes: {', '.join(k for k in known if '.' not in k)})")


# ---------------------------------------------------------------------- running one
def prepare(name: str, *, max_steps: Optional[int] = None, seed: Optional[int] = None, threads: Optional[int] = None,
            device: Optional[str] = None, overrides: Optional[dict] = None, kind: Optional[type] = None) -> Recipe:
    """Recipe `name` with the caller's changes: max_steps first (its hook may set derived settings
    such as warmup), then seed, then the overrides (which win over both), then threads and device
    (set in every TrainConfig the recipe has; recipes without one ignore them)."""
    recipe = get_recipe(name, kind)
    if max_steps is not None:
        recipe = recipe.with_max_steps(max_steps)
    recipe = apply_overrides(recipe, {"seed": seed, **(overrides or {})})
    run_settings = {k: v for k, v in (("threads", threads), ("device", device)) if v is not None}
    return set_everywhere(recipe, run_settings) if run_settings else recipe


def run_recipe(name: str, *, out=None, data=None, max_steps: Optional[int] = None, seed: Optional[int] = None,
               threads: Optional[int] = None, device: Optional[str] = None, overrides: Optional[dict] = None,
               progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
    """Run the registered recipe `name` end to end into `out` (default runs/NAME); returns its summary."""
    recipe = prepare(name, max_steps=max_steps, seed=seed, threads=threads, device=device, overrides=overrides)
    if threads:
        import torch

        torch.set_num_threads(threads)
    out = Path(out) if out is not None else Path("runs") / name
    from ..training.guards import check_device, check_out, check_schedule

    for cfg in train_configs(recipe).values():  # before the recipe reads, builds or writes anything
        check_schedule(cfg)
        check_device(cfg.device)
    check_out(out)
    return recipe.run(out=out, data=data, progress=progress, resume=resume, verbose=verbose)


def describe(recipes=None) -> str:
    """The --list table: name, kind, description and target of every recipe."""
    rows = []
    for r in (recipes if recipes is not None else RECIPES.values()):
        rows.append(f"{r.name:<30} [{r.kind}] {r.description}" + (f"\n{'':<30} target: {r.target}" if r.target else ""))
    return "\n".join(rows)
