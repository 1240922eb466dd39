"""The flamingo section of bench_vision_language.py: in-context learning on the synthetic shapes.

The task is shown, never said. A prompt is k solved examples of one task and a query picture:

    <image> answer: red <eoc> <image> answer: purple <eoc> ... <image> answer:   -> the query's colour

where the task is the colour of the shapes, their shape, or how many there are (single and count scenes). With
0 shots nothing says which of the three is asked; with 4 the earlier answers do, and only the picture says
what the answer is. Flamingo's recipe, at the shapes' size:
  0. the vision encoder is pretrained contrastively (a CLIP, as Flamingo's NFNet is) on the train pictures'
     captions, then frozen;
  1. a small LM is trained on the prompts' text alone (pictures unseen): it learns the format and, from the
     shots, which kind of word comes next; it is also the text-only baseline; then it is frozen;
  2. a Flamingo is built around the two (Perceiver resampler, gated cross-attention before every LM block,
     gates from 0) and only the new parts learn, from interleaved episodes of 0 to 4 shots.
Measured on held-out pictures (the caption-disjoint test split); the shots come from the train split. The
answer is the first greedy token of cached generation, right when it is the one-word answer.
"""
from __future__ import annotations

import sys
import time

import torch

from allformers import Config
from allformers.data.synthetic_science import NUMBER_WORDS
from allformers.data.synthetic_shapes import COLOUR_NAMES, MAX_COUNT, SHAPES, SyntheticShapes, shapes_tokenizer
from allformers.models.clip import CLIP
from allformers.models.flamingo import Flamingo, FlamingoConfig, interleave
from allformers.models.lm import TransformerLM
from allformers.tokenization import Tokenizer

TASKS = ("colour", "shape", "count")
SHOTS = (0, 1, 2, 4)
KINDS = ("single", "count")
FULL = dict(n_train=4000, n_test=300, clip_steps=600, clip_batch_size=64, lm_steps=300, lm_lr=2e-3, steps=600,
            batch_size=24, lr=2e-3, gate_lr=10.0, width=64, layers=3, heads=4, vit_depth=2, patch=4, latents=8,
            resampler_depth=1, max_shots=4)
QUICK = dict(n_train=64, n_test=12, clip_steps=4, clip_batch_size=8, lm_steps=4, lm_lr=2e-3, steps=4, batch_size=4,
             lr=2e-3, gate_lr=10.0, width=32, layers=2, heads=2, vit_depth=1, patch=8, latents=4, resampler_depth=1,
             max_shots=4)


def answer(scene, task: str) -> str:
    o = scene.objects[0]
    return {"colour": o.colour, "shape": o.shape, "count": NUMBER_WORDS[len(scene.objects)]}[task]


def tokenizer() -> Tokenizer:
    words = [*COLOUR_NAMES, *SHAPES, *NUMBER_WORDS[1:MAX_COUNT + 1], "answer:"]
    return Tokenizer.word_level([" ".join(words)], special_tokens=("<pad>", "<eoc>", "<image>"))


class Episodes:
    """Prompts of k shots of one task over a set of pictures (normalised pixels and scenes)."""

    def __init__(self, data: SyntheticShapes, pixels_of, tok: Tokenizer):
        batch = data.batch(range(len(data)))
        self.pixels, self.scenes = pixels_of(batch["images"]), batch["scenes"]
        self.tok, self.img, self.eoc = tok, tok.token_id("<image>"), tok.token_id("<eoc>")

    def prompt(self, task: str, shots: list, query: int, answered: bool, support=None):
        """-> (ids, images (k+1, 3, S, S)): shots from `support` (default: self), the query from self; with
        answered=True the query's answer and <eoc> follow (a training episode)."""
        support = support or self
        parts = []
        for i in shots:
            parts += [support.pixels[i], f"answer: {answer(support.scenes[i], task)}", self.eoc]
        parts += [self.pixels[query], "answer:" + (f" {answer(self.scenes[query], task)}" if answered else "")]
        if answered:
            parts.append(self.eoc)
        return interleave(parts, self.tok, self.img)

    def batch(self, k: int, n: int, gen: torch.Generator, answered: bool = True):
        """n random training episodes of k shots (one random task each) -> (ids (n, T), pixels (n, k+1, ...))."""
        ids, px = [], []
        for _ in range(n):
            task = TASKS[int(torch.randint(len(TASKS), (1,), generator=gen))]
            pick = torch.randperm(len(self.scenes), generator=gen)[:k + 1].tolist()
            i, p = self.prompt(task, pick[:k], pick[k], answered)
            ids.append(i)
            px.append(p)
        return torch.tensor(ids), torch.stack(px)


