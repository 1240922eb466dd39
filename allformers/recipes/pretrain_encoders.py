"""Pretraining encoders from scratch on a plain text file: BERT's masked LM with dynamic masking
(RoBERTa's rule) and ELECTRA's replaced token detection, with the same tokenizer, data, batch,
sequence length and optimizer, so the two can be compared at equal compute.

    from allformers.recipes.pretrain_encoders import run_pretrain_recipe
    r = run_pretrain_recipe("electra-sotu-tiny", max_steps=50)   # -> runs/electra-sotu-tiny/encoder

What happens:
  * tokenizer: a lower-cased WordPiece (BERT's scheme) trained on the text, with [PAD] [UNK]
    [CLS] [SEP] [MASK] as specials and a BERT post-processor, so `Tokenizer.batch` frames every
    text as [CLS] a [SEP] (b [SEP]). `train_wordpiece`; pass `tokenizer=` to share one.
  * data: the whole text encoded once into one token stream, cut into rows of
    [CLS] + (seq_len - 2) tokens + [SEP] (no padding). Every `val_every`-th row is held out.
    Training rows are masked afresh each time they are drawn (`MaskedLMData(dynamic=True)`,
    BERT's 15% with 80/10/10); the held-out rows are masked once, so every evaluation sees the
    same masks.
  * BERT: an encoder TransformerLM with BERT's MLM head (tied); the MLM loss of `mlm_loss`.
  * ELECTRA: a generator (an MLM TransformerLM, narrower than the discriminator, same depth)
    and a discriminator (a one-logit token classifier of the BERT's size) in an
    ElectraPretraining, sharing token, position and type embeddings and the embedding norm;
    loss = MLM(G) + 50 * BCE(D), as `electra_loss`. The discriminator is the encoder kept for
    fine-tuning.
  * the MLM output layer runs on the masked positions only (`sparse_head=True`, as BERT's and
    ELECTRA's own code gather them first); the losses equal the library's `mlm_loss` /
    `electra_loss` exactly (tests), which compute full (B, T, V) logits (`sparse_head=False`).
  * compute: `step_flops` counts the FLOPs of one forward + backward of each objective with
    torch's FlopCounterMode (every matmul as executed), plus the attention score / weighted-sum
    matmuls that the CPU flash kernel hides from the counter (12 * L * H * D * T per token,
    PaLM appendix B). Softmax, norms, sampling and the optimizer are not counted.
  * training: the library's Trainer; for ELECTRA `ElectraTrainer`, which checkpoints the two
    networks (the generic save_checkpoint needs a model with one `config`).
  * output folder: encoder/ (the model to fine-tune, with tokenizer; for ELECTRA the
    discriminator), generator/ (ELECTRA), checkpoint/ (resumable), metrics.jsonl, loss.png,
    summary.json.

The recipes (`bert-mlm-sotu-tiny`, `bert-two-phase-sotu-tiny`, `electra-sotu-tiny`) are
PretrainRecipe entries of the one registry: `allformers train --recipe NAME` (or its alias
`allformers pretrain --recipe NAME`) runs them."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..deprecation import accepts_old_names
from ..training.data import DataError, resolve_data_path
from ..training.guards import check_out
from ..training.trainer import CHECKPOINT_DIR, STATE_FILE, TrainConfig, Trainer, TrainingError
from .registry import Recipe, apply_overrides, get_recipe, prepare, register

DEFAULT_TEXT = Path("sotu") / "sotu.txt"  # under the data root (../shared/data)
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ENCODER_DIR, GENERATOR_DIR, SUMMARY_FILE = "encoder", "generator", "summary.json"


# ---------------------------------------------------------------------- text and tokenizer
def resolve_text(data=None) -> Path:
    """A text file: the path itself, else the same relative path under the data root
    (../shared/data or $ALLFORMERS_DATA). No argument: sotu/sotu.txt under the data root."""
    return resolve_data_path(data, default=DEFAULT_TEXT, what="a plain UTF-8 text file (--data FILE.txt)")


def read_text(path, max_chars: Optional[int] = None) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from None
    text = text[:max_chars] if max_chars else text
    if not text.strip():
        raise DataError(f"{path} is empty; pretraining needs text")
    return text


def train_wordpiece(text: str, vocab_size: int = 8192, lowercase: bool = True, min_frequency: int = 2):
    """A BERT-style WordPiece tokenizer trained on `text`: BERT's normaliser and pre-tokenizer,
    ids 0-4 = [PAD] [UNK] [CLS] [SEP] [MASK], and a post-processor that frames a text as
    [CLS] a [SEP] and a pair as [CLS] a [SEP] b [SEP] (type 1 on b)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    from ..tokenization import Tokenizer

    backend = HFTokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True,
                                                    handle_chinese_chars=True, strip_accents=None)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    backend.train_from_iterator(_chunks(text), trainer)
    # The trainer breaks frequency ties in hash-map order, so two trainings on the same text number the
    # tokens differently (and, rarely, keep a different token at the cut-off). Renumber canonically:
    # specials first, then the rest sorted; WordPiece's greedy longest match does not depend on ids.
    vocab = backend.get_vocab()
    order = list(SPECIAL_TOKENS) + sorted(t for t in vocab if t not in SPECIAL_TOKENS)
    backend.model = models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return Tokenizer(backend, pad_token="[PAD]")


