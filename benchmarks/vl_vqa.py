"""The question-answering sections of bench_vision_language.py: tiny models trained here on the synthetic shapes'
questions (train split) and scored on the caption-disjoint test split (new pictures whose captions are combinations
never seen in training), each against a text-only baseline of the same run.

  palme  VisionLanguageLM (PaLM-E / LLaVA, models/vlm.py): ViT -> 2-layer projector -> a small decoder LM, every
         part trained from scratch, end to end, on LLaVA-1.5's format "USER: <image>\\n{question} ASSISTANT:".
         Baseline: the same LM config trained the same steps on the same questions with no picture.
  blip2  BLIP-2 stage 2 (models/blip2.py): a frozen ViT and a frozen decoder LM joined by a Q-Former whose queries,
         projected, are soft prompts before "Question: {question} Answer:". Only the Q-Former, its queries and the
         projection train. The frozen parts are pretrained briefly in the same run, on the training split only,
         and then frozen: the ViT as the image tower of a CLIP on the captions (BLIP-2's ViT is CLIP-trained too),
         the LM on the questions and answers as text, half after the picture's caption as words
         ("a red circle . Question: what colour is the circle? Answer: red"), half alone. Baseline: that frozen
         LM asked with no picture and no caption; blip2_lm_given_caption_accuracy is the LM reading the true
         caption as text instead of the picture (what the queries would have to say).

A test answer is right when the greedy answer (decoded up to </s>) is the one-word answer exactly. Accuracy is over
every (picture, question) pair of the test split, and by question type (colour, shape, count, relation).
`--set palme.save="'runs/vl/palme'"` saves the trained model (with its tokenizer and image processor) for
`allformers ask` and benchmarks/vl_figure.py."""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_vision_language as bench  # the sibling benchmark: shared helpers (pictures, CLIP, schedule)
from allformers import Config, TransformerLM
from allformers.data.image_processing import ImageProcessor
from allformers.data.synthetic_shapes import shapes_vqa_tokenizer
from allformers.models.blip2 import BLIP2, BLIP2Config
from allformers.models.qformer import QFormerConfig
from allformers.models.vit import ViTConfig
from allformers.models.vlm import VisionLanguageLM, VLMConfig, generate_from_embeds
from allformers.models.vqa import answer_ids, prompt_ids
from allformers.tokenization import Tokenizer  # noqa: F401 (annotations)

QUESTION_TYPES = {"what colour": "colour", "which shape": "shape", "how many": "count", "is the": "relation"}
vqa_tokenizer = shapes_vqa_tokenizer  # captions, questions and both prompt formats, one token a word


def question_type(q: str) -> str:
    return next(t for prefix, t in QUESTION_TYPES.items() if q.startswith(prefix))


@dataclass
class Items:
    """Every (picture, question) pair of a set: pixels (P, 3, S, S) drawn once, and per pair its picture index."""
    pixels: torch.Tensor
    captions: list  # per picture, as the generator wrote it
    pic: list
    questions: list
    answers: list

    @classmethod
    def of(cls, pics: "bench.Pictures", data) -> "Items":
        pic, qs, ans = [], [], []
        for i in range(len(data)):
            for q, a in data[i].questions:
                pic.append(i), qs.append(q), ans.append(a)
        return cls(pics.pixels, [data[i].caption for i in range(len(data))], pic, qs, ans)

    def __len__(self):
        return len(self.questions)


