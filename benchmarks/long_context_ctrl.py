"""The `ctrl` section of bench_long_context.py: a tiny character-level CTRL trained on Tiny Shakespeare
tagged <shakespeare> and the State of the Union addresses tagged <sotu> (allformers/training/ctrl_recipe.py);
samples drawn after each code are assigned to a source by a character-trigram naive Bayes classifier
(add-one smoothing, equal priors) fitted on the first half of each source's held-out split.
ctrl_code_accuracy is the fraction of samples given to the source their code asked for (target >= 0.9);
ctrl_classifier_accuracy_on_real_text is the same classifier on real held-out text of the same length."""
from __future__ import annotations

from allformers.training.ctrl_recipe import code_accuracy, fit_source_classifier, real_text_accuracy, train_ctrl


def ctrl_section(quick: bool = False, data_dir=None, seed: int = 0, progress: bool = False, **overrides) -> dict:
    run = train_ctrl(quick=quick, data_dir=data_dir, seed=seed, progress=progress, **overrides)
    s = run["settings"]
    classifier = fit_source_classifier(run["corpus"])
    acc = code_accuracy(run["model"], run["tokenizer"], classifier, seed=seed, **s)
    return {"ctrl_code_accuracy": acc["accuracy"], "ctrl_code_accuracy_per_code": acc["per_code"],
            "ctrl_classifier_accuracy_on_real_text": real_text_accuracy(run["corpus"], classifier, s["sample_chars"],
                                                                         seed=seed),
            "ctrl_classifier": "character-trigram multinomial naive Bayes, add-one smoothing, equal priors, fitted on "
                               "the first half of each source's held-out 10%",
            "ctrl_samples_per_code": s["samples_per_code"], "ctrl_sample_chars": s["sample_chars"],
            "ctrl_temperature": s["temperature"], "ctrl_val_loss": run["val_loss"], "ctrl_params": run["params"],
            "ctrl_steps": s["steps"], "ctrl_train_seconds": round(run["seconds"], 1), "ctrl_examples": acc["examples"]}
