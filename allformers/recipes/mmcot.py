"""Multimodal-CoT (Zhang et al. 2023): train, evaluate and ask, on ScienceQA or the synthetic set.

Two stages, one model architecture, two trainings:
  1. rationale generation: QCM-LE (question, context, options -> "Solution: <lecture> <solution>.");
  2. answer inference: QCMG-A (the same input + the rationale -> "The answer is (X).").
Stage 2 trains on the gold rationales and is evaluated on the rationales stage 1 generates for the
evaluation questions (the reference's eval_le / test_le files). By default stage 2 starts from the
weights stage 1 started from (the reference fine-tunes the same pretrained checkpoint twice);
`stage2_init="stage1"` starts it from the trained stage-1 model instead. One-stage baselines train
one model on QCM-A or QCM-ALE.

Models (`ModelSpec`): "t5" is a MultimodalSeq2Seq (T5 + gated fusion; vision=None is the plain
text T5), "decoder" a MultimodalDecoderLM (PaLM-E style), either a LLaMA-layout decoder from
scratch or a pretrained one (base="smollm2") trained with LoRA (lora={...}) or with the image
projection alone (lora=None).

    data = MMCoTData.synthetic(n_train=5000, seed=0)      # or MMCoTData.scienceqa("../shared/data/scienceqa_subset")
    result = run_pipeline(ModelFactory(ModelSpec(), data), data, data.splits["train"], data.splits["test"],
                          PipelineConfig())
    print(format_table({"two-stage": result.scores}))

The named recipes (MMCoTRecipe: the settings of `allformers mmcot train`, one field per flag) run
the same way through `allformers train --recipe mmcot-synthetic-t5-vit`."""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..data.scienceqa import build_pair, parse_answer, rationale_text, score
from ..data.synthetic_science import load_image
from ..errors import AllformersError
from ..models.multimodal import (IGNORE_INDEX, MultimodalConfig, MultimodalDecoderLM, MultimodalSeq2Seq,
                                 decoder_lm_loss, seq2seq_loss)
from ..objectives.ddp import unwrap
from ..objectives.seq2seq import Seq2SeqExamples
from ..training.trainer import TrainConfig, Trainer
from .registry import Recipe, register

# ViT with a convolutional stem: on the synthetic set it learned lengths and thermometers within 1,000 steps
# where the plain strided-patch ViT stayed at chance after 1,500 (benchmarks/bench_mmcot.py settings)
VIT = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 64, "depth": 2, "heads": 4, "conv_stem": True}
DETR = {"kind": "detr", "backbone": {"kind": "cnn", "width": 64, "layers": 2}, "width": 64, "num_queries": 8,
        "heads": 4}
# 64 wide: on one CPU thread it took 0.19 s a step (batch 32) where 128 wide took 0.5 s, and it reached 97% on
# stage 2 in 600 steps, which 128 wide (0.5 s a step) did not reach in 300
T5_TINY = dict(n_layer=2, n_decoder_layer=2, n_embd=64, n_head=4, head_dim=16, intermediate_size=256, block_size=320)
DECODER_TINY = dict(n_layer=4, n_head=4, n_embd=64, intermediate_size=256, block_size=512)
SPECIALS = ("<pad>", "</s>", "<s>")


class MMCoTError(AllformersError, ValueError):
    """A Multimodal-CoT setting, data folder or saved pipeline is not usable."""