def _train(model, groups: list, batches, steps: int, lr: float, progress: bool, name: str) -> float:
    """groups: [(parameters, lr multiplier)]."""
    opt = torch.optim.AdamW([{"params": p, "mult": m} for p, m in groups], lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    params = [p for g in groups for p in g[0]]
    model.train()
    losses = []
    for step in range(steps):
        for g in opt.param_groups:  # short warm-up, then constant
            g["lr"] = lr * g["mult"] * min(1.0, (step + 1) / max(1, steps // 20))
        loss = batches(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"  {name} step {step:5d} loss {sum(losses[-20:]) / len(losses[-20:]):.4f}", file=sys.stderr)
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def _labels(ids: torch.Tensor, img: int) -> torch.Tensor:
    return ids.masked_fill(ids == img, -100)  # every text token is scored, as Flamingo trains


@torch.no_grad()
def evaluate(answer_of, test: Episodes, train: Episodes, k: int, seed: int) -> dict:
    """Accuracy of answer_of(ids, pixels) -> (B,) first answer token over the test pictures, k shots from train
    (task i % 3 for query i; the same shots for every model)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    hits = {t: [] for t in TASKS}
    ids, px, truth = [], [], []
    for q in range(len(test.scenes)):
        task = TASKS[q % len(TASKS)]
        shots = torch.randperm(len(train.scenes), generator=gen)[:4].tolist()[:k]
        i, p = test.prompt(task, shots, q, answered=False, support=train)
        ids.append(i)
        px.append(p)
        truth.append(test.tok.token_id(answer(test.scenes[q], task)))
    got = torch.cat([answer_of(torch.tensor(ids[s:s + 100]), torch.stack(px[s:s + 100])) for s in range(0, len(ids), 100)])
    for q, (g, t) in enumerate(zip(got.tolist(), truth)):
        hits[TASKS[q % len(TASKS)]].append(g == t)
    every = [h for v in hits.values() for h in v]
    return {"all": sum(every) / len(every), **{t: sum(v) / len(v) for t, v in hits.items()}}


def flamingo_section(quick: bool = False, seed: int = 0, progress: bool = False, **overrides) -> dict:
    from bench_vision_language import IMAGE_SIZE, Pictures, clip_config, clip_loss, pixels, settings, train_contrastive

    s = settings(QUICK if quick else FULL, overrides)
    tok = tokenizer()
    train_data = SyntheticShapes(s["n_train"], "train", seed, IMAGE_SIZE, kinds=KINDS)
    train = Episodes(train_data, pixels, tok)
    test = Episodes(SyntheticShapes(s["n_test"], "test", seed, IMAGE_SIZE, kinds=KINDS), pixels, tok)
    gen = torch.Generator().manual_seed(seed)
    text = Config(name="flamingo-shapes-lm", vocab_size=tok.vocab_size, block_size=32, n_layer=s["layers"],
                  n_head=s["heads"], n_embd=s["width"], position="rotary", norm_class="RMSNorm", mlp_class="GLU",
                  activation="silu", attn_bias=False, mlp_bias=False)
    t0 = time.perf_counter()  # 0. the vision encoder: a CLIP on the train captions
    clip_s = dict(steps=s["clip_steps"], batch_size=s["clip_batch_size"], lr=2e-3, weight_decay=0.1, width=s["width"],
                  depth=s["vit_depth"], text_layers=2, heads=s["heads"], patch=s["patch"])
    stok = shapes_tokenizer()
    torch.manual_seed(seed)
    clip = CLIP(clip_config(clip_s, stok))
    clip_run = train_contrastive(clip, clip_loss, Pictures(train_data), stok, clip_s, seed, progress)
    clip_seconds = time.perf_counter() - t0

    torch.manual_seed(seed)
    lm = TransformerLM(text)
    t0 = time.perf_counter()

    def lm_loss(step):  # 1. the text alone
        ids, _ = train.batch(step % (s["max_shots"] + 1), s["batch_size"], gen)
        logits = lm(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), _labels(ids, train.img)[:, 1:].flatten(),
                                                 ignore_index=-100)

    lm_final = _train(lm, [(list(lm.parameters()), 1.0)], lm_loss, s["lm_steps"], s["lm_lr"], progress, "lm")
    lm_seconds = time.perf_counter() - t0

    config = FlamingoConfig(text, clip.config.vision, name="flamingo-shapes", image_token_id=train.img, end_of_chunk_id=train.eoc,
                            cross_attn_every=1, n_latents=s["latents"], resampler_depth=s["resampler_depth"],
                            resampler_heads=s["heads"], resampler_head_dim=s["width"] // s["heads"])
    model = Flamingo(config)
    model.lm.load_state_dict(lm.state_dict())
    model.vision.load_state_dict(clip.vision.state_dict())
    model.freeze(vision=True, lm=True)  # 2. both frozen: the resampler and the gated layers learn
    t0 = time.perf_counter()

    def flamingo_loss(step):
        ids, px = train.batch(step % (s["max_shots"] + 1), s["batch_size"], gen)
        return model(ids, px, labels=_labels(ids, train.img)).loss

    trained = [p for p in model.parameters() if p.requires_grad]
    # the tanh gates start at 0 and every trained part speaks through them: they learn gate_lr times faster
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("_gate")]
    final = _train(model, [(gates, s["gate_lr"]), (rest, 1.0)], flamingo_loss, s["steps"], s["lr"], progress,
                   "flamingo")
    seconds = time.perf_counter() - t0

    def flamingo_answer(ids, px):
        return model.generate(ids, px, max_new_tokens=1, eos_id=train.eoc)[:, 0]

    def text_only_answer(ids, px):  # the frozen LM reads the same prompt, placeholders and all, without pictures
        return lm(ids)[:, -1].argmax(-1)

    out = {}
    for k in SHOTS:
        f, b = evaluate(flamingo_answer, test, train, k, seed), evaluate(text_only_answer, test, train, k, seed)
        out[k] = (f, b)
        if progress:
            print(f"  {k}-shot: flamingo {f['all']:.3f} text-only {b['all']:.3f}", file=sys.stderr)
    opened = [round(float(torch.tanh(x.attn_gate.detach()).abs().mean()), 3) for x in model.xattn]
    return {"flamingo_fewshot_accuracy": {str(k): round(out[k][0]["all"], 4) for k in SHOTS},
            "flamingo_text_only_fewshot_accuracy": {str(k): round(out[k][1]["all"], 4) for k in SHOTS},
            "flamingo_fewshot_accuracy_by_task": {str(k): {t: round(out[k][0][t], 4) for t in TASKS} for k in SHOTS},
            "flamingo_4shot_beats_0shot": out[4][0]["all"] > out[0][0]["all"],
            "flamingo_baseline": "text only: the frozen LM on the same prompts without the pictures (Flamingo with "
                                 "its gates at 0)",
            "flamingo_task": "the task (colour / shape / count) is only shown by the shots' answers",
            "flamingo_test_pictures": len(test.scenes), "flamingo_train_pictures": len(train.scenes),
            "flamingo_params": model.num_params(), "flamingo_trained_params": sum(p.numel() for p in trained),
            "flamingo_lm_steps": s["lm_steps"], "flamingo_steps": s["steps"], "flamingo_batch_size": s["batch_size"],
            "flamingo_lm_final_loss": round(lm_final, 4), "flamingo_final_loss": round(final, 4),
            "flamingo_attn_gates_tanh": opened, "flamingo_clip_steps": s["clip_steps"],
            "flamingo_clip_final_loss": round(clip_run["final_loss"], 4), "flamingo_clip_seconds": round(clip_seconds, 1),
            "flamingo_lm_seconds": round(lm_seconds, 1),
            "flamingo_train_seconds": round(seconds, 1)}
