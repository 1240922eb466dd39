"""BLIP-2 (Li et al. 2023): a frozen image encoder and a frozen language model joined by a Q-Former.

    pixels -> ViT (frozen) -> image tokens (B, N, Dv)
           -> Q-Former: num_query_tokens learned queries cross-attend to them -> (B, Q, Dq)
    stage 1 (no LM): the queries against the Q-Former's own reading of the caption, three objectives at once,
           each with its attention mask (models/qformer.py, objectives/blip2.py):
             ITC  image-text contrastive: each query's projection against the text's [CLS] projection, the best
                  query scoring the pair, over the batch (queries and text do not see each other)
             ITM  image-text matching: queries and text see each other; a 2-way head on the mean query output
                  tells a matching pair from a hard negative (drawn by the ITC similarities)
             ITG  image-grounded generation: the caption decoded by the Q-Former's causal text half, which sees
                  every query (queries never see the text)
    stage 2: the queries, projected (language_projection) to the LM's width, are soft prompts: they fill the
           text's image placeholders (models/vlm.py) and the frozen LM (OPT, LLaMA, ... or a T5's encoder)
           continues with the caption or the answer.

Hugging Face's Blip2ForConditionalGeneration / Blip2Model / Blip2ForImageTextRetrieval / Blip2QFormerModel load
both ways (checkpoints/hf_blip2.py). `freeze(stage)` freezes what the paper freezes.

    model = BLIP2(BLIP2Config.from_name("blip2-tiny-shapes"))
    logits = model(pixel_values, input_ids_with_placeholders).logits        # stage 2
    new_tokens = model.generate(pixel_values, max_new_tokens=10)           # a caption
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.feedforward import ACTIVATIONS
from ..config import Config, ConfigError, SavedConfig
from .lm import TransformerLM
from .qformer import QFormer, QFormerConfig, TextEmbeddings
from .seq2seq import Seq2SeqLM
from .vit import ViT, ViTConfig
from .vlm import FrozenParts, generate_from_embeds, left_padded, scatter_image_tokens, with_image_tokens

STAGES = (1, 2)


@dataclass
class BLIP2Config(SavedConfig):
    vision: ViTConfig
    qformer: QFormerConfig
    text: Optional[Config] = None  # the frozen LM: decoder-only or a T5 (is_encoder_decoder); None: stage 1 only
    name: str = ""
    description: str = ""
    image_token_id: Optional[int] = None  # the LM's placeholder id that the projected queries replace
    bos_token_id: Optional[int] = None  # the LM's bos: the prompt of a caption when none is given
    # stage 1: text embeddings, vision / text projections to embed_dim (ITC), the ITM head, the learned
    # temperature and the ITG head (BERT's MLM-style head tied to the word embeddings)
    stage1: bool = True
    embed_dim: int = 256  # the ITC space (HF: image_text_hidden_size)
    itg_head: bool = True  # False: the Q-Former cannot caption (HF's checkpoints carry no such head)
    temperature_init: float = 0.07
    label_smoothing: float = 0.1  # ITC and ITG cross-entropies (LAVIS)
    cls_token_id: int = 101  # BERT's [CLS]: the text's first token for ITC and ITM
    dec_token_id: int = 30522  # BLIP-2's [DEC]: replaces [CLS] when the Q-Former decodes (ITG)

    def __post_init__(self):
        if self.qformer.vision_width != self.vision.width:
            raise ConfigError(f"the Q-Former cross-attends to {self.qformer.vision_width}-wide features; the ViT gives "
                              f"{self.vision.width}: set qformer.vision_width={self.vision.width}")
        if self.text is None and not self.stage1:
            raise ConfigError("a BLIP-2 without a language model is its stage 1: it needs stage1=True")
        if self.stage1 and not self.qformer.text_input:
            raise ConfigError("stage 1 reads captions with the Q-Former: it needs qformer.text_input=True")
        if self.text is not None and self.image_token_id is not None and not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id={self.image_token_id} is outside the LM's vocabulary of {self.text.vocab_size}")
        if self.text is not None and self.image_token_id is None:
            raise ConfigError("the projected queries fill image placeholders in the LM's input: set image_token_id")

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @classmethod
    def from_name(cls, name: str, **overrides) -> "BLIP2Config":
        from ..errors import UnknownModelError

        if name not in BLIP2_CONFIGS:
            raise UnknownModelError(name, BLIP2_CONFIGS)
        return dataclasses.replace(BLIP2_CONFIGS[name](), name=name, **overrides)


def _eva_vit_g(**kw) -> ViTConfig:
    """EVA-CLIP's ViT-g/14 as BLIP-2 uses it: its last layer removed (39 of 40), features before the last norm."""
    return ViTConfig(**{**dict(name="eva-vit-g-14", image_size=224, patch_size=14, width=1408, depth=39, heads=16,
                                intermediate_size=6144, activation="gelu", norm_eps=1e-6, final_norm="tokens+pooled",
                                pooling="cls"), **kw})


