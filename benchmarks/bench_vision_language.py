"""Vision-language models on the synthetic captioned shapes (issue 12), each trained here from scratch on a CPU
and measured on held-out pictures against a text-only baseline of the same run. Sections:

  clip   a tiny CLIP (models/clip.py, softmax contrastive loss) on the train split: clip_recall_at_1 is image ->
         text retrieval on the caption-disjoint test split (new pictures whose captions are combinations never
         seen in training), the candidates being the distinct captions of the test pictures;
         clip_recall_at_1_seen_captions the same on new pictures of training captions (the val split)
  coca   a tiny CoCa (models/coca.py: contrastive + 2 x captioning loss) on the same data: coca_recall_at_1 as
         clip's, and coca_caption_exact: greedy captions of the test pictures whose canonical form is exactly
         the picture's caption
  palme  a tiny PaLM-E / LLaVA (models/vlm.py: ViT -> projector -> decoder LM, trained end to end) on the
         questions of the train split: palme_vqa_accuracy on the test split's questions (benchmarks/vl_vqa.py)
  blip2  BLIP-2 stage 2 (models/blip2.py): a Q-Former trained between a frozen ViT and a frozen LM (both
         pretrained briefly in the same run on the train split, then frozen): blip2_vqa_accuracy (vl_vqa.py)

Baselines (reported beside each number): chance (1 / candidates, averaged over pictures) and the caption prior
(text only: every picture gets the candidate most likely under a word-unigram model of the training captions,
the best one fixed guess that never looks at the picture can do without peeking at the test set); for the
question sections, the same LM trained or asked without the picture.

    python benchmarks/bench_vision_language.py --quick                      # every section, small: proves it runs
    python benchmarks/bench_vision_language.py --sections clip --threads 1  # the measured run of one section
    python benchmarks/bench_vision_language.py --sections clip --set clip.steps=500
    python benchmarks/bench_vision_language.py --sections coca --set "coca.save='runs/coca-shapes'"  # keep the model

Each section is a function `(quick, seed, progress, **settings) -> dict` of result keys, prefixed by its
name; SECTIONS maps the name to it (or to a "module:function" string, imported when the section runs, for a
section in a sibling file). Helpers every section may use: shapes_data, shapes_tokenizer (from
data/synthetic_shapes.py), Pictures, retrieval_recall, caption_prior_recall, train_contrastive. Prints one line per section on stderr, then, last, one JSON object
with every section's numbers and the machine's load."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling section modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allformers import Config  # noqa: E402
from allformers.data.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from allformers.data.synthetic_shapes import SyntheticShapes, canonical_of, shapes_tokenizer  # noqa: E402
from allformers.models.clip import CLIP, CLIPConfig, TextTowerConfig  # noqa: E402
from allformers.models.coca import CoCa, CoCaConfig  # noqa: E402
from allformers.models.vit import ViTConfig  # noqa: E402
from allformers.tokenization import Tokenizer  # noqa: E402

IMAGE_SIZE = 32
TEXT_LENGTH = 16  # the longest caption is 10 words + </s>


# ---------------------------------------------------------------------- shared helpers
def shapes_data(n_train: int, n_test: int, seed: int) -> dict:
    """train: the train split; test: new pictures of held-out captions; seen: new pictures of training captions."""
    return {"train": SyntheticShapes(n_train, "train", seed, IMAGE_SIZE),
            "test": SyntheticShapes(n_test, "test", seed, IMAGE_SIZE),
            "seen": SyntheticShapes(n_test, "val", seed, IMAGE_SIZE)}


def pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> CLIP-normalised pixels (the "shapes" image processor's numbers)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class Pictures:
    """A set drawn once: normalised pixels (N, 3, S, S) and canonical captions."""

    def __init__(self, data: SyntheticShapes):
        batch = data.batch(range(len(data)))
        self.pixels = pixels(batch["images"])
        self.captions = [s.canonical for s in batch["scenes"]]
        self.kinds = [s.kind for s in batch["scenes"]]

    def __len__(self):
        return len(self.captions)


def unique_caption_batches(captions: list, batch_size: int, generator: torch.Generator):
    """Endless random batches of indices with no caption twice in a batch (a repeated caption would be a
    false negative for the contrastive loss)."""
    while True:
        order = torch.randperm(len(captions), generator=generator).tolist()
        batch, seen = [], set()
        for i in order:
            if captions[i] in seen:
                continue
            batch.append(i)
            seen.add(captions[i])
            if len(batch) == batch_size:
                yield batch
                batch, seen = [], set()


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, candidates: list, truth: list,
                     kinds: list) -> dict:
    """Image -> text recall@1: image i is right when its best-scoring candidate is its own caption.
    -> {"all": recall, "single"/"pair"/"count": recall per kind}."""
    best = (image_embeds @ text_embeds.t()).argmax(dim=-1).tolist()
    hits = [candidates[b] == t for b, t in zip(best, truth)]
    out = {"all": sum(hits) / len(hits)}
    for kind in sorted(set(kinds)):
        h = [x for x, k in zip(hits, kinds) if k == kind]
        out[kind] = sum(h) / len(h)
    return out


def caption_prior_recall(train_captions: list, candidates: list, truth: list) -> float:
    """The text-only baseline: one fixed guess for every picture, the candidate most likely under a word-unigram
    model of the training captions (add-one smoothed; a caption's log-probability is the sum over its words)."""
    counts = Counter(w for c in train_captions for w in c.split())
    total, vocab = sum(counts.values()), len(counts) + 1

    def logp(caption):
        return sum(math.log((counts[w] + 1) / (total + vocab)) for w in caption.split())

    guess = max(candidates, key=logp)
    return sum(t == guess for t in truth) / len(truth)


def chance_recall(candidates: list) -> float:
    return 1 / len(candidates)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * t))