# ---------------------------------------------------------------------- data
def train_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE for from-scratch models: <pad>=0 </s>=1 <s>=2."""
    from ..tokenization import Tokenizer

    tok = Tokenizer.train_bpe(texts, vocab_size=vocab_size, special_tokens=SPECIALS)
    tok.bos_token, tok.eos_token, tok.pad_token = "<s>", "</s>", "<pad>"
    return tok


class MMCoTData:
    """Problems (ScienceQA format) + a tokenizer + the pictures: token pairs and image batches by question id.

    Pictures come as `images` {qid: (S, S, 3) uint8} (models with a vision encoder) or as an
    ImageFeatureBank of precomputed features; with neither, every question is text-only."""

    def __init__(self, problems: dict, splits: dict, tokenizer=None, *, images: Optional[dict] = None, features=None,
                 use_caption: bool = True, max_source: int = 320, max_target: int = 160, chat: bool = False):
        self.problems, self.splits, self.tokenizer = problems, splits, tokenizer
        self.features, self.use_caption = features, use_caption
        self.max_source, self.max_target, self.chat = max_source, max_target, chat
        self.image_rows = {}
        self.pixels = None
        if images:
            qids = sorted(images)
            self.image_rows = {q: i for i, q in enumerate(qids)}
            arr = np.stack([images[q] for q in qids])  # (n, S, S, 3) uint8
            self.pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (n, 3, S, S)

    # --- constructors
    @classmethod
    def synthetic(cls, n_train: int = 5000, n_val: int = 500, n_test: int = 500, seed: int = 0, image_size: int = 32,
                  **kw) -> "MMCoTData":
        from ..data.synthetic_science import generate

        s = generate(n_train, n_val, n_test, seed=seed, image_size=image_size)
        for q, c in s.captions.items():
            s.problems[q]["caption"] = c
        data = cls(s.problems, s.splits, images=s.images, **kw)
        data.source = {"kind": "synthetic", "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed,
                       "image_size": image_size}
        return data

    @classmethod
    def scienceqa(cls, root, *, image_size: Optional[int] = None, features=None, use_caption: bool = True,
                  **kw) -> "MMCoTData":
        """A ScienceQA-format folder. Pictures are read from images/<qid>/image.png when image_size is
        given (a folder written by SyntheticScience.save); features: an ImageFeatureBank."""
        from ..data.scienceqa import image_path, load_scienceqa

        problems, splits = load_scienceqa(root, captions=use_caption)
        images = {}
        if image_size:
            for q, p in problems.items():
                path = image_path(root, q, p)
                if path is not None:
                    images[q] = load_image(path, image_size)
        data = cls(problems, splits, images=images or None, features=features, use_caption=use_caption, **kw)
        data.source = {"kind": "folder", "root": str(root), "image_size": image_size}
        return data

    def with_tokenizer(self, tokenizer, chat: bool) -> "MMCoTData":
        """The same problems and pictures for another model: its tokenizer, and chat=True for a pretrained
        chat decoder (the prompt goes inside its chat template)."""
        view = copy.copy(self)
        view.tokenizer, view.chat = tokenizer, chat
        return view

    # --- text
    def texts(self, qids: Sequence, fmt: str, rationales: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
        return [build_pair(self.problems[q], fmt, rationales[i] if rationales is not None else None, self.use_caption)
                for i, q in enumerate(qids)]

    def encode(self, qids: Sequence, fmt: str, rationales=None) -> tuple[list, list]:
        """-> (source ids, target ids). Seq2seq: both end with EOS. Chat (a pretrained decoder): the source is
        wrapped in the tokenizer's chat template and the target ends with its end-of-turn token."""
        tok = self.tokenizer
        pairs = self.texts(qids, fmt, rationales)
        src = tok.encode_batch([s for s, _ in pairs])
        tgt = tok.encode_batch([t for _, t in pairs])
        eos = tok.eos_id
        if self.chat:
            head, tail = self.chat_parts()
            src = [head + s[: self.max_source - len(head) - len(tail)] + tail for s in src]
        else:
            src = [s[: self.max_source - 1] + [eos] for s in src]
        tgt = [t[: self.max_target - 1] + [eos] for t in tgt]
        return src, tgt

    def chat_parts(self) -> tuple[list, list]:
        """Token ids before and after the user's message in the chat template (the image goes right after
        the first part: PaLM-E's interleaving at the start of the user turn)."""
        marker = "\u0000MMCOT\u0000"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True)
        head, tail = text.split(marker)
        enc = lambda s: self.tokenizer.backend.encode(s, add_special_tokens=False).ids  # noqa: E731
        return enc(head), enc(tail)

    # --- pictures
    @property
    def has_pictures(self) -> bool:
        return self.pixels is not None or self.features is not None

    def has_image(self, qid) -> bool:
        return qid in self.image_rows or (self.features is not None and qid in self.features)

    def picture(self, qid) -> Optional[np.ndarray]:
        """The question's picture as (S, S, 3) uint8, or None."""
        row = self.image_rows.get(qid)
        return None if row is None else self.pixels[row].permute(1, 2, 0).numpy()

    def image_batch(self, qids: Sequence) -> dict:
        """{"images" (B, 3, S, S) float in [0, 1], "has_image" (B,)} or {"image_features", "image_mask"} or {}."""
        if self.features is not None:
            feats, mask = self.features.lookup(qids)
            return {"image_features": feats, "image_mask": mask}
        if self.pixels is None:
            return {}
        rows = [self.image_rows.get(q, -1) for q in qids]
        idx = torch.tensor([max(r, 0) for r in rows])
        has = torch.tensor([r >= 0 for r in rows])
        imgs = self.pixels[idx].float() / 255.0
        imgs[~has] = 0.0
        return {"images": imgs, "has_image": has}


class MMSeq2SeqExamples(Seq2SeqExamples):
    """Seq2SeqExamples whose batches also carry each question's picture."""

    def __init__(self, data: MMCoTData, qids: Sequence, sources, targets, seed: int = 0):
        super().__init__(sources, targets, data.tokenizer.pad_id, seed=seed)
        self.data, self.qids = data, list(qids)

    def take(self, rows) -> dict:
        batch = super().take(rows)
        batch.update(self.data.image_batch([self.qids[i] for i in rows]))
        return batch