def _stage2(lm: Config, image_token_id: int, bos: Optional[int], description: str) -> BLIP2Config:
    # LAVIS drops the Q-Former's text parts (embeddings, text feed-forwards, ITG head) for stage 2, as do HF's
    # checkpoints; the queries alone remain
    return BLIP2Config(_eva_vit_g(), QFormerConfig(text_input=False), lm, image_token_id=image_token_id,
                       bos_token_id=bos, stage1=False, itg_head=False, description=description)


BLIP2_CONFIGS = {  # name -> a function making the config (the shapes of the released checkpoints)
    "blip2-opt-2.7b": lambda: _stage2(Config.from_name("opt-2.7b"), 50265, 2,
                                      "BLIP-2 OPT-2.7B: frozen EVA ViT-g/14 and OPT-2.7B, 32 queries of a 12-layer Q-Former"),
    "blip2-opt-6.7b": lambda: _stage2(Config.from_name("opt-6.7b"), 50265, 2,
                                      "BLIP-2 OPT-6.7B: frozen EVA ViT-g/14 and OPT-6.7B, 32 queries of a 12-layer Q-Former"),
    "blip2-flan-t5-xl": lambda: _stage2(
        Config.from_name("flan-t5-base", n_embd=2048, intermediate_size=5120, n_head=32, n_layer=24,
                         n_decoder_layer=24, head_dim=64), 32100, None,
        "BLIP-2 Flan-T5-XL: frozen EVA ViT-g/14 and Flan-T5-XL (queries into its encoder)"),
    "blip2-itm-vit-g": lambda: BLIP2Config(
        _eva_vit_g(), QFormerConfig(), None, itg_head=False,
        description="BLIP-2's stage-1 Q-Former (ITC / ITM heads) on EVA ViT-g/14, no language model"),
}


@dataclass
class BLIP2Output:
    logits: torch.Tensor  # (B, T, V) over the LM's whole input (decoder-only), or the decoder's (T5)
    loss: Optional[torch.Tensor] = None
    query_output: Optional[torch.Tensor] = None  # (B, Q, Dq) the Q-Former's queries
    image_embeds: Optional[torch.Tensor] = None  # (B, N, Dv) the frozen ViT's tokens


class ITGHead(nn.Module):
    """BERT's LM head on the Q-Former's text: dense + activation + LayerNorm, then the word embeddings (tied) + bias."""

    def __init__(self, c: QFormerConfig, word: nn.Embedding):
        super().__init__()
        self.dense, self.act = nn.Linear(c.width, c.width), ACTIVATIONS[c.activation]
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        self.word = [word]  # not a submodule: the table belongs to the text embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, vocab)
        return F.linear(self.norm(self.act(self.dense(h))), self.word[0].weight, self.bias)