def _chunks(text: str, size: int = 1 << 16):
    """The text in ~64 KB pieces cut at whitespace (the Rust side encodes them in parallel)."""
    i = 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            k = text.rfind(" ", i, j)
            j = k + 1 if k > i else j
        yield text[i:j]
        i = j


def load_or_train_tokenizer(tokenizer, text: str, vocab_size: int):
    """`tokenizer` may be a Tokenizer, a folder holding tokenizer.json, or None (train one)."""
    from ..tokenization import Tokenizer

    if tokenizer is None:
        return train_wordpiece(text, vocab_size)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_folder(tokenizer)
    for tok in ("[CLS]", "[SEP]", "[MASK]", "[PAD]"):
        if tokenizer.token_id(tok) is None:
            raise DataError(f"the tokenizer has no {tok} token; encoder pretraining needs [CLS] [SEP] [MASK] [PAD] "
                            f"(train one with train_wordpiece)")
    return tokenizer


def encode_rows(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """(N, seq_len) rows [CLS] + seq_len - 2 tokens of the stream + [SEP], in text order. The
    stream is the whole text without special tokens; the last partial row is dropped."""
    if seq_len < 8:
        raise DataError(f"seq_len={seq_len} is too short for a pretraining row (>= 8)")
    backend = tokenizer.backend
    backend.no_truncation()  # Tokenizer.batch(max_length=...) leaves truncation switched on
    backend.no_padding()
    encs = backend.encode_batch(list(_chunks(text)), add_special_tokens=False)
    stream = torch.tensor([i for e in encs for i in e.ids], dtype=torch.long)  # (L,)
    body = seq_len - 2
    n = len(stream) // body
    if n < 2:
        raise DataError(f"the text gives {len(stream)} tokens: not even two rows of {seq_len}; use more text")
    rows = torch.empty((n, seq_len), dtype=torch.long)
    rows[:, 0] = tokenizer.token_id("[CLS]")
    rows[:, 1:-1] = stream[: n * body].view(n, body)
    rows[:, -1] = tokenizer.token_id("[SEP]")
    return rows


def split_rows(rows: torch.Tensor, val_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): every val_every-th row (1 in val_every, spread over the whole text) is
    held out; at least one."""
    held = torch.zeros(len(rows), dtype=torch.bool)
    held[val_every - 1::val_every] = True
    if not held.any():  # fewer rows than val_every: still hold one out, so evaluations mean something
        held[-1] = True
    return rows[~held], rows[held]


# ---------------------------------------------------------------------- recipes
@dataclass(kw_only=True)
class PretrainRecipe(Recipe):
    """A Recipe (zoo config + overrides + TrainConfig) for encoder pretraining on a text file.
    model / model_overrides: the BERT, or ELECTRA's discriminator. generator_model /
    generator_overrides: ELECTRA's generator (its embedding_size must equal the discriminator's)."""

    model: str  # a zoo config name
    train: TrainConfig
    model_overrides: dict = field(default_factory=dict)  # Config fields of the encoder
    tokenizer: Optional[str] = None  # a folder with tokenizer.json to use instead of training one
    objective: str = "mlm"  # "mlm" (BERT, dynamic masking) or "electra"
    data: str = str(DEFAULT_TEXT)
    vocab_size: int = 8192
    seq_len: int = 128
    mlm_probability: float = 0.15
    disc_weight: float = 50.0
    sparse_head: bool = True  # MLM logits at the masked positions only (as BERT's / ELECTRA's code)
    generator_model: str = ""
    generator_overrides: dict = field(default_factory=dict)
    val_every: int = 50  # 1 row in 50 is held out
    eval_rows: int = 256  # held-out rows per evaluation (fixed masks)
    max_chars: Optional[int] = None  # use only the first max_chars of the text (smoke runs)
    # BERT's schedule: ((0.9, 128), (0.1, 512)) = the first 90% of the steps on 128-token rows, the
    # rest on 512-token rows (long rows are costly; position embeddings past 128 learn in phase 2 only).
    # Empty: every step uses seq_len. Evaluation always uses seq_len rows, so phases stay comparable.
    phases: tuple = ()
    kind = "encoder-pretraining"

    def __post_init__(self):
        check_phases(self.phases)
        if self.objective not in ("mlm", "electra"):
            raise TrainingError(f"objective={self.objective!r} is not 'mlm' or 'electra'")

    def with_max_steps(self, n: int) -> "PretrainRecipe":
        """n steps, warmup cut to 6% of them when that is shorter (an explicit warmup override wins)."""
        warmup = min(self.train.warmup_steps, max(1, int(0.06 * n)))
        return dataclasses.replace(self, train=self.train.replace(max_steps=n, warmup_steps=warmup))

    def run(self, *, out: Path, data=None, progress: bool = True, resume: bool = False, verbose: bool = True) -> dict:
        return run_pretrain(self, out=out, data=data, tokenizer=self.tokenizer, resume=resume, progress=progress,
                            verbose=verbose)

    def report(self, r: dict) -> str:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in {**r["train_parts"], **r["val_metrics"]}.items())
        return (f"--- {r['recipe']}: {r['steps']} steps of {r['batch_size']} x {r['seq_len']} tokens, "
                f"{r['train_flops'] / 1e12:.2f} TFLOP ({r['flops_per_step']['total'] / 1e9:.2f} GFLOP/step), "
                f"trained in {r['times_s']['train']:.0f} s, total {r['times_s']['total']:.0f} s\n"
                f"final train loss {r['final_train_loss']:.4f}, held-out loss {r['val_loss']:.4f}; {losses}\n"
                f"encoder: {r['encoder']} (allformers finetune --model {r['encoder']})"
                + (f"\ngenerator: {r['generator']}" if r["generator"] else "")
                + f"\nmetrics: {r['metrics']}\nplot: {r['plot']}")


def check_phases(phases) -> None:
    if not phases:
        return
    shares = [s for s, _ in phases]
    if any(s <= 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-9:
        raise TrainingError(f"phase shares {shares} must be positive and sum to 1 (e.g. ((0.9, 128), (0.1, 512)))")
    if any(int(L) != L or L < 8 for _, L in phases):
        raise TrainingError(f"phase row lengths {[L for _, L in phases]} must be integers >= 8")


def phase_steps(phases, max_steps: int) -> list[int]:
    """Steps per phase: floor(share * max_steps) for each but the last, which takes the rest
    (BERT: 900,000 + 100,000 of 1M; here 720 + 80 of 800)."""
    counts = [int(share * max_steps) for share, _ in phases[:-1]]
    return counts + [max_steps - sum(counts)]


class PhasedData:
    """A Trainer data source that hands out rows of the first length for the first phase's steps,
    then the next length, and so on (one sample() call per optimizer step)."""

    def __init__(self, sources: list, steps: list[int]):
        if len(sources) != len(steps):
            raise TrainingError(f"{len(sources)} data sources for {len(steps)} phases")
        self.sources, self.steps, self.calls = sources, steps, 0

    def phase_at(self, step: int) -> int:
        """Index of the phase that step (0-based) belongs to; past the plan, the last phase."""
        for i, end in enumerate(itertools.accumulate(self.steps)):
            if step < end:
                return i
        return len(self.steps) - 1

    def sample(self, n: int) -> dict:
        batch = self.sources[self.phase_at(self.calls)].sample(n)
        self.calls += 1
        return batch

    def state_dict(self) -> dict:
        return {"calls": self.calls, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
        for src, st in zip(self.sources, state["sources"]):
            src.load_state_dict(st)


def get_pretrain_recipe(name: str) -> PretrainRecipe:
    return get_recipe(name, PretrainRecipe)


# One encoder size for both: BERT's layout (post-LN, embedding LayerNorm, 2 segment types, GELU), 4 layers x
# 128 wide, 2 heads, FFN 512, 128-wide embeddings, 128-token rows. (4 x 256 runs ~100 steps in 5 minutes on
# one busy CPU core here: too few to learn anything.) The classifier activation is GELU for both (ELECTRA's
# default; BERT's pooler uses tanh) so fine-tuning puts identical heads on identical bodies.
TINY_ENCODER = dict(n_layer=4, n_head=2, n_embd=128, intermediate_size=512, embedding_size=128, block_size=128,
                    dropout=0.0, classifier_activation="gelu")
# ELECTRA-Small's generator rule: same depth, 1/4 of the hidden size (one 32-wide head); it shares the
# discriminator's 128-wide embeddings (projected down to 32) and its MLM head's transform maps back up to 128.
TINY_GENERATOR = dict(n_layer=4, n_head=1, n_embd=32, intermediate_size=128, embedding_size=128, block_size=128,
                      dropout=0.0)
# The same optimizer for both: AdamW, peak lr 1e-3 after 6% warmup, cosine to 1e-4, BERT's weight decay.
# Batch 8 x 128 tokens: in this tiny budget more updates beat bigger batches (measured: at 400 steps, batch 8
# at lr 1e-3 had left the unigram plateau, held-out MLM 6.28, while batch 16 at lr 2e-3 was still on it, 6.43).
TINY_TRAIN = TrainConfig(max_steps=800, batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=48, weight_decay=0.01,
                         beta1=0.9, beta2=0.999, eps=1e-6, grad_clip=1.0, eval_interval=200, log_interval=10,
                         seed=1337)
# ELECTRA's step costs ~9% more FLOPs than BERT's (step_flops, batch 8 x 128): at equal training FLOPs it
# gets floor(800 * F_bert / F_electra) steps. bench_electra_vs_bert.py recomputes this from the counts.
ELECTRA_EQUAL_FLOP_STEPS = 733

register(PretrainRecipe(
    name="bert-mlm-sotu-tiny", objective="mlm",
    description="BERT MLM (dynamic masking, 15% with 80/10/10) from scratch on State of the Union: 4 x 128, "
                "WordPiece 8k, 128-token rows, batch 8, 800 steps",
    model="bert-base-uncased", model_overrides=dict(TINY_ENCODER), train=TINY_TRAIN,
    target="the baseline of docs/electra_vs_bert.md (MLM loss; spam accuracy after fine-tuning)"))

register(PretrainRecipe(
    name="bert-two-phase-sotu-tiny", objective="mlm",
    description="BERT's two-phase schedule on the tiny BERT: 90% of 800 steps on 128-token rows, the last 10% "
                "on 512-token rows (position embeddings up to 512), State of the Union",
    model="bert-base-uncased", model_overrides=dict(TINY_ENCODER), train=TINY_TRAIN, seq_len=128,
    phases=((0.9, 128), (0.1, 512)),
    target="the phase split of the BERT paper (90% / 10% of the steps); MLM loss on 128-token held-out rows"))

register(PretrainRecipe(
    name="electra-sotu-tiny", objective="electra",
    description="ELECTRA (generator 32 wide = 1/4 of a 4 x 128 discriminator, shared embeddings, lambda 50) "
                "from scratch on State of the Union, same data/batch/rows as bert-mlm-sotu-tiny, 733 steps "
                "(equal training FLOPs)",
    model="electra-small-discriminator", model_overrides=dict(TINY_ENCODER),
    generator_model="electra-small-generator", generator_overrides=dict(TINY_GENERATOR),
    train=TINY_TRAIN.replace(max_steps=ELECTRA_EQUAL_FLOP_STEPS),
    target="beat bert-mlm-sotu-tiny's spam accuracy at equal training FLOPs (docs/electra_vs_bert.md)"))


# ---------------------------------------------------------------------- models
def build_models(recipe: PretrainRecipe, vocab_size: int, seed: int):
    """BERT: a TransformerLM with its MLM head. ELECTRA: an ElectraPretraining (generator +
    discriminator, embeddings tied). Initial weights from `seed`."""
    from ..config import Config
    from ..models import build_model
    from ..objectives import ElectraPretraining

    torch.manual_seed(seed)
    over = {"block_size": max([recipe.seq_len] + [L for _, L in recipe.phases])}
    main_cfg = Config.from_name(recipe.model, **{**recipe.model_overrides, **over, "vocab_size": vocab_size}
                                ).replace(name=recipe.name)
    if recipe.objective == "mlm":
        if main_cfg.task != "lm" or not main_cfg.lm_head:
            raise TrainingError(f"{recipe.model}: an MLM recipe needs a config with task='lm' and an LM head")
        return build_model(main_cfg)
    gen_cfg = Config.from_name(recipe.generator_model, **{**recipe.generator_overrides, **over,
                                                          "vocab_size": vocab_size}).replace(name=recipe.name + "-generator")
    disc = build_model(main_cfg)
    gen = build_model(gen_cfg)
    return ElectraPretraining(gen, disc, tie=True)


def encoder_of(model):
    """The network kept for fine-tuning: the BERT itself, or ELECTRA's discriminator."""
    return getattr(model, "discriminator", model)