class MMDecoderExamples(MMSeq2SeqExamples):
    """Prompt + target as one right-padded row for a decoder-only LM; only the target is scored."""

    def take(self, rows) -> dict:
        seqs = [np.concatenate([self.sources[i], self.targets[i]]) for i in rows]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, (i, s) in enumerate(zip(rows, seqs)):
            n, n_src = len(s), len(self.sources[i])
            ids[r, :n], mask[r, :n] = torch.from_numpy(s), 1
            labels[r, n_src:n] = torch.from_numpy(self.targets[i])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                **self.data.image_batch([self.qids[i] for i in rows])}


class _Loss:
    """The objective for the Trainer; num_tokens counts scored target tokens."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, model, batch):
        return self.fn(model, batch)

    @staticmethod
    def num_tokens(batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    variant: str = "t5"  # "t5": MultimodalSeq2Seq; "decoder": MultimodalDecoderLM (PaLM-E style)
    vision: Optional[dict] = field(default_factory=lambda: dict(VIT))  # None: text only
    size: dict = field(default_factory=dict)  # overrides of T5_TINY / DECODER_TINY (from-scratch models)
    base: Optional[str] = None  # decoder: a pretrained LM ("smollm2" or a path); None: from scratch
    lora: Optional[dict] = None  # with base: LoRAConfig fields; None trains the projection (and vision) only
    train_vision: bool = True  # False: the vision encoder stays frozen (PaLM-E with a pretrained ViT)
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.variant not in ("t5", "decoder"):
            raise MMCoTError(f"variant={self.variant!r}: 't5' or 'decoder'")
        if self.base and self.variant != "decoder":
            raise MMCoTError("base= (a pretrained LM) is for the decoder variant; the T5 variant trains from scratch "
                             "or from a saved allformers T5")


def is_decoder(model) -> bool:
    return isinstance(unwrap(model), MultimodalDecoderLM)


class ModelFactory:
    """Builds the same starting model every time it is called (stage 2 may start where stage 1 did):
    the first build is kept and deep-copied. `vision_state`: weights for the vision encoder (e.g. one
    trained in another model) loaded over its fresh initialization."""

    def __init__(self, spec: ModelSpec, data: MMCoTData, lm=None, vision_state: Optional[dict] = None):
        self.spec, self.data, self.lm = spec, data, lm  # lm: the base LM, if the caller loaded it already
        self.vision_state = vision_state
        self._pristine = None

    def __call__(self):
        if self._pristine is None:
            model = self._build()
            if self.vision_state is not None:
                if getattr(model, "vision", None) is None:
                    raise MMCoTError("vision_state given, but this model has no vision encoder (vision=None or "
                                     "precomputed features)")
                model.vision.load_state_dict(self.vision_state)
            if not self.spec.train_vision and getattr(model, "vision", None) is not None:
                model.vision.requires_grad_(False)
            self._pristine = model
        return copy.deepcopy(self._pristine)

    def _vision(self):
        v = self.spec.vision
        if v is not None and v.get("kind") == "features":
            if self.data.features is None:
                raise MMCoTError("vision kind 'features' needs precomputed features: load them with "
                                 "allformers.blocks.vision.load_image_features and pass MMCoTData(features=...)")
            v = {"kind": "features", "patch_dim": self.data.features.patch_dim}
        return v

    def _build(self):
        from ..config import Config

        spec, tok = self.spec, self.data.tokenizer
        torch.manual_seed(spec.seed)
        if spec.variant == "t5":
            size = {**T5_TINY, **spec.size}
            text = Config.from_name("t5-small", vocab_size=tok.vocab_size, dropout=spec.dropout,
                                    head_input_scale=size["n_embd"] ** -0.5, decoder_start_token_id=tok.pad_id,
                                    **size).replace(name="mmcot-t5", description="t5-small's layout, tiny")
            return MultimodalSeq2Seq(MultimodalConfig(text=text, vision=self._vision()))  # T5's init: text.init
        if spec.base is None:  # a LLaMA-layout decoder from scratch
            size = {**DECODER_TINY, **spec.size}
            text = Config(name="mmcot-decoder", description="LLaMA layout, tiny", vocab_size=tok.vocab_size,
                          position="rotary", norm_class="RMSNorm", mlp_class="GLU", activation="silu", attn_bias=False,
                          mlp_bias=False, tie_embeddings=True, dropout=spec.dropout, **size)
            return MultimodalDecoderLM(MultimodalConfig(text=text, vision=self._vision(), image_pos=self._image_pos()))
        if self.lm is None:
            from ..checkpoints.io import load_reporting

            self.lm = load_reporting(spec.base)
        lm = self.lm
        lm.train()
        cfg = MultimodalConfig(text=lm.config, vision=self._vision(), image_pos=self._image_pos(), base=spec.base,
                               lora=spec.lora)
        model = MultimodalDecoderLM(cfg, lm=lm)
        for p in model.lm.parameters():
            p.requires_grad_(False)  # frozen: only LoRA adapters / the projection / the vision encoder train
        if spec.lora is not None:
            from ..models.lora import LoRAConfig, apply_lora

            apply_lora(model.lm, LoRAConfig(**spec.lora))
            cfg.lora = {**asdict(LoRAConfig(**spec.lora))}
        return model

    def _image_pos(self) -> int:
        return len(self.data.chat_parts()[0]) if self.data.chat else 0


# ---------------------------------------------------------------------- training and generation
def train_stage(model, data: MMCoTData, qids: Sequence, fmt: str, cfg: TrainConfig, *, rationales=None,
                progress: bool = True) -> dict:
    """Fine-tune `model` in place on `qids` rendered in `fmt`; returns the Trainer's summary."""
    src, tgt = data.encode(qids, fmt, rationales)
    decoder = is_decoder(model)
    examples = (MMDecoderExamples if decoder else MMSeq2SeqExamples)(data, qids, src, tgt, seed=cfg.seed)
    loss = _Loss(decoder_lm_loss if decoder else seq2seq_loss)
    summary = Trainer(model, loss, examples, cfg, progress=progress).fit()
    summary["epochs"] = cfg.max_steps * cfg.batch_size / len(examples)
    return summary