class BLIP2(FrozenParts):
    def __init__(self, config: BLIP2Config):
        super().__init__()
        self.config = c = config
        q = c.qformer
        self.vision = ViT(c.vision)
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_query_tokens, q.width) * 0.02)
        self.qformer = QFormer(q)
        if c.stage1:
            self.text_embeddings = TextEmbeddings(q)
            self.vision_projection = nn.Linear(q.width, c.embed_dim)
            self.text_projection = nn.Linear(q.width, c.embed_dim)
            self.itm_head = nn.Linear(q.width, 2)
            self.temperature = nn.Parameter(torch.tensor(float(c.temperature_init)))
            self.itg_head = ITGHead(q, self.text_embeddings.word) if c.itg_head else None
        self.lm = None
        if c.text is not None:
            self.lm = Seq2SeqLM(c.text) if c.text.is_encoder_decoder else TransformerLM(c.text)
            self.language_projection = nn.Linear(q.width, c.text.n_embd)

    # ------------------------------------------------------------------ freezing
    def freeze(self, stage: int) -> "BLIP2":
        """Stage 1: the image encoder is frozen; stage 2: the image encoder and the LM. Frozen parts keep their
        weights bit for bit (no gradients, so no optimizer step or weight decay reaches them) and stay in eval mode."""
        if stage not in STAGES:
            raise ConfigError(f"BLIP-2 has stages {list(STAGES)}, not {stage!r}")
        if stage == 2 and self.lm is None:
            raise ConfigError("stage 2 trains the queries into a language model; this BLIP-2 has none (text=None)")
        return self.freeze_parts(("vision",) if stage == 1 else ("vision", "lm"))

    # ------------------------------------------------------------------ shared pieces
    @property
    def device(self):
        return self.query_tokens.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def image_embeds(self, pixel_values: torch.Tensor, interpolate_pos_encoding: Optional[bool] = None) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> the frozen ViT's tokens (B, N, Dv), final norm included."""
        return self.vision(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state

    def queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The Q-Former's queries alone, reading the image -> (B, Q, Dq) (HF's get_qformer_features)."""
        B = image_embeds.shape[0]
        q = self.query_tokens.expand(B, -1, -1)
        return self.qformer(q, q.shape[1], image_embeds)

    def language_inputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (projected queries (B, Q, D_lm), queries (B, Q, Dq), image tokens (B, N, Dv))."""
        self._need_lm()
        image = self.image_embeds(pixel_values)
        q = self.queries(image)
        return self.language_projection(q), q, image

    def _need_lm(self):
        if self.lm is None:
            raise ConfigError("this BLIP-2 has no language model (stage 1 only: text=None); use itc / itm / itg")

    def prompt_ids(self, input_ids: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """The LM's input ids with the query placeholders: as given when they hold them; else num_query_tokens
        placeholders put in front (a missing prompt is the LM's bos token, as transformers' generate does)."""
        c = self.config
        if input_ids is None:
            ids = with_image_tokens([] if c.bos_token_id is None else [c.bos_token_id], c.num_query_tokens,
                                    c.image_token_id)
            return torch.tensor([ids] * batch, dtype=torch.long, device=device)
        return input_ids

    def lm_embeds(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        """The LM's input embeddings with the projected queries in its placeholders -> (embeds, queries, image)."""
        feats, q, image = self.language_inputs(pixel_values)
        wte = self.lm.encoder.wte if self.config.text.is_encoder_decoder else self.lm.wte
        embeds = scatter_image_tokens(wte(input_ids), input_ids, self.config.image_token_id, feats)
        return embeds, q, image

    # ------------------------------------------------------------------ stage 2 (HF's Blip2ForConditionalGeneration)
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, decoder_input_ids: Optional[torch.Tensor] = None) -> BLIP2Output:
        """pixel_values (B, 3, H, W); input_ids (B, T) holding num_query_tokens image placeholders per row;
        attention_mask (B, T); labels (B, T') next-token targets aligned with the last T' positions (-100 unscored;
        decoder-only) or the decoder's targets (T5) -> BLIP2Output(logits, loss)."""
        self._need_lm()
        embeds, q, image = self.lm_embeds(pixel_values, input_ids)
        loss = None
        if self.config.text.is_encoder_decoder:
            if decoder_input_ids is None:
                if labels is None:
                    raise ConfigError("a T5 language model needs decoder_input_ids or labels")
                decoder_input_ids = self.lm.shift_right(labels)
            enc = self.lm.encoder(None, attention_mask=attention_mask, inputs_embeds=embeds, return_hidden=True)
            logits = self.lm(None, decoder_input_ids, attention_mask=attention_mask, encoder_out=enc)
            if labels is not None:
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        else:
            logits = self.lm(None, attention_mask=attention_mask, inputs_embeds=embeds)
            if labels is not None:  # HF: the last labels.size(1) positions, shifted by one
                tail = logits[:, -labels.shape[1]:]
                loss = F.cross_entropy(tail[:, :-1].reshape(-1, tail.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)
        return BLIP2Output(logits, loss, q, image)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *, max_new_tokens: int = 30, **kwargs) -> torch.Tensor:
        """A caption (no input_ids) or an answer to a prompt (input_ids with the query placeholders, padded either
        side) -> the new tokens (B, n); decoder-only LMs decode with a KV cache, a T5 with its decoder's."""
        self._need_lm()
        pixel_values = pixel_values.to(self.device)
        ids = self.prompt_ids(input_ids, pixel_values.shape[0], self.device).to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        embeds, _, _ = self.lm_embeds(pixel_values, ids)
        if self.config.text.is_encoder_decoder:
            from ..generation.seq2seq import generate_seq2seq

            enc = self.lm.encoder(None, attention_mask=attention_mask, inputs_embeds=embeds, return_hidden=True)
            return generate_seq2seq(self.lm, ids, attention_mask, encoder_out=enc, max_new_tokens=max_new_tokens,
                                    **kwargs)[:, 1:]
        attention_mask, embeds, ids = left_padded(attention_mask, embeds, ids)
        return generate_from_embeds(self.lm, embeds, attention_mask, max_new_tokens=max_new_tokens, prompt_ids=ids,
                                    **kwargs)

    # ------------------------------------------------------------------ stage 1 (objectives/blip2.py uses these)
    def _need_stage1(self):
        if not self.config.stage1:
            raise ConfigError("this BLIP-2 has no stage-1 heads (stage1=False)")

    def text_embeds(self, input_ids: torch.Tensor, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[queries ;] word + position embeddings of the Q-Former's text -> (B, Q + T, Dq)."""
        self._need_stage1()
        t = self.text_embeddings(input_ids)
        return t if queries is None else torch.cat([queries, t], dim=1)

    def itc(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: Optional[torch.Tensor] = None):
        """One Q-Former pass with the unimodal mask -> (image feats (B, Q, E), text feat (B, E)), unit length;
        sim(image i, text j) = max over queries of image_feats[i, q] . text_feat[j] (HF's logits_per_image)."""
        B = image_embeds.shape[0]
        q = self.query_tokens.expand(B, -1, -1)
        h = self.qformer(self.text_embeds(input_ids, q), q.shape[1], image_embeds, text_mask, mask="unimodal")
        Q = q.shape[1]
        image = F.normalize(self.vision_projection(h[:, :Q]), dim=-1)
        text = F.normalize(self.text_projection(h[:, Q]), dim=-1)  # the text's first token: [CLS]
        return image, text

    @staticmethod
    def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """(Bi, Q, E), (Bt, E) -> (Bi, Bt): the best query's cosine for each image-text pair."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).max(dim=-1).values

    def itm(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: Optional[torch.Tensor] = None):
        """Queries and text in one bidirectional pass -> (B, 2) match logits (the ITM head on each query, averaged)."""
        B = image_embeds.shape[0]
        q = self.query_tokens.expand(B, -1, -1)
        h = self.qformer(self.text_embeds(input_ids, q), q.shape[1], image_embeds, text_mask, mask="bidirectional")
        return self.itm_head(h[:, :q.shape[1]]).mean(dim=1)

    def itg(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, text_mask: Optional[torch.Tensor] = None):
        """The caption decoded by the Q-Former: [DEC] in place of the first token, the causal mask -> logits (B, T, V)
        (position t predicts token t + 1)."""
        if self.itg_head is None:
            raise ConfigError("this BLIP-2 has no ITG head (itg_head=False)")
        B = image_embeds.shape[0]
        q = self.query_tokens.expand(B, -1, -1)
        dec = input_ids.clone()
        dec[:, 0] = self.config.dec_token_id
        h = self.qformer(self.text_embeds(dec, q), q.shape[1], image_embeds, text_mask, mask="causal")
        return self.itg_head(h[:, q.shape[1]:])

    @torch.inference_mode()
    def caption_with_qformer(self, pixel_values: torch.Tensor, max_new_tokens: int = 16, eos_id=None) -> torch.Tensor:
        """Greedy ITG captions from the Q-Former alone (no LM) -> (B, n) ids, [DEC] excluded (recomputed each step)."""
        image = self.image_embeds(pixel_values.to(self.device))
        ids = torch.full((image.shape[0], 1), self.config.dec_token_id, dtype=torch.long, device=self.device)
        done = torch.zeros(image.shape[0], dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            nxt = self.itg(image, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id if eos_id is not None else 0), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_id is not None:
                done |= nxt == eos_id
                if bool(done.all()):
                    break
        return ids[:, 1:]

    def without_stage1(self) -> "BLIP2":
        """The same model without its stage-1 heads (what stage 2 and Blip2ForConditionalGeneration keep); the
        weights are shared, not copied."""
        if self.lm is None:
            raise ConfigError("without its stage-1 heads this BLIP-2 would be empty: it has no language model")
        out = BLIP2.__new__(BLIP2)
        nn.Module.__init__(out)
        out.config = dataclasses.replace(self.config, stage1=False)
        for name in ("vision", "qformer", "lm", "language_projection"):
            setattr(out, name, getattr(self, name))
        out.query_tokens, out.frozen = self.query_tokens, self.frozen
        return out.train(self.training)

    # ------------------------------------------------------------------ saving
    @classmethod
    def from_name(cls, name: str, **overrides) -> "BLIP2":
        return cls(BLIP2Config.from_name(name, **overrides))

    def save(self, path, format: str = "allformers", tokenizer=None):
        """An allformers folder, or format="hf": Blip2ForConditionalGeneration (with a language model) or
        Blip2ForImageTextRetrieval (stage 1 without one)."""
        if format == "hf":
            from ..checkpoints.hf_blip2 import save_hf_blip2

            return save_hf_blip2(self, path, tokenizer=tokenizer)
        from ..checkpoints import save

        return save(self, path, format=format, tokenizer=tokenizer)