def param_counts(model) -> dict:
    if hasattr(model, "discriminator"):
        disc = sum(p.numel() for p in model.discriminator.parameters())
        total = sum(p.numel() for p in model.parameters())  # shared embeddings once
        return {"encoder": disc, "generator_only": total - disc, "total": total}
    n = sum(p.numel() for p in model.parameters())
    return {"encoder": n, "total": n}


# ---------------------------------------------------------------------- objectives
# The library's mlm_loss and ElectraPretraining.forward compute vocabulary logits at EVERY position
# ((B, T, V)) and then keep the ~15% that are masked. BERT's and ELECTRA's own code gather the masked
# positions first and run the output layer on those alone. At this size the tied (V x E) output layer
# has more weights than the whole body, so the sparse form is what makes a few minutes of CPU enough.
# `sparse_head=True` computes exactly the same losses that way (tests check it against mlm_loss and
# electra_loss, sampling included); `sparse_head=False` calls the library's functions.
def masked_head_logits(lm, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) at the N selected positions, their labels (N,)), the LM head run on those only."""
    from ..objectives.mlm import IGNORE_INDEX, model_inputs

    h = lm(batch["input_ids"], return_hidden=True, **model_inputs(batch))  # (B, T, C)
    sel = batch["labels"] != IGNORE_INDEX  # (B, T)
    return lm.head(h[sel]), batch["labels"][sel]  # (N, V), (N,)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def sparse_mlm_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlm_loss with the head on the masked positions only -> (loss, logits (N, V), labels (N,))."""
    logits, labels = masked_head_logits(model, batch)
    return _ce(logits, labels), logits, labels