@torch.no_grad()
def generate_texts(model, data: MMCoTData, qids: Sequence, fmt: str, *, rationales=None, max_new_tokens: int = 64,
                   batch_size: int = 64, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy output text for every question (batched by source length)."""
    from tqdm import tqdm

    from ..generation.generate import left_pad
    from ..objectives.span_corruption import seq2seq_batch

    tok = data.tokenizer
    src, _ = data.encode(qids, fmt, rationales)
    order = sorted(range(len(qids)), key=lambda i: len(src[i]))
    out: list = [None] * len(qids)
    was = model.training
    model.eval()
    decoder = is_decoder(model)
    for b in tqdm(range(0, len(order), batch_size), disable=not progress, desc=desc, leave=False):
        rows = order[b:b + batch_size]
        image = data.image_batch([qids[i] for i in rows])
        if decoder:
            ids, mask = left_pad([src[i] for i in rows], tok.pad_id)
            seqs = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, **image)
        else:
            batch = seq2seq_batch([src[i] for i in rows], [[tok.eos_id]] * len(rows), tok.pad_id)
            seqs = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id, **image)[:, 1:]
        for i, seq in zip(rows, seqs.tolist()):
            seq = seq[:seq.index(tok.eos_id)] if tok.eos_id in seq else seq
            out[i] = " ".join(tok.decode(seq).split())
    model.train(was)
    return out


@torch.no_grad()
def gate_stats(model, data: MMCoTData, qids: Sequence, fmt: str, *, rationales=None, batch_size: int = 64) -> dict:
    """Mean fusion gate over the real text tokens of questions with and without a picture (T5 with vision)."""
    from ..objectives.span_corruption import seq2seq_batch

    if getattr(model, "fusion", None) is None:
        return {}
    src, _ = data.encode(qids, fmt, rationales)
    sums = {"image": [0.0, 0], "no_image": [0.0, 0]}
    was = model.training
    model.eval()
    for b in range(0, len(qids), batch_size):
        rows = list(range(b, min(b + batch_size, len(qids))))
        batch = seq2seq_batch([src[i] for i in rows], [[0]] * len(rows), data.tokenizer.pad_id)
        _, gate = model.encode(batch["input_ids"], batch["attention_mask"], return_gate=True,
                               **data.image_batch([qids[i] for i in rows]))
        mask = batch["attention_mask"].float()  # (B, S)
        per_row = (gate.mean(-1) * mask).sum(1) / mask.sum(1)  # (B,)
        for i, g in zip(rows, per_row.tolist()):
            key = "image" if data.has_image(qids[i]) else "no_image"
            sums[key][0] += g
            sums[key][1] += 1
    model.train(was)
    return {k: (s / n if n else None) for k, (s, n) in sums.items()} | {f"n_{k}": n for k, (_, n) in sums.items()}


def rationale_rouge(data: MMCoTData, qids: Sequence, rationales: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of generated rationales against the gold "Solution: <lecture> <solution>."."""
    from ..metrics.rouge import rouge_l_corpus

    return rouge_l_corpus(list(rationales), [rationale_text(data.problems[q]) for q in qids])


# ---------------------------------------------------------------------- the pipeline
@dataclass
class PipelineConfig:
    two_stage: bool = True
    one_stage_format: str = "QCM-A"  # one-stage baselines: "QCM-A" or "QCM-ALE"
    stage2_init: str = "base"  # "base": stage 2 starts from stage 1's starting weights (reference); "stage1": from stage 1
    rationale_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=3000, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=150, weight_decay=0.01, eval_interval=0,
        eval_at_start=False, log_interval=50))
    answer_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=800, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=40, weight_decay=0.01, eval_interval=0,
        eval_at_start=False, log_interval=50))
    max_rationale_tokens: int = 96
    max_answer_tokens: int = 12
    eval_batch_size: int = 64

    def __post_init__(self):
        if self.stage2_init not in ("base", "stage1"):
            raise MMCoTError(f"stage2_init={self.stage2_init!r}: 'base' (stage 1's starting weights) or 'stage1'")
        if self.one_stage_format not in ("QCM-A", "QCM-ALE"):
            raise MMCoTError(f"one_stage_format={self.one_stage_format!r}: 'QCM-A' or 'QCM-ALE'")

    @property
    def answer_format(self) -> str:
        return "QCMG-A" if self.two_stage else self.one_stage_format