def settings(base: dict, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; this section has {sorted(base)}")
    return {**base, **overrides}


# ---------------------------------------------------------------------- clip
CLIP_FULL = dict(n_train=20000, n_test=500, steps=2000, batch_size=128, lr=2e-3, weight_decay=0.1, width=64,
                 depth=2, text_layers=2, heads=4, patch=4, save=None)
CLIP_QUICK = dict(n_train=400, n_test=64, steps=10, batch_size=32, lr=2e-3, weight_decay=0.1, width=32,
                  depth=1, text_layers=1, heads=2, patch=8, save=None)


def clip_config(s: dict, tok: Tokenizer) -> CLIPConfig:
    """A CLIP for 32 x 32 pictures and the caption vocabulary: causal text tower pooled at </s>, ViT with a
    class token (CLIP's pre-LN and pooled post-LN), bias-free projections."""
    lm = Config(name="clip-shapes-text", vocab_size=tok.vocab_size, block_size=TEXT_LENGTH, n_layer=s["text_layers"],
                n_head=s["heads"], n_embd=s["width"], causal=True, position="learned", lm_head=False)
    vision = ViTConfig.from_name("clip-vit-base-patch32", image_size=IMAGE_SIZE, patch_size=s["patch"],
                                 width=s["width"], depth=s["depth"], heads=s["heads"])
    return CLIPConfig(TextTowerConfig(lm, eos_token_id=tok.eos_id), vision, name="clip-shapes",
                      projection_dim=s["width"], description="the CLIP of bench_vision_language.py")


def train_contrastive(model, forward_loss, pics: Pictures, tok: Tokenizer, s: dict, seed: int, progress: bool) -> dict:
    """AdamW over batches of distinct captions; forward_loss(model, pixels, ids, mask) -> scalar loss; the
    captions are encoded by the model's own text_inputs. Shared by the contrastive sections.
    -> {"seconds", "final_loss"}."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]}, {"params": rest, "weight_decay": 0}],
                            lr=s["lr"], betas=(0.9, 0.98))
    ids, mask = model.text_inputs(tok, pics.captions)
    batches = unique_caption_batches(pics.captions, s["batch_size"], gen)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(s["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s["steps"], s["lr"], max(1, s["steps"] // 20))
        b = torch.tensor(next(batches))
        loss = forward_loss(model, pics.pixels[b], ids[b], mask[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step % max(1, s["steps"] // 20) == 0 or step == s["steps"] - 1):
            print(f"  step {step:5d} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", file=sys.stderr)
    model.eval()
    return {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


@torch.no_grad()
def retrieval(model, tok: Tokenizer, pics: Pictures) -> dict:
    """Image -> text recall@1 of a contrastive model (CLIP, CoCa) among the distinct captions of `pics`."""
    candidates = sorted(set(pics.captions))
    ids, mask = model.text_inputs(tok, candidates)
    text = F.normalize(model.get_text_features(ids, mask), dim=-1)
    image = torch.cat([F.normalize(model.get_image_features(pics.pixels[i:i + 256]), dim=-1)
                       for i in range(0, len(pics), 256)])
    return {**retrieval_recall(image, text, candidates, pics.captions, pics.kinds), "candidates": len(candidates)}


def clip_loss(model: CLIP, px, ids, mask):
    with torch.no_grad():  # CLIP clips its temperature at 100
        model.logit_scale.clamp_(0, math.log(100))
    return model(ids, px, mask, return_loss=True).loss


def clip_section(quick: bool = False, seed: int = 0, progress: bool = False, **overrides) -> dict:
    s = settings(CLIP_QUICK if quick else CLIP_FULL, overrides)
    tok = shapes_tokenizer()
    data = shapes_data(s["n_train"], s["n_test"], seed)
    train, test, seen = Pictures(data["train"]), Pictures(data["test"]), Pictures(data["seen"])
    torch.manual_seed(seed)
    model = CLIP(clip_config(s, tok))
    run = train_contrastive(model, clip_loss, train, tok, s, seed, progress)
    if s["save"]:  # a folder for allformers zero-shot
        model.save(s["save"], tokenizer=tok)
    r_test, r_seen = retrieval(model, tok, test), retrieval(model, tok, seen)
    cands = sorted(set(test.captions))
    return {"clip_recall_at_1": r_test["all"],
            "clip_recall_at_1_by_kind": {k: v for k, v in r_test.items() if k not in ("all", "candidates")},
            "clip_recall_at_1_seen_captions": r_seen["all"],
            "clip_text_only_recall_at_1": caption_prior_recall(train.captions, cands, test.captions),
            "clip_chance_recall_at_1": chance_recall(cands),
            "clip_baseline": "text only: one fixed guess, the candidate most likely under a word-unigram model of "
                             "the training captions; chance: 1 / candidates",
            "clip_candidates": r_test["candidates"], "clip_test_pictures": len(test),
            "clip_params": model.num_params(), "clip_steps": s["steps"], "clip_batch_size": s["batch_size"],
            "clip_train_pictures": s["n_train"], "clip_final_loss": round(run["final_loss"], 4),
            "clip_train_seconds": round(run["seconds"], 1)}


# ---------------------------------------------------------------------- coca
COCA_FULL = dict(n_train=20000, n_test=500, steps=2000, batch_size=128, lr=2e-3, weight_decay=0.1, width=64,
                 depth=2, text_layers=4, heads=4, patch=4, queries=16, save=None)
COCA_QUICK = dict(n_train=400, n_test=64, steps=10, batch_size=32, lr=2e-3, weight_decay=0.1, width=32,
                  depth=1, text_layers=2, heads=2, patch=8, queries=4, save=None)


def coca_config(s: dict, tok: Tokenizer) -> CoCaConfig:
    """coca-tiny-shapes at the section's sizes: half the text layers unimodal, the rest cross-attend."""
    base = CoCaConfig.from_name("coca-tiny-shapes")
    text = base.text.replace(vocab_size=tok.vocab_size, block_size=TEXT_LENGTH, n_layer=s["text_layers"],
                             n_head=s["heads"], n_embd=s["width"])
    vision = base.vision.replace(patch_size=s["patch"], width=s["width"], depth=s["depth"], heads=s["heads"])
    return dataclasses.replace(base, text=text, vision=vision, unimodal_layers=None, projection_dim=s["width"],
                               caption_queries=s["queries"], bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)


def coca_loss(model: CoCa, px, ids, mask):
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return model(ids, px, mask, return_loss=True).loss


@torch.no_grad()
def caption_exact(model: CoCa, tok: Tokenizer, pics: Pictures) -> dict:
    """Greedy captions; exact when the caption's canonical form is the picture's ("B below A" counts as
    "A above B"). -> {"all", per kind, "examples": the first few (truth, caption)}."""
    said = []
    for i in range(0, len(pics), 256):
        said += model.caption(tok, pics.pixels[i:i + 256])
    hits = [canonical_of(c) == t for c, t in zip(said, pics.captions)]
    out = {"all": sum(hits) / len(hits)}
    for kind in sorted(set(pics.kinds)):
        h = [x for x, k in zip(hits, pics.kinds) if k == kind]
        out[kind] = sum(h) / len(h)
    out["examples"] = [[t, c] for t, c in list(zip(pics.captions, said))[:6]]
    return out


def coca_section(quick: bool = False, seed: int = 0, progress: bool = False, **overrides) -> dict:
    s = settings(COCA_QUICK if quick else COCA_FULL, overrides)
    tok = shapes_tokenizer()
    data = shapes_data(s["n_train"], s["n_test"], seed)
    train, test, seen = Pictures(data["train"]), Pictures(data["test"]), Pictures(data["seen"])
    torch.manual_seed(seed)
    model = CoCa(coca_config(s, tok))
    run = train_contrastive(model, coca_loss, train, tok, s, seed, progress)
    if s["save"]:  # a folder for allformers caption / zero-shot
        model.save(s["save"], tokenizer=tok)
    r_test, r_seen = retrieval(model, tok, test), retrieval(model, tok, seen)
    c_test, c_seen = caption_exact(model, tok, test), caption_exact(model, tok, seen)
    cands = sorted(set(test.captions))
    mode = Counter(train.captions).most_common(1)[0][0]
    return {"coca_recall_at_1": r_test["all"],
            "coca_recall_at_1_by_kind": {k: v for k, v in r_test.items() if k not in ("all", "candidates")},
            "coca_recall_at_1_seen_captions": r_seen["all"],
            "coca_text_only_recall_at_1": caption_prior_recall(train.captions, cands, test.captions),
            "coca_chance_recall_at_1": chance_recall(cands),
            "coca_caption_exact": c_test["all"],
            "coca_caption_exact_by_kind": {k: v for k, v in c_test.items() if k not in ("all", "examples")},
            "coca_caption_exact_seen_captions": c_seen["all"],
            "coca_text_only_caption_exact": sum(t == mode for t in test.captions) / len(test),
            "coca_caption_examples": c_test["examples"],
            "coca_baseline": "retrieval as clip's; captions: the text-only captioner's one best caption, the "
                             "commonest training caption (never right on the caption-disjoint test split)",
            "coca_candidates": r_test["candidates"], "coca_test_pictures": len(test),
            "coca_params": model.num_params(), "coca_steps": s["steps"], "coca_batch_size": s["batch_size"],
            "coca_train_pictures": s["n_train"], "coca_final_loss": round(run["final_loss"], 4),
            "coca_train_seconds": round(run["seconds"], 1)}


# ---------------------------------------------------------------------- sections
SECTIONS = {"clip": clip_section, "coca": coca_section, "flamingo": "vl_flamingo:flamingo_section",
            "palme": "vl_vqa:palme_section", "blip2": "vl_vqa:blip2_section"}


def section_function(name: str):
    """The section's function; None when its module is not in this checkout."""
    fn = SECTIONS[name]
    if isinstance(fn, str):
        module, attr = fn.split(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            return None
    return fn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", help=f"comma-separated, of {list(SECTIONS)} (default: every one this checkout has)")
    p.add_argument("--quick", action="store_true", help="small and short: proves every section runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one section setting, e.g. clip.steps=500 (a Python literal)")
    args = p.parse_args(argv)
    if args.sections:
        names = [n.strip() for n in args.sections.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
        missing = [n for n in names if section_function(n) is None]
        if missing:
            p.error(f"section(s) {missing}: their module is not in this checkout")
    else:
        names = [n for n in SECTIONS if section_function(n) is not None]
    overrides = {n: {} for n in names}
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not (sep and dot and section in overrides):
            p.error(f"--set {item!r}: write SECTION.KEY=VALUE with SECTION among {names}")
        overrides[section][field] = ast.literal_eval(value)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"sections": names, "quick": args.quick, "seed": args.seed, "threads": torch.get_num_threads(),
               "load_avg_before": os.getloadavg()[0]}
    t0 = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        out = section_function(name)(quick=args.quick, seed=args.seed, progress=args.progress, **overrides[name])
        out[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
        results.update(out)
        shown = {k: v for k, v in out.items() if not isinstance(v, (dict, str))}
        print(f"{name} ({out[f'{name}_seconds']:.0f} s): {shown}", file=sys.stderr)
    results.update(wall_s=round(time.perf_counter() - t0, 1), load_avg_after=os.getloadavg()[0])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