def sparse_electra_loss(pair, batch: dict, disc_weight: float = 50.0,
                        sample_generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
    """electra_loss for an ElectraPretraining with the generator's head on the masked positions
    only. Samples the same tokens as ElectraPretraining.forward / corrupt from the same generator
    state (one multinomial over the selected rows, in row-major order). Calls the two networks
    directly, so it is for single-process runs (DDP would not see one forward)."""
    import torch.nn.functional as F

    from ..objectives import discriminator_loss, original_ids
    from ..objectives.mlm import IGNORE_INDEX, check_generator, model_inputs

    kw = model_inputs(batch)
    ids, labels = batch["input_ids"], batch["labels"]
    sel = labels != IGNORE_INDEX
    gen_logits, gen_labels = masked_head_logits(pair.generator, batch)  # (N, V), (N,)
    orig = original_ids(ids, labels)
    with torch.no_grad():
        corrupted = orig.clone()
        if gen_labels.numel():
            check_generator(sample_generator, gen_logits.device)
            probs = F.softmax(gen_logits.detach().float() / pair.temperature, dim=-1)
            corrupted[sel] = torch.multinomial(probs, 1, generator=sample_generator).squeeze(1)
        replaced = (corrupted != orig).float()  # (B, T)
    disc_logits = pair.discriminator(corrupted, **kw).squeeze(-1)  # (B, T)
    gen = _ce(gen_logits, gen_labels)
    disc = discriminator_loss(disc_logits, replaced, batch.get("attention_mask"))
    return gen + disc_weight * disc, {"gen_loss": gen.detach(), "disc_loss": disc.detach(),
                                      "disc_logits": disc_logits, "replaced": replaced, "corrupted": corrupted}


class ElectraLogged:
    """ELECTRA's joint loss (the library's electra_loss, or sparse_electra_loss), plus the
    generator's MLM loss, the discriminator's BCE and its accuracy: averaged over each
    evaluation (`metrics()`, the Trainer's eval_metrics hook) and over the last training steps
    (`train_parts()`)."""

    name = "electra"

    def __init__(self, disc_weight: float = 50.0, sparse_head: bool = True, keep: int = 50):
        self.disc_weight, self.sparse_head, self.keep, self.recent = disc_weight, sparse_head, keep, []
        self._reset()

    def _reset(self):
        self.sums = {"gen_loss": 0.0, "disc_loss": 0.0, "disc_acc": 0.0, "replaced_fraction": 0.0}
        self.n = 0

    def __call__(self, model, batch) -> torch.Tensor:
        from ..objectives import electra_loss

        if self.sparse_head:
            loss, parts = sparse_electra_loss(model, batch, self.disc_weight)
        else:
            loss, parts = electra_loss(model, batch, self.disc_weight, return_parts=True)
        with torch.no_grad():
            acc = ((parts["disc_logits"] > 0).float() == parts["replaced"]).float().mean()
            row = {"gen_loss": parts["gen_loss"].item(), "disc_loss": parts["disc_loss"].item(),
                   "disc_acc": acc.item(), "replaced_fraction": parts["replaced"].mean().item()}
        if model.training:
            self.recent = (self.recent + [row])[-self.keep:]
        else:
            for k, v in row.items():
                self.sums[k] += v
            self.n += 1
        return loss

    num_tokens = staticmethod(lambda batch: batch["input_ids"].numel())

    def metrics(self) -> dict:
        out = {f"val_{k}": v / self.n for k, v in self.sums.items()} if self.n else {}
        self._reset()
        return out

    def train_parts(self) -> dict:
        return {k: sum(r[k] for r in self.recent) / len(self.recent) for k in self.recent[0]} if self.recent else {}


class MaskedLMLogged:
    """BERT's MLM loss (the library's mlm_loss, or sparse_mlm_loss), plus MLM accuracy on the
    held-out rows and the mean training loss of the last steps."""

    name = "mlm"

    def __init__(self, sparse_head: bool = True, keep: int = 50):
        self.sparse_head, self.keep, self.recent = sparse_head, keep, []
        self.correct = self.total = 0

    def __call__(self, model, batch) -> torch.Tensor:
        from ..objectives.mlm import IGNORE_INDEX, masked_cross_entropy, model_inputs

        if self.sparse_head:
            loss, logits, labels = sparse_mlm_loss(model, batch)
        else:
            full = model(batch["input_ids"], **model_inputs(batch))  # (B, T, V)
            loss = masked_cross_entropy(full, batch["labels"])
            sel = batch["labels"] != IGNORE_INDEX
            logits, labels = full[sel], batch["labels"][sel]
        if model.training:
            self.recent = (self.recent + [loss.item()])[-self.keep:]
        else:
            with torch.no_grad():
                self.correct += int((logits.argmax(-1) == labels).sum())
                self.total += int(labels.numel())
        return loss

    num_tokens = staticmethod(lambda batch: batch["input_ids"].numel())

    def metrics(self) -> dict:
        out = {"val_mlm_acc": self.correct / self.total} if self.total else {}
        self.correct = self.total = 0
        return out

    def train_parts(self) -> dict:
        return {"mlm_loss": sum(self.recent) / len(self.recent)} if self.recent else {}


# ---------------------------------------------------------------------- compute
def step_flops(model, objective, batch) -> dict:
    """FLOPs of one training step (forward + backward) on `batch`, counted as executed:
    {"counted": matmuls seen by FlopCounterMode, "attention": the attention matmuls added by
    formula, "total"}. The model's gradients are left as they were (zeroed after)."""
    from torch.utils.flop_counter import FlopCounterMode

    state = torch.get_rng_state()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = objective(model, batch)
        loss.backward()
    torch.set_rng_state(state)  # the measurement must not shift the training run's random stream
    model.zero_grad(set_to_none=True)
    B, T = batch["input_ids"].shape
    nets = [model.generator, model.discriminator] if hasattr(model, "discriminator") else [model]
    attention = 0
    for net in nets:
        c = net.config
        attention += 12 * c.n_layer * c.n_head * c.head_dim * T * B * T  # QK^T and AV, forward + backward
    counted = counter.get_total_flops()
    return {"counted": int(counted), "attention": int(attention), "total": int(counted + attention)}


def recipe_step_flops(name: str, tokenizer, rows: torch.Tensor, batch_size: Optional[int] = None,
                      seed: Optional[int] = None, overrides: Optional[dict] = None) -> dict:
    """step_flops of recipe `name` (fresh model) on `batch_size` rows of `rows` masked the recipe's
    way: what one optimizer step of that recipe costs, before training it. With the default seed
    (the recipe's) the probe batch is the one run_pretrain_recipe counts, so the numbers agree.
    (The sparse MLM head's share depends on how many tokens the probe batch masks.)"""
    from ..objectives import MLMMasker

    recipe = apply_overrides(get_pretrain_recipe(name), overrides)
    batch_size = batch_size or recipe.train.batch_size
    seed = recipe.train.seed if seed is None else seed
    model = build_models(recipe, tokenizer.vocab_size, seed)
    objective = (ElectraLogged(recipe.disc_weight, recipe.sparse_head) if recipe.objective == "electra"
                 else MaskedLMLogged(recipe.sparse_head))
    masker = MLMMasker.from_tokenizer(tokenizer, mlm_probability=recipe.mlm_probability)
    batch = masker.apply({"input_ids": rows[:batch_size]}, torch.Generator().manual_seed(seed))
    return step_flops(model, objective, batch)


def equal_flop_steps(reference_steps: int, reference_flops: dict, other_flops: dict) -> int:
    """Steps of the other recipe whose training FLOPs do not exceed reference_steps of the reference."""
    return max(1, math.floor(reference_steps * reference_flops["total"] / other_flops["total"]))


# ---------------------------------------------------------------------- a trainer that checkpoints two networks
class ElectraTrainer(Trainer):
    """The library's Trainer, checkpointing an ElectraPretraining: the generic save_checkpoint
    writes one model folder from `model.config`, which the two-network module does not have.
    Here checkpoint/ holds discriminator/ and generator/ (each a complete model folder with the
    tokenizer; the shared embeddings are stored in both) and trainer_state.pt."""

    def save_checkpoint(self, path=None) -> Optional[Path]:
        from ..checkpoints.io import atomic_folder_write, save

        path = Path(path) if path else self.checkpoint_path
        if path is None:
            raise TrainingError("no checkpoint path: give the Trainer an out folder or pass a path")
        if self.world_size > 1:
            raise TrainingError("ElectraTrainer checkpoints single-process runs only")
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "rng": [torch.get_rng_state()],
                 "cuda_rng": [torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None],
                 "data": self.train_data.state_dict() if hasattr(self.train_data, "state_dict") else None,
                 "train_config": self.cfg.to_dict(), "world_size": 1, "last_eval": self.last_eval}

        def write(tmp: Path):
            tmp.mkdir(parents=True, exist_ok=True)
            save(self.raw_model.discriminator, tmp / "discriminator", tokenizer=self.tokenizer)
            save(self.raw_model.generator, tmp / "generator", tokenizer=self.tokenizer)
            torch.save(state, tmp / STATE_FILE)

        atomic_folder_write(path, write)
        return path

    def load_checkpoint(self, path=None) -> int:
        from ..checkpoints.io import load_state_dict_into, read_safetensors

        path = Path(path) if path else self.checkpoint_path
        if path is None or not (path / STATE_FILE).exists():
            raise TrainingError(f"no checkpoint to resume at {path} (missing {STATE_FILE})")
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        for name in ("discriminator", "generator"):
            net = getattr(self.raw_model, name)
            tied = ("lm_head.weight",) if getattr(net.config, "tie_embeddings", False) else ()
            load_state_dict_into(net, read_safetensors(path / name / "model.safetensors"), str(path / name),
                                 allow_init=tied)
        self.optimizer.load_state_dict(state["optimizer"])
        if state["data"] is not None and hasattr(self.train_data, "load_state_dict"):
            self.train_data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"][0])
        self.step, self.last_eval = state["step"], state.get("last_eval", {})
        if self.metrics_path and self.metrics_path.exists():
            kept = [ln for ln in self.metrics_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln)["step"] <= self.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
            self.history = [json.loads(ln) for ln in kept]
        return self.step