@dataclass
class PipelineResult:
    scores: dict  # data.scienceqa.score(): accuracy per column, unparseable count
    predictions: dict  # qid -> chosen index or None
    answers: list  # the answer model's texts, in eval order
    rationales: Optional[list]  # stage-1 rationales (or QCM-ALE explanations), in eval order
    rouge_l: Optional[float]
    gate: dict  # {"rationale": gate_stats, "answer": gate_stats} (vision T5 only)
    models: dict  # {"rationale": model or None, "answer": model}
    seconds: dict = field(default_factory=dict)


def run_pipeline(make_model, data: MMCoTData, train_qids: Sequence, eval_qids: Sequence, cfg: PipelineConfig,
                 *, progress: bool = True) -> PipelineResult:
    """Train (two stages, or one) on train_qids, generate for eval_qids, score in the paper's columns."""
    t0 = time.perf_counter()
    seconds, m1 = {}, None
    if cfg.two_stage:
        m1 = make_model()
        first = copy.deepcopy(m1) if cfg.stage2_init == "base" else None
        train_stage(m1, data, train_qids, "QCM-LE", cfg.rationale_train, progress=progress)
        seconds["train_rationale"] = time.perf_counter() - t0
        m2 = first if first is not None else copy.deepcopy(m1)
        t = time.perf_counter()
        train_stage(m2, data, train_qids, "QCMG-A", cfg.answer_train, progress=progress)  # on gold rationales
        seconds["train_answer"] = time.perf_counter() - t
    else:
        m2 = make_model()
        t = time.perf_counter()
        train_stage(m2, data, train_qids, cfg.one_stage_format, cfg.answer_train, progress=progress)
        seconds["train_answer"] = time.perf_counter() - t
    result = evaluate_pipeline(m1, m2, data, eval_qids, cfg, progress=progress)
    result.seconds = {**seconds, **result.seconds, "total": time.perf_counter() - t0}
    return result


def evaluate_pipeline(rationale_model, answer_model, data: MMCoTData, qids: Sequence, cfg: PipelineConfig, *,
                      progress: bool = True) -> PipelineResult:
    """Stage 1 writes a rationale for every question (two-stage), stage 2 answers with it; scores, rationale
    ROUGE-L and gate statistics."""
    seconds, rationales, gate = {}, None, {}
    ev = dict(batch_size=cfg.eval_batch_size, progress=progress)
    if cfg.two_stage:
        t = time.perf_counter()
        rationales = generate_texts(rationale_model, data, qids, "QCM-LE", max_new_tokens=cfg.max_rationale_tokens,
                                    desc="rationales", **ev)
        seconds["generate_rationale"] = time.perf_counter() - t
        gate["rationale"] = gate_stats(rationale_model, data, qids, "QCM-LE")
    fmt = cfg.answer_format
    max_new = cfg.max_answer_tokens + (cfg.max_rationale_tokens if fmt == "QCM-ALE" else 0)
    t = time.perf_counter()
    answers = generate_texts(answer_model, data, qids, fmt, rationales=rationales, max_new_tokens=max_new,
                             desc="answers", **ev)
    seconds["generate_answer"] = time.perf_counter() - t
    gate["answer"] = gate_stats(answer_model, data, qids, fmt, rationales=rationales)
    if fmt == "QCM-ALE":  # the explanation after BECAUSE: is the rationale
        rationales = [("Solution: " + a.split("BECAUSE:", 1)[1].strip() + ".") if "BECAUSE:" in a else ""
                      for a in answers]
    preds = {q: parse_answer(a, len(data.problems[q]["choices"])) for q, a in zip(qids, answers)}
    rouge = rationale_rouge(data, qids, rationales) if rationales is not None else None
    return PipelineResult(score(data.problems, preds), preds, answers, rationales, rouge,
                          {k: v for k, v in gate.items() if v}, {"rationale": rationale_model, "answer": answer_model},
                          seconds)


# ---------------------------------------------------------------------- saving and asking
PIPELINE_FILE = "mmcot.json"


