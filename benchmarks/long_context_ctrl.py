"""The `ctrl` section of bench_long_context.py: the ctrl-sources recipe (allformers/recipes/ctrl.py), a tiny
character-level CTRL trained on Tiny Shakespeare tagged <shakespeare> and the State of the Union addresses
tagged <sotu>. Samples drawn after each code are assigned to a source by a character-trigram naive Bayes
classifier (add-one smoothing, equal priors) fitted on the first half of each source's held-out split.
ctrl_code_accuracy is the fraction of samples given to the source their code asked for (target >= 0.9);
ctrl_classifier_accuracy_on_real_text is the same classifier on real held-out text of the same length.
Section settings (--set ctrl.KEY=VALUE) are the recipe's (max_steps, batch_size, samples_per_code ...)."""
from __future__ import annotations

import tempfile

from allformers.recipes import run_recipe

CLASSIFIER = ("character-trigram multinomial naive Bayes, add-one smoothing, equal priors, fitted on the first half "
              "of each source's held-out 10%")


def ctrl_section(quick: bool = False, data=None, seed: int = 0, progress: bool = False, **overrides) -> dict:
    with tempfile.TemporaryDirectory() as out:
        r = run_recipe("ctrl-sources-quick" if quick else "ctrl-sources", out=out, data=data, seed=seed,
                       overrides=overrides, progress=progress, verbose=False)
    return {"ctrl_code_accuracy": r["code_accuracy"], "ctrl_code_accuracy_per_code": r["per_code"],
            "ctrl_classifier_accuracy_on_real_text": r["classifier_accuracy_on_real_text"],
            "ctrl_classifier": CLASSIFIER, "ctrl_samples_per_code": r["samples_per_code"],
            "ctrl_sample_chars": r["sample_chars"], "ctrl_temperature": r["temperature"],
            "ctrl_val_loss": r["val_loss"], "ctrl_params": r["params"], "ctrl_steps": r["steps"],
            "ctrl_wall_s": round(r["wall_time_s"], 1), "ctrl_examples": r["examples"]}