# ---------------------------------------------------------------------- running one
def prepare_data(recipe: PretrainRecipe, data=None, tokenizer=None, *, log=print):
    """(tokenizer, train rows (N, T), held-out rows (M, T), text path): tokenizer trained here
    unless one is given."""
    path = resolve_text(data if data is not None else recipe.data)
    t0 = time.perf_counter()
    text = read_text(path, recipe.max_chars)
    trained = tokenizer is None
    tok = load_or_train_tokenizer(tokenizer, text, recipe.vocab_size)
    t1 = time.perf_counter()
    rows = encode_rows(tok, text, recipe.seq_len)
    train_rows, val_rows = split_rows(rows, recipe.val_every)
    log(f"[allformers] {path}: {len(text):,} chars -> {rows.numel() - 2 * len(rows):,} tokens; "
        f"{len(train_rows):,} train / {len(val_rows):,} held-out rows of {recipe.seq_len}; "
        + (f"WordPiece {tok.vocab_size} trained in {t1 - t0:.1f} s, " if trained else "")
        + f"encoded in {time.perf_counter() - t1:.1f} s")
    return tok, train_rows, val_rows, path


@accepts_old_names
def run_pretrain_recipe(name: str, *, data=None, out=None, max_steps: Optional[int] = None,
                        tokenizer=None, seed: Optional[int] = None, overrides: Optional[dict] = None,
                        resume: bool = False, progress: bool = True, verbose: bool = True,
                        prepared=None, return_model: bool = False) -> dict:
    """The registered recipe `name` with the caller's changes (registry.prepare), run by run_pretrain
    into `out` (default runs/NAME)."""
    recipe = prepare(name, max_steps=max_steps, seed=seed, overrides=overrides, kind=PretrainRecipe)
    out = Path(out) if out is not None else Path("runs") / name
    return run_pretrain(recipe, out=out, data=data, tokenizer=tokenizer if tokenizer is not None else recipe.tokenizer,
                        resume=resume, progress=progress, verbose=verbose, prepared=prepared,
                        return_model=return_model)