def save_pipeline(result: PipelineResult, folder, data: MMCoTData, cfg: PipelineConfig, extra: Optional[dict] = None):
    """folder/rationale, folder/answer (models with the tokenizer) and folder/mmcot.json (how to use them)."""
    from ..checkpoints.composite import save_multimodal

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in result.models.items():
        if m is not None:
            save_multimodal(m, folder / name, data.tokenizer)
    meta = {"two_stage": cfg.two_stage, "one_stage_format": cfg.one_stage_format, "answer_format": cfg.answer_format,
            "stage2_init": cfg.stage2_init,
            "max_rationale_tokens": cfg.max_rationale_tokens, "max_answer_tokens": cfg.max_answer_tokens,
            "use_caption": data.use_caption, "chat": data.chat, "max_source": data.max_source,
            "max_target": data.max_target, "data": getattr(data, "source", None),
            "image_size": _image_size(result.models["answer"], data), "scores": result.scores, "rouge_l": result.rouge_l,
            "gate": result.gate, **(extra or {})}
    (folder / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))
    with open(folder / "predictions.jsonl", "w") as f:  # what each evaluated question got
        for i, (q, pred) in enumerate(result.predictions.items()):
            f.write(json.dumps({"qid": q, "prediction": pred, "answer": data.problems[q]["answer"],
                                "output": result.answers[i],
                                "rationale": result.rationales[i] if result.rationales else None}) + "\n")
    return folder


def _image_size(model, data: MMCoTData) -> Optional[int]:
    """The picture size the model was trained on (None: it reads no pictures)."""
    v = model.config.vision
    if not v or v.get("kind") == "features":
        return None
    return v.get("image_size") or (getattr(data, "source", None) or {}).get("image_size") or 32


def pipeline_config(meta: dict, **overrides) -> PipelineConfig:
    """The PipelineConfig a saved pipeline was evaluated with (training settings aside)."""
    return PipelineConfig(two_stage=meta["two_stage"], one_stage_format=meta.get("one_stage_format", "QCM-A"),
                          stage2_init=meta.get("stage2_init", "base"), max_rationale_tokens=meta["max_rationale_tokens"],
                          max_answer_tokens=meta["max_answer_tokens"], **overrides)


def load_pipeline(folder) -> tuple[Optional[object], object, dict]:
    """-> (rationale model or None, answer model, meta) from save_pipeline's folder."""
    from ..checkpoints.composite import load_multimodal

    folder = Path(folder)
    if not (folder / PIPELINE_FILE).is_file():
        raise MMCoTError(f"{folder} has no {PIPELINE_FILE}; train one with `allformers mmcot train --out {folder}`")
    meta = json.loads((folder / PIPELINE_FILE).read_text())
    rationale = load_multimodal(folder / "rationale") if meta["two_stage"] else None
    return rationale, load_multimodal(folder / "answer"), meta


def ask(rationale_model, answer_model, meta: dict, question: str, choices: Sequence[str], *, image=None,
        context: str = "") -> dict:
    """One question (and a picture: a path or an (S, S, 3) array) -> {"rationale", "answer" text, "choice"}."""
    if len(choices) < 2:
        raise MMCoTError("give at least two choices")
    problem = {"question": question, "choices": list(choices), "answer": 0, "hint": context, "caption": "",
               "image": "image.png" if image is not None else None, "lecture": "", "solution": "",
               "subject": "", "grade": "grade1"}
    images = None
    if image is not None:
        size = meta.get("image_size")
        if not size:
            import sys

            print("note: this model reads no pictures (text only, or precomputed features); the image is ignored",
                  file=sys.stderr)
        else:
            images = {"q": load_image(image, size) if not isinstance(image, np.ndarray) else image}
    tok = answer_model.tokenizer
    data = MMCoTData({"q": problem}, {"ask": ["q"]}, tok, images=images, use_caption=meta["use_caption"],
                     max_source=meta["max_source"], max_target=meta["max_target"], chat=meta.get("chat", False))
    rationales = None
    if meta["two_stage"]:
        rationales = generate_texts(rationale_model, data, ["q"], "QCM-LE", max_new_tokens=meta["max_rationale_tokens"])
    fmt = meta["answer_format"]
    max_new = meta["max_answer_tokens"] + (meta["max_rationale_tokens"] if fmt == "QCM-ALE" else 0)
    answer = generate_texts(answer_model, data, ["q"], fmt, rationales=rationales, max_new_tokens=max_new)[0]
    idx = parse_answer(answer, len(choices))
    return {"rationale": rationales[0] if rationales else None, "answer": answer, "choice": idx,
            "choice_text": choices[idx] if idx is not None else None}


# ---------------------------------------------------------------------- the recipe (`allformers mmcot train`)
VISION_KINDS = ("vit", "detr", "features", "none")