def rows(prompts: list, answers: list, tok: Tokenizer):
    """Prompt + answer + </s>, right-padded -> (ids (B, T), labels (B, T)): only the answer and </s> are scored
    (labels aligned with ids; the models shift them by one)."""
    full = [p + tok.encode(a) + [tok.eos_id] for p, a in zip(prompts, answers)]
    T = max(map(len, full))
    ids = torch.full((len(full), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(full), T), -100, dtype=torch.long)
    for r, (p, f) in enumerate(zip(prompts, full)):
        ids[r, :len(f)] = torch.tensor(f)
        labels[r, len(p):len(f)] = torch.tensor(f[len(p):])
    return ids, labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def train(model, step_loss, s: dict, steps: int, n_items: int, seed: int, progress: bool, label: str) -> dict:
    """AdamW (decay on matrices only) over the trainable parameters, warm-up + cosine; step_loss(batch indices) ->
    loss. -> {"seconds", "final_loss"}."""
    gen = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s["weight_decay"]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=s["lr"], betas=(0.9, 0.98))
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = bench.lr_at(step, steps, s["lr"], max(1, steps // 20))
        loss = step_loss([gen.randrange(n_items) for _ in range(s["batch_size"])])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"  {label} step {step:5d} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}", file=sys.stderr)
    model.eval()
    return {"seconds": time.perf_counter() - t0, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


@torch.inference_mode()
def text_answers(lm: TransformerLM, tok: Tokenizer, prompts: list, batch_size: int = 256) -> list:
    """Greedy answers of a text-only LM, rows batched by prompt length (no padding)."""
    out, by_length = [None] * len(prompts), {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for idx_all in by_length.values():
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s:s + batch_size]
            ids = torch.tensor([prompts[i] for i in idx])
            new = generate_from_embeds(lm, lm.wte(ids), None, max_new_tokens=2, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                       prompt_ids=ids)
            for i, row in zip(idx, new.tolist()):
                out[i] = tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row).strip()
    return out


def accuracy(said: list, items: Items, prefix: str) -> dict:
    hits = [a == b for a, b in zip(said, items.answers)]
    by = {}
    for h, q in zip(hits, items.questions):
        by.setdefault(question_type(q), []).append(h)
    return {prefix: sum(hits) / len(hits), f"{prefix}_by_type": {k: round(sum(v) / len(v), 4) for k, v in sorted(by.items())}}


def lm_config(s: dict, tok: Tokenizer, block_size: int) -> Config:
    return Config(name="vqa-shapes-lm", vocab_size=tok.vocab_size, block_size=block_size, n_layer=s["lm_layers"],
                  n_head=s["heads"], n_embd=s["width"], causal=True, position="learned")


def vit_config(s: dict) -> ViTConfig:
    return ViTConfig.from_name("vit-tiny-shapes", image_size=bench.IMAGE_SIZE, patch_size=s["patch"], width=s["width"],
                               depth=s["depth"], heads=s["heads"])


def save_for_ask(model, tok: Tokenizer, path) -> str:
    """The model with its tokenizer and the image processor `allformers ask` reads (32 x 32, CLIP's numbers)."""
    model.save(path, tokenizer=tok)
    proc = ImageProcessor(shortest_edge=None, size=(bench.IMAGE_SIZE, bench.IMAGE_SIZE), crop=None)
    (Path(path) / "preprocessor_config.json").write_text(__import__("json").dumps(proc.to_hf(), indent=2))
    return str(path)


def load_sets(s: dict, seed: int) -> tuple:
    data = bench.shapes_data(s["n_train"], s["n_test"], seed)
    train_items = Items.of(bench.Pictures(data["train"]), data["train"])
    test_items = Items.of(bench.Pictures(data["test"]), data["test"])
    return train_items, test_items


# ---------------------------------------------------------------------- palme
PALME_FULL = dict(n_train=20000, n_test=500, steps=1500, batch_size=64, lr=1e-3, weight_decay=0.05, width=64,
                  depth=2, lm_layers=2, heads=4, patch=8, save=None)  # 8 x 8 patches: 16 image tokens, 4x cheaper
PALME_QUICK = dict(n_train=200, n_test=24, steps=6, batch_size=16, lr=1e-3, weight_decay=0.05, width=32, depth=1,
                   lm_layers=1, heads=2, patch=8, save=None)


def palme_section(quick: bool = False, seed: int = 0, progress: bool = False, **overrides) -> dict:
    s = bench.settings(PALME_QUICK if quick else PALME_FULL, overrides)
    tok = vqa_tokenizer()
    train_items, test_items = load_sets(s, seed)
    vision = vit_config(s)
    block = vision.grid ** 2 + 32  # the image tokens (class token dropped) + the longest prompt and answer
    torch.manual_seed(seed)
    model = VisionLanguageLM(VLMConfig(lm_config(s, tok, block), vision, name="palme-shapes",
                                       image_token_id=tok.token_id("<image>"), projector="mlp",
                                       vision_feature_layer=None, description="the PaLM-E of bench_vision_language.py"))
    prompts = [prompt_ids("vlm", tok, q, config=model.config) for q in train_items.questions]

    def vlm_step(b):
        ids, labels = rows([prompts[i] for i in b], [train_items.answers[i] for i in b], tok)
        return model(ids, train_items.pixels[[train_items.pic[i] for i in b]], labels=labels).loss

    run = train(model, vlm_step, s, s["steps"], len(train_items), seed, progress, "palme")
    said = answer_ids(model, tok, test_items.pixels[test_items.pic], test_items.questions, max_new_tokens=2)

    torch.manual_seed(seed)  # the baseline: the same LM config, same steps and batches, no picture
    text_lm = TransformerLM(lm_config(s, tok, block))
    text_prompts = [prompt_ids("vlm", tok, q, with_image=False) for q in train_items.questions]

    def text_step(b):
        ids, labels = rows([text_prompts[i] for i in b], [train_items.answers[i] for i in b], tok)
        return lm_loss(text_lm(ids), labels)

    base = train(text_lm, text_step, s, s["steps"], len(train_items), seed, progress, "palme text-only")
    text_said = text_answers(text_lm, tok, [prompt_ids("vlm", tok, q, with_image=False) for q in test_items.questions])
    out = {**accuracy(said, test_items, "palme_vqa_accuracy"),
           **accuracy(text_said, test_items, "palme_text_only_vqa_accuracy"),
           "palme_baseline": "text only: the same LM config trained the same steps on the same questions, no picture",
           "palme_test_questions": len(test_items), "palme_train_questions": len(train_items),
           "palme_params": model.num_params(), "palme_steps": s["steps"], "palme_batch_size": s["batch_size"],
           "palme_final_loss": round(run["final_loss"], 4), "palme_train_seconds": round(run["seconds"], 1),
           "palme_text_only_final_loss": round(base["final_loss"], 4)}
    if s["save"]:
        out["palme_saved"] = save_for_ask(model, tok, s["save"])
    return out


# ---------------------------------------------------------------------- blip2
BLIP2_FULL = dict(n_train=20000, n_test=500, vit_steps=800, vit_batch_size=128, lm_steps=1500, steps=1500,
                  batch_size=64, lr=1e-3, weight_decay=0.05, width=64, depth=2, lm_layers=2, heads=4, patch=8,
                  queries=8, qformer_layers=2, save=None)
BLIP2_QUICK = dict(n_train=200, n_test=24, vit_steps=4, vit_batch_size=16, lm_steps=6, steps=6, batch_size=16,
                   lr=1e-3, weight_decay=0.05, width=32, depth=1, lm_layers=1, heads=2, patch=8, queries=4,
                   qformer_layers=1, save=None)


def pretrain_vit(s: dict, seed: int, progress: bool):
    """BLIP-2's frozen image encoder: the image tower of a CLIP trained on the training captions (the clip section's
    recipe, shorter) -> (ViT, seconds)."""
    clip_s = dict(width=s["width"], depth=s["depth"], text_layers=s["lm_layers"], heads=s["heads"], patch=s["patch"],
                  steps=s["vit_steps"], batch_size=s["vit_batch_size"], lr=2e-3, weight_decay=0.1)
    ctok = bench.shapes_tokenizer()
    data = bench.SyntheticShapes(s["n_train"], "train", seed, bench.IMAGE_SIZE)
    torch.manual_seed(seed)
    clip = bench.CLIP(bench.clip_config(clip_s, ctok))
    run = bench.train_contrastive(clip, bench.clip_loss, bench.Pictures(data), ctok, clip_s, seed, progress)
    return clip.vision, run["seconds"]


def blip2_section(quick: bool = False, seed: int = 0, progress: bool = False, **overrides) -> dict:
    s = bench.settings(BLIP2_QUICK if quick else BLIP2_FULL, overrides)
    tok = vqa_tokenizer()
    train_items, test_items = load_sets(s, seed)
    vit, vit_seconds = pretrain_vit(s, seed, progress)

    # the frozen LM: questions and answers as text, half after the caption as words, half alone
    torch.manual_seed(seed)
    lm = TransformerLM(lm_config(s, tok, block_size=s["queries"] + 48))
    alone = [prompt_ids("blip2", tok, q, with_image=False) for q in train_items.questions]
    captioned = [tok.encode(train_items.captions[p] + " .") + a for p, a in zip(train_items.pic, alone)]
    coin = random.Random(seed + 1)

    def lm_step(b):
        ids, labels = rows([captioned[i] if coin.random() < 0.5 else alone[i] for i in b],
                           [train_items.answers[i] for i in b], tok)
        return lm_loss(lm(ids), labels)

    lm_run = train(lm, lm_step, s, s["lm_steps"], len(train_items), seed, progress, "blip2 frozen-LM pretraining")

    qf = QFormerConfig(width=s["width"], depth=s["qformer_layers"], heads=s["heads"], intermediate_size=4 * s["width"],
                       vision_width=vit.config.width, num_query_tokens=s["queries"], cross_attention_frequency=1,
                       text_input=False)
    torch.manual_seed(seed)
    model = BLIP2(BLIP2Config(vit.config, qf, lm.config, name="blip2-shapes", image_token_id=tok.token_id("<image>"),
                              stage1=False, itg_head=False, description="the BLIP-2 of bench_vision_language.py"))
    model.vision.load_state_dict(vit.state_dict())
    model.lm.load_state_dict(lm.state_dict())
    model.freeze(2)
    frozen_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    prompts = [prompt_ids("blip2", tok, q, config=model.config) for q in train_items.questions]

    def blip2_step(b):
        ids, labels = rows([prompts[i] for i in b], [train_items.answers[i] for i in b], tok)
        return model(train_items.pixels[[train_items.pic[i] for i in b]], ids, labels=labels).loss

    run = train(model, blip2_step, s, s["steps"], len(train_items), seed, progress, "blip2 stage 2")
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in frozen_before.items()), "the frozen LM moved"
    said = answer_ids(model, tok, test_items.pixels[test_items.pic], test_items.questions, max_new_tokens=2)
    test_alone = [prompt_ids("blip2", tok, q, with_image=False) for q in test_items.questions]
    text_said = text_answers(lm, tok, test_alone)
    told = text_answers(lm, tok, [tok.encode(test_items.captions[p] + " .") + a for p, a in zip(test_items.pic, test_alone)])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {**accuracy(said, test_items, "blip2_vqa_accuracy"),
           **accuracy(text_said, test_items, "blip2_text_only_vqa_accuracy"),
           "blip2_lm_given_caption_accuracy": accuracy(told, test_items, "x")["x"],
           "blip2_baseline": "text only: the frozen LM itself, asked with no picture (and no caption)",
           "blip2_pretraining": f"in this run, train split only, then frozen: the ViT as a CLIP image tower on the "
                                f"captions ({s['vit_steps']} steps), the LM on the questions and answers as text, half "
                                f"after the caption ({s['lm_steps']} steps); the Q-Former, queries and projection train",
           "blip2_test_questions": len(test_items), "blip2_params": model.num_params(),
           "blip2_trainable_params": trainable, "blip2_queries": s["queries"], "blip2_steps": s["steps"],
           "blip2_final_loss": round(run["final_loss"], 4), "blip2_lm_pretrain_final_loss": round(lm_run["final_loss"], 4),
           "blip2_vit_pretrain_seconds": round(vit_seconds, 1), "blip2_lm_pretrain_seconds": round(lm_run["seconds"], 1),
           "blip2_train_seconds": round(run["seconds"], 1)}
    if s["save"]:
        out["blip2_saved"] = save_for_ask(model, tok, s["save"])
    return out