def pretrain_data(recipe: PretrainRecipe, cfg: TrainConfig, tok, train_rows, val_rows, path, log):
    """(masker, training data, {"val": fixed masked batches}): dynamic masking of the training rows,
    one source per phase when the recipe has phases (each phase's rows re-cut at its length)."""
    from ..objectives import MaskedLMData, MLMMasker

    masker = MLMMasker.from_tokenizer(tok, mlm_probability=recipe.mlm_probability)
    train_data = MaskedLMData(train_rows, masker, dynamic=True, seed=cfg.seed)
    if recipe.phases:
        text = read_text(path, recipe.max_chars)
        sources = [train_data if L == recipe.seq_len else
                   MaskedLMData(split_rows(encode_rows(tok, text, L), recipe.val_every)[0], masker, dynamic=True,
                                seed=cfg.seed + i)
                   for i, (_, L) in enumerate(recipe.phases)]
        train_data = PhasedData(sources, phase_steps(recipe.phases, cfg.max_steps))
        log(f"[allformers] phases: " + ", ".join(f"{n} steps x {L} tokens" for n, (_, L) in
                                               zip(train_data.steps, recipe.phases)))
    val = val_rows[: recipe.eval_rows]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    eval_batch = max(1, min(64, len(val)))
    eval_data = {"val": [masker.apply({"input_ids": val[i:i + eval_batch]}, gen)
                         for i in range(0, len(val), eval_batch)]}
    return masker, train_data, eval_data