@dataclass(kw_only=True)
class MMCoTRecipe(Recipe):
    """Every setting of `allformers mmcot train`, one field per flag (the same names)."""

    # data
    data: str = "synthetic"  # "synthetic" (generated) or a ScienceQA-format folder (a path, or under the data root)
    n_train: int = 5000
    n_val: int = 500
    n_test: int = 500
    data_seed: int = 0
    image_size: int = 32  # pictures are resized to this (0: do not read images/)
    no_caption: bool = False
    features: Optional[str] = None  # precomputed image features (.npy)
    name_map: Optional[str] = None
    feature_kind: Optional[str] = None
    eval_split: str = "test"
    max_eval: Optional[int] = None
    eval_batch_size: int = 64
    seed: int = 0
    # model
    variant: str = "t5"
    vision: str = "vit"  # one of VISION_KINDS
    base: Optional[str] = None  # decoder variant: a pretrained LM to start from
    lora_rank: int = 8
    lora_layers: Optional[int] = None
    d_model: Optional[int] = None
    layers: Optional[int] = None
    vocab_size: int = 2048
    dropout: float = 0.0
    # pipeline and training
    one_stage: bool = False
    format: str = "QCM-A"
    stage2_init: str = "base"
    rationale_steps: int = 3000
    answer_steps: int = 800
    batch_size: int = 32
    lr: Optional[float] = None  # default 3e-3 from scratch, 2e-4 with base
    threads: Optional[int] = None
    train_split: str = "train"
    max_source: int = 320
    max_target: int = 160
    max_rationale_tokens: int = 96
    max_train: Optional[int] = None
    kind = "multimodal-cot"

    def __post_init__(self):
        if self.vision not in VISION_KINDS:
            raise MMCoTError(f"vision={self.vision!r}: one of {VISION_KINDS}")

    def with_max_steps(self, n: int) -> "MMCoTRecipe":
        return dataclasses.replace(self, rationale_steps=n, answer_steps=n)

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        recipe = dataclasses.replace(self, data=data) if data is not None else self
        return train_mmcot(recipe, out, progress=progress)

    def report(self, result: dict) -> str:
        return result["table"]


def load_data(s, tokenizer=None, chat: bool = False, data_source: Optional[dict] = None) -> MMCoTData:
    """The problems an MMCoTRecipe (or the eval command's settings, same names) points at.
    data_source: what a saved pipeline was trained on, used when s.data is None."""
    from ..blocks.vision import load_image_features
    from ..training.data import resolve_data_path

    source = data_source or {}
    which = s.data or ("synthetic" if source.get("kind") == "synthetic" else source.get("root"))
    if which is None:
        raise MMCoTError("say which data to evaluate on: --data synthetic or --data FOLDER")
    features = None
    if s.features:
        features = load_image_features(s.features, name_map=s.name_map, kind=s.feature_kind)
    kw = dict(use_caption=not s.no_caption, chat=chat)
    if which == "synthetic":
        if s.data is None and source:  # eval: regenerate exactly what the model was trained on
            n = (source["n_train"], source["n_val"], source["n_test"], source["seed"], source["image_size"])
        else:
            n = (s.n_train, s.n_val, s.n_test, s.data_seed, s.image_size or 32)
        data = MMCoTData.synthetic(*n[:3], seed=n[3], image_size=n[4], **kw)
        data.features = features
    else:
        root = resolve_data_path(which, folder=True, what="a ScienceQA-format folder (problems.json, ...)")
        data = MMCoTData.scienceqa(root, image_size=s.image_size or None, features=features, **kw)
    data.tokenizer = tokenizer
    return data


def split_qids(data: MMCoTData, name: str, limit: Optional[int]) -> list:
    if name not in data.splits:
        raise MMCoTError(f"split {name!r} is not in the data (splits: {sorted(data.splits)})")
    qids = data.splits[name]
    return qids[:limit] if limit else qids


def report_table(result: PipelineResult, title: str, paper: bool, data: MMCoTData, qids) -> str:
    """The paper's table (with the guessing row, and the paper's rows on ScienceQA), plus the gate means."""
    from ..data.scienceqa import PAPER, chance, format_table

    rows = {title: {**result.scores, "ROUGE-L": 100 * result.rouge_l if result.rouge_l is not None else None},
            "Random chance (these questions)": chance(data.problems, qids)}
    s = result.scores
    lines = [format_table({**rows, **(PAPER if paper else {})}, extra=["ROUGE-L"]),
             f"{s['total']} questions, {s['unparseable']} unparseable answers (counted wrong); columns are accuracy %; "
             f"ROUGE-L is the rationale's F1 x 100" + ("; the paper's rows are its ScienceQA test results (4,241 "
                                                       "questions, with images)" if paper else "")]
    show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for stage, g in result.gate.items():
        lines.append(f"gate ({stage} model): mean {show(g['image'])} on {g['n_image']} questions with a picture, "
                     f"{show(g['no_image'])} on {g['n_no_image']} without")
    return "\n".join(lines)


def result_json(result: PipelineResult) -> dict:
    return {"scores": result.scores, "rouge_l": result.rouge_l, "gate": result.gate, "seconds": result.seconds}


def _vision_spec(r: MMCoTRecipe, data: MMCoTData) -> Optional[dict]:
    vision = {"vit": VIT, "detr": DETR, "features": {"kind": "features"}, "none": None}[r.vision]
    if vision is not None and vision.get("kind") in ("vit", "detr"):
        vision = {**vision, "image_size": r.image_size} if vision["kind"] == "vit" and r.image_size else dict(vision)
        if not data.has_pictures:
            print("note: the data has no pictures (ScienceQA's images are not here); every question is text-only "
                  "for the vision model — pass --features for precomputed features", file=sys.stderr)
    return vision