def run_pretrain(recipe: PretrainRecipe, *, out, data=None, tokenizer=None, resume: bool = False,
                 progress: bool = True, verbose: bool = True, prepared=None, return_model: bool = False) -> dict:
    """Pretrain `recipe` from scratch and save encoder/ (+ generator/ for ELECTRA) in `out`.
    `tokenizer`: a Tokenizer or folder to share (default: train one on the text). `prepared`:
    (tokenizer, train rows, held-out rows, path) from `prepare_data`, to skip tokenising again.
    Returns the summary also written to summary.json: steps, FLOPs per step and in total, times,
    final losses, parameter counts, paths (return_model=True adds the trained module under "model")."""
    from ..checkpoints.io import save

    t0 = time.perf_counter()
    log = print if verbose else (lambda *a, **k: None)
    name = recipe.name
    cfg = recipe.train
    if cfg.eval_interval > cfg.max_steps:
        cfg = cfg.replace(eval_interval=0)
    out = check_out(out)  # before the data is read; a fresh run's Trainer keeps the last run's records aside

    tok, train_rows, val_rows, path = prepared if prepared is not None else prepare_data(recipe, data, tokenizer, log=log)
    t_data = time.perf_counter()
    masker, train_data, eval_data = pretrain_data(recipe, cfg, tok, train_rows, val_rows, path, log)

    model = build_models(recipe, tok.vocab_size, cfg.seed)
    electra = recipe.objective == "electra"
    objective = (ElectraLogged(recipe.disc_weight, recipe.sparse_head) if electra
                 else MaskedLMLogged(recipe.sparse_head))
    probe = masker.apply({"input_ids": train_rows[: cfg.batch_size]}, torch.Generator().manual_seed(cfg.seed))
    flops = step_flops(model, objective, probe)  # the training data's generator is left alone
    objective.recent = []
    trainer = (ElectraTrainer if electra else Trainer)(model, objective, train_data, cfg, eval_data=eval_data, out=out,
                                                      tokenizer=tok, progress=progress, eval_metrics=objective.metrics)
    if resume and (out / CHECKPOINT_DIR / STATE_FILE).exists():
        trainer.load_checkpoint()
        log(f"[allformers] resumed from {out / CHECKPOINT_DIR} at step {trainer.step}")
    log(f"[allformers] {name}: {param_counts(model)} params, {flops['total'] / 1e9:.2f} GFLOP per step "
        f"(batch {cfg.batch_size} x {recipe.seq_len}), {cfg.max_steps} steps = {flops['total'] * cfg.max_steps / 1e12:.2f} TFLOP")
    summary = trainer.fit()
    t_fit = time.perf_counter()

    enc = encoder_of(model)
    save(enc, out / ENCODER_DIR, tokenizer=tok)
    if electra:
        save(model.generator, out / GENERATOR_DIR, tokenizer=tok)
    last = trainer.last_eval
    phases = ([{"steps": n, "seq_len": L} for n, (_, L) in zip(train_data.steps, recipe.phases)]
              if recipe.phases else None)
    result = {
        "recipe": name, "objective": recipe.objective, "data": str(path), "out": str(out),
        "encoder": str(out / ENCODER_DIR), "generator": str(out / GENERATOR_DIR) if electra else None,
        "steps": trainer.step, "batch_size": cfg.batch_size, "seq_len": recipe.seq_len,
        "tokens_seen": (sum(p["steps"] * cfg.batch_size * p["seq_len"] for p in phases) if phases
                        else trainer.step * cfg.batch_size * recipe.seq_len),
        "phases": phases,
        "flops_per_step": flops, "train_flops": flops["total"] * trainer.step,
        "params": param_counts(model), "vocab_size": tok.vocab_size,
        "train_rows": len(train_rows), "heldout_rows": len(val_rows),
        "final_train_loss": summary["loss"], "train_parts": objective.train_parts(),
        "val_loss": last.get("val"), "val_metrics": dict(trainer.last_metrics),
        "times_s": {"data": t_data - t0, "fit": summary["fit_time_s"], "train": summary["train_time_s"],
                    "per_step": summary["train_time_s"] / max(1, trainer.step), "total": time.perf_counter() - t0,
                    "save": time.perf_counter() - t_fit},
        "tokens_per_s": summary["tokens_per_s"], "threads": torch.get_num_threads(),
        # MFU from the counted FLOPs (the Trainer's own MFU assumes full-vocabulary logits at every position)
        "mfu": (flops["total"] * trainer.step / summary["train_time_s"] / summary["peak_flops"]
                if summary["train_time_s"] and summary.get("peak_flops") else None),
        "train_config": cfg.to_dict(), "model_config": enc.config.to_dict(),
        "generator_config": model.generator.config.to_dict() if electra else None,
        "metrics": summary["metrics"], "plot": summary["plot"],
    }
    (out / SUMMARY_FILE).write_text(json.dumps(result, indent=2))
    if return_model:
        result["model"] = model
    return result


def random_init_encoder(recipe_name: str, tokenizer, out, seed: int = 1337) -> Path:
    """The BERT recipe's architecture with fresh weights (no pretraining) saved with `tokenizer`:
    the fine-tuning baseline."""
    from ..checkpoints.io import save

    recipe = get_pretrain_recipe(recipe_name)
    model = encoder_of(build_models(recipe, tokenizer.vocab_size, seed))
    save(model, Path(out), tokenizer=tokenizer)
    return Path(out)