def _pipeline_config(r: MMCoTRecipe) -> PipelineConfig:
    lr = r.lr or (2e-4 if r.base else 3e-3)
    train = TrainConfig(batch_size=r.batch_size, lr=lr, min_lr=lr / 10, weight_decay=0.01, eval_interval=0,
                        eval_at_start=False, log_interval=10, seed=r.seed, threads=r.threads)
    return PipelineConfig(two_stage=not r.one_stage, one_stage_format=r.format, stage2_init=r.stage2_init,
                          rationale_train=train.replace(max_steps=r.rationale_steps,
                                                        warmup_steps=max(1, r.rationale_steps // 20)),
                          answer_train=train.replace(max_steps=r.answer_steps, warmup_steps=max(1, r.answer_steps // 20)),
                          max_rationale_tokens=r.max_rationale_tokens, eval_batch_size=r.eval_batch_size)


def _model_spec(r: MMCoTRecipe, vision) -> ModelSpec:
    size = {}
    if r.d_model:
        size.update(n_embd=r.d_model, head_dim=r.d_model // 4, intermediate_size=4 * r.d_model)
    if r.layers:
        size.update(n_layer=r.layers, **({"n_decoder_layer": r.layers} if r.variant == "t5" else {}))
    lora = None
    if r.base and r.lora_rank:
        lora = {"rank": r.lora_rank, "alpha": 2.0 * r.lora_rank}
        if r.lora_layers:
            lora["top_layers"] = r.lora_layers
    return ModelSpec(variant=r.variant, vision=vision, size=size, base=r.base, lora=lora, dropout=r.dropout,
                     seed=r.seed)


def train_mmcot(r: MMCoTRecipe, out, *, progress: bool = True) -> dict:
    """Train the recipe's pipeline, evaluate it, save it into `out`; returns the scores and the table."""
    if r.threads:
        torch.set_num_threads(r.threads)
    lm = None
    if r.base:
        from ..checkpoints.io import load_reporting

        lm = load_reporting(r.base)
    data = load_data(r, chat=lm is not None)
    data.max_source, data.max_target = r.max_source, r.max_target
    train_qids = split_qids(data, r.train_split, r.max_train)
    eval_qids = split_qids(data, r.eval_split, r.max_eval)
    if lm is not None:
        data.tokenizer = lm.tokenizer
    else:
        texts = [s + " " + t for s, t in data.texts(train_qids, "QCM-LE")]
        data.tokenizer = train_tokenizer(texts, r.vocab_size)
    vision = _vision_spec(r, data)
    spec, cfg = _model_spec(r, vision), _pipeline_config(r)
    result = run_pipeline(ModelFactory(spec, data, lm=lm), data, train_qids, eval_qids, cfg, progress=progress)
    save_pipeline(result, out, data, cfg, extra={"model": {"variant": r.variant, "vision": r.vision, "base": r.base,
                                                           "lora": spec.lora},
                                                 "train_questions": len(train_qids), "eval_split": r.eval_split})
    title = f"{'two-stage' if cfg.two_stage else r.format} {r.variant}{'' if vision else ' text-only'}"
    table = report_table(result, title, paper=data.source["kind"] != "synthetic", data=data, qids=eval_qids)
    print(f"saved to {out} (allformers mmcot ask --model {out} ...); {result.seconds['total']:.0f} s", file=sys.stderr)
    return {"recipe": r.name, "out": str(out), **result_json(result), "table": table}


register(MMCoTRecipe(
    name="mmcot-synthetic-t5-vit", description="Multimodal-CoT, two stages, T5 (64 wide) + ViT with gated fusion, "
    "from scratch on 5,000 synthetic science problems whose answers are in the pictures; 3,000 + 800 steps of 32",
    target="well above the text-only T5 on picture questions (docs/multimodal_cot.md: 95.30% vs 53.70% at 20,000)"))
register(MMCoTRecipe(
    name="mmcot-scienceqa-t5", description="Multimodal-CoT two-stage T5 + ViT from scratch on the ScienceQA subset "
    "(no pictures here), 100 + 100 steps of 32, BPE of 4,096, scored on val",
    data="scienceqa_subset", eval_split="val", image_size=0, rationale_steps=100, answer_steps=100, vocab_size=4096,
    target="45.55% val average (guessing 40.93%; docs/multimodal_cot.md)"))
register(MMCoTRecipe(
    name="mmcot-scienceqa-smollm2", description="Multimodal-CoT PaLM-E style on the bundled SmolLM2-135M-Instruct "
    "(chat template, LoRA rank 8 on the top 8 blocks), 40 + 40 steps of 2 on the ScienceQA subset, first 50 val",
    data="scienceqa_subset", eval_split="val", image_size=0, variant="decoder", base="smollm2", lora_rank=8,
    lora_layers=8, lr=1e-3, rationale_steps=40, answer_steps=40, batch_size=2, max_source=256, max_target=96,
    max_rationale_tokens=64, max_eval=50, eval_batch_size=10, target="runs end to end (26.00% on 50 val questions)"))
