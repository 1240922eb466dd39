"""One config dataclass for every model in the zoo.

Habits borrowed from litgpt: a plain dataclass, a named registry (`Config.from_name`),
derived fields filled in `__post_init__`, and only JSON-friendly values (class choices
are strings) so a config round-trips through `config.json`.

The switches form one vocabulary (x-transformers style). Blocks read them; nothing in
generic code asks which model it is building.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, UnknownModelError

POSITIONS = ("learned", "sinusoidal", "rotary", "alibi", "relative_bias", "disentangled", "relative_xl", "none")
POS_ATT_TERMS = ("c2p", "p2c")  # DeBERTa: content-to-position, position-to-content
NORMS = ("LayerNorm", "RMSNorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("MLP", "GLU")
SHARING = ("none", "all", "attention", "ffn")
TASKS = ("lm", "sequence-classification", "token-classification", "question-answering", "embedding", "pretraining",
         "base", "replaced-token-detection")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu")
INITS = ("gpt2", "bert", "t5")  # weight initialisation schemes (models/init.py) for training from scratch
# The attention class follows from the position scheme: the two relative schemes that change how
# scores are computed bring their own attention (blocks/disentangled.py, blocks/relative_xl.py,
# which register these names); every other position uses the plain Attention.
ATTENTION_FOR_POSITION = {"disentangled": "DisentangledAttention", "relative_xl": "RelativeXLAttention"}
ATTENTION_CLASSES = ("Attention", *ATTENTION_FOR_POSITION.values())
ATTENTION_PATTERNS = ("global", "local", "strided")  # per-layer patterns (blocks/sparse.py)



def read_config_file(path) -> dict:
    """config.json as a dict, or a ConfigError that says what is wrong with the file (missing, empty,
    truncated, not JSON, not an object): the one guard every reader of a config file goes through."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; point at a checkpoint folder that has one") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); restore the file or "
                          f"re-save the checkpoint") from None
    if not text.strip():
        raise ConfigError(f"{path} is empty; restore it or re-save the checkpoint")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; it may be "
                          f"truncated); restore it or re-save the checkpoint") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields; restore it "
                          f"or re-save the checkpoint")
    return raw


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list, tuple)}
_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string", "list": "a list"}


def check_field_types(cfg) -> None:
    """Every field of a config dataclass against its annotation (int, float, bool, str, list, and
    Optional of those), so n_embd='768' is named here instead of failing deep inside a block.
    Floats must be finite; bools are not accepted as numbers."""
    for f in fields(cfg):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        optional = ann.startswith("Optional[")
        base = ann[len("Optional["):-1] if optional else ann
        if base not in _KINDS:
            continue
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        if not isinstance(value, _KINDS[base]) or (isinstance(value, bool) and base != "bool"):
            hint = ""
            if isinstance(value, str):
                try:
                    hint = f"; write {f.name}={json.loads(value)!r}, without quotes"
                except ValueError:
                    pass
            raise ConfigError(f"{type(cfg).__name__}.{f.name}={value!r} must be {_KIND_NAMES[base]}"
                              f"{' or None' if optional else ''} (got {type(value).__name__}){hint}")
        if base == "float" and not math.isfinite(value):
            raise ConfigError(f"{type(cfg).__name__}.{f.name}={value} must be a finite number")


def config_json(d: dict, path=None) -> str:
    """A config dict as indented JSON, also written to `path` when given (every config class's to_json)."""
    text = json.dumps(d, indent=2)
    if path is not None:
        Path(path).write_text(text)
    return text

def _renamed_fields(d: dict) -> dict:
    """A saved config with the fields of older releases in today's names. DeBERTa's bucket settings
    (position_buckets per side, max_relative_positions) became rel_buckets / rel_max_distance; every
    old config.json has them, so they only carry over where they were read (position="disentangled")."""
    if "position_buckets" not in d and "max_relative_positions" not in d:
        return d
    d = dict(d)
    buckets, distance = d.pop("position_buckets", None), d.pop("max_relative_positions", None)
    if d.get("position") == "disentangled":
        if buckets is not None:
            d["rel_buckets"] = 2 * buckets
        if distance is not None:
            d["rel_max_distance"] = distance
    return d


@dataclass
class Config:
    # identity
    name: str = ""
    description: str = ""
    family: str = ""  # documentation only ("decoder", "encoder", ...); never branched on
    # sizes
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence the positions support
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: Optional[int] = None  # None -> n_head (MHA); 1 -> MQA; else GQA
    head_dim: Optional[int] = None  # None -> n_embd // n_head
    intermediate_size: Optional[int] = None  # None -> 4 * n_embd (MLP) or LLaMA's 8/3 rule (GLU)
    # attention
    attention_class: Optional[str] = None  # None -> ATTENTION_FOR_POSITION[position], else "Attention"
    causal: bool = True
    attn_bias: bool = True  # bias on q, k, v projections
    attn_out_bias: Optional[bool] = None  # None -> attn_bias
    attn_scale: Optional[float] = None  # None -> 1/sqrt(head_dim)
    # per-layer attention patterns (blocks/sparse.py): None = every layer dense; else a list cycled over
    # the layers, each "global" (dense causal), "local" (the last window_size keys, itself included:
    # GPT-3's locally banded layers, GPT-Neo, Mistral) or "strided" (keys at distances 0, k, 2k, ... with
    # k = attention_stride: the Sparse Transformer). ["global", "local"] alternates, starting dense.
    attention_pattern: Optional[list] = None
    window_size: int = 256
    attention_stride: int = 128
    # positions
    position: str = "learned"
    sinusoidal_layout: str = "interleaved"  # position="sinusoidal": sin, cos per frequency; "halves": [sin | cos] (CTRL)
    rotary_pct: float = 1.0  # fraction of each head that rotates (GPT-NeoX: 0.25)
    rope_base: float = 10000.0
    # relative distances in buckets, one vocabulary for T5's bias (position="relative_bias") and DeBERTa's
    # table (position="disentangled"): rel_buckets rows in the relative table over both directions (an
    # encoder gives half to each side, a T5 decoder all to the past), the first half of a side exact
    # distances and the rest log-spaced up to rel_max_distance, where they stop growing. DeBERTa: 0 = no
    # buckets, every distance up to rel_max_distance exact (HF's position_buckets is rel_buckets / 2).
    rel_buckets: Optional[int] = None  # None -> 32 (T5), 512 (DeBERTa: 256 a side)
    rel_max_distance: Optional[int] = None  # None -> 128 (T5), 512 (DeBERTa)
    # DeBERTa (position="disentangled", attention_class="DisentangledAttention"): one relative embedding
    # table shared by every layer, and which position terms join content-to-content ("c2p|p2c")
    pos_att_type: str = "c2p|p2c"
    # Transformer-XL / XLNet (position="relative_xl", attention_class="RelativeXLAttention", models/xlnet.py):
    # relative sinusoids with the learned biases u, v, and segment-level memory. mem_len: past hidden states
    # per layer carried into the next segment (0: none while training; generation then keeps every past
    # token); reuse_len: only a segment's first reuse_len tokens are remembered (0: all); clamp_len: longer
    # distances read as clamp_len (0: no clamp); same_length: every query sees mem_len + 1 keys; bi_data:
    # the second half of a batch reads its distances backwards (XLNet pretraining); relative_segments:
    # XLNet's learned same-segment / different-segment score in every layer (token_type_ids).
    mem_len: int = 0
    reuse_len: int = 0
    clamp_len: int = 0
    same_length: bool = False
    bi_data: bool = False
    relative_segments: bool = False
    # norms and residual layout
    norm_class: str = "LayerNorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    norm_placement: str = "pre"
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x))
    shared_parallel_norm: bool = False  # parallel residual with one norm for both branches (PaLM)
    embedding_norm: bool = False  # LayerNorm right after the embeddings (BLOOM)
    final_norm: Optional[bool] = None  # None -> True for pre-norm, False for post-norm
    # feed-forward
    mlp_class: str = "MLP"
    activation: str = "gelu"
    mlp_bias: bool = True
    # mixture of experts (blocks/moe.py: GShard, Switch, GLaM, Mixtral): n_expert > 0 turns the first
    # feed-forward of every moe_every layers (layers 0, moe_every, 2*moe_every, ...: GLaM's layout with 2)
    # into n_expert copies of the moe_mlp_class block, n_expert_per_token of them chosen per token by a router
    n_expert: int = 0
    n_expert_per_token: int = 2
    moe_every: int = 1
    moe_mlp_class: Optional[str] = None  # the experts' shape; None -> mlp_class (GLaM: GLU dense layers, MLP experts)
    moe_capacity_factor: Optional[float] = None  # training: an expert takes <= cf * k * tokens / E; None = all
    moe_eval_capacity_factor: Optional[float] = None  # the same in eval mode (None: cached decoding = recomputation)
    moe_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch: 0.01)
    moe_z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE: 0.001)
    # embeddings and head
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    head_input_scale: Optional[float] = None  # T5 scales hidden states by d_model**-0.5 before a tied head
    type_vocab_size: int = 0  # segment (BERT) or language (XLM) embeddings; 0 = none
    default_token_type: Optional[int] = 0  # the type embedded when no token_type_ids are passed; None: none (XLM)
    position_offset: int = 0  # RoBERTa/BART start positions at padding_idx + 1 = 2
    embedding_size: Optional[int] = None  # None -> n_embd; smaller = factorized embeddings (ALBERT, ELECTRA)
    lm_head: Optional[bool] = None  # None -> True for task="lm"/"pretraining"; False: a bare body under a task head
    # task head (models/heads.py): "lm" is a plain language model; "pretraining" (models/pretraining.py) is the
    # body's MLM head plus a pooled 2-way sentence-pair head (BERT's NSP, ALBERT's SOP) in one forward; "base" is
    # the bare backbone (HF's BertModel...): per-token hidden states and, with classifier_dense, the pooler's output;
    # "embedding" pools them into one sentence vector; "replaced-token-detection" is ELECTRA's discriminator (B, T)
    task: str = "lm"
    num_labels: int = 2
    labels: Optional[list] = None  # label names, index = class id
    classifier_dense: bool = True  # dense + activation before the output layer (BERT pooler, RoBERTa head);
    # task="base": the pooler alone (dense + activation over the pooled token), whose output is pooler_output
    classifier_activation: str = "tanh"
    pooling: str = "first"  # "first" token ([CLS]), "last" real token (causal reward models) or "mean"
    normalize: bool = True  # sentence embeddings come out unit-length
    head_transform: bool = False  # dense + activation + norm before the LM head (BERT-style MLM heads)
    head_activation: Optional[str] = None  # None -> activation
    share_layers: str = "none"  # ALBERT: "all", or only "attention" / "ffn" shared across layers
    # encoder-decoder (models/seq2seq.py builds two stacks from one config)
    is_encoder_decoder: bool = False
    n_decoder_layer: Optional[int] = None  # None -> n_layer
    n_decoder_head: Optional[int] = None  # None -> n_head (BART's decoder_attention_heads may differ)
    decoder_intermediate_size: Optional[int] = None  # None -> intermediate_size (BART's decoder_ffn_dim)
    cross_attention: bool = False  # set on the decoder stack: blocks attend to the encoder output
    decoder_start_token_id: int = 0
    embed_scale: Optional[float] = None  # multiply token embeddings (the original Transformer: sqrt(d_model))
    # initialisation of a fresh model (models/init.py): "gpt2" N(0, 0.02) with residual projections scaled by
    # 1/sqrt(2 n_layer); "bert" N(0, 0.02) everywhere; "t5" Mesh TensorFlow's (N(0, 1) embeddings, fan-in scaled)
    init: str = "gpt2"
    # regularisation
    dropout: float = 0.0
    # derived (filled in __post_init__, kept in JSON for readers, recomputed on load)
    rope_n_elem: int = field(default=0)

    def __post_init__(self):
        check_field_types(self)  # before anything computes with a value of the wrong type
        if self.head_dim is None:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ConfigError(
                    f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                    f"pick n_head among {_divisors(self.n_embd)} or set head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.attention_class is None:
            self.attention_class = ATTENTION_FOR_POSITION.get(self.position, "Attention")
        if self.rel_buckets is None:  # each scheme's published default
            self.rel_buckets = 512 if self.position == "disentangled" else 32
        if self.rel_max_distance is None:
            self.rel_max_distance = 512 if self.position == "disentangled" else 128
        if self.attn_out_bias is None:
            self.attn_out_bias = self.attn_bias
        if self.embedding_size is None:
            self.embedding_size = self.n_embd
        if self.lm_head is None:
            self.lm_head = self.task in ("lm", "pretraining")
        if self.n_decoder_layer is None and self.is_encoder_decoder:
            self.n_decoder_layer = self.n_layer
        if self.n_decoder_head is None and self.is_encoder_decoder:
            self.n_decoder_head = self.n_head
        if self.labels is not None:
            self.num_labels = len(self.labels)
        if self.head_activation is None:
            self.head_activation = self.activation
        if self.final_norm is None:
            self.final_norm = self.norm_placement == "pre"
        if self.moe_mlp_class is None:
            self.moe_mlp_class = self.mlp_class
        if self.intermediate_size is None:
            if self.mlp_class == "GLU":  # LLaMA: 2/3 of 4d, rounded up to a multiple of 256
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = 256 * ((hidden + 255) // 256)
            else:
                self.intermediate_size = 4 * self.n_embd
        if self.decoder_intermediate_size is None and self.is_encoder_decoder:
            self.decoder_intermediate_size = self.intermediate_size
        self.rope_n_elem = int(self.rotary_pct * self.head_dim) if self.position == "rotary" else 0
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self):
        def choice(fname, allowed):
            value = getattr(self, fname)
            if value not in allowed:
                raise ConfigError(f"{fname}={value!r} is not one of {list(allowed)}")

        choice("position", POSITIONS)
        choice("sinusoidal_layout", ("interleaved", "halves"))
        choice("norm_class", NORMS)
        choice("norm_placement", NORM_PLACEMENTS)
        choice("mlp_class", MLPS)
        choice("moe_mlp_class", MLPS)
        choice("activation", ACTIVATIONS)
        choice("init", INITS)
        choice("head_activation", ACTIVATIONS)
        choice("share_layers", SHARING)
        choice("task", TASKS)
        choice("attention_class", ATTENTION_CLASSES)
        choice("pooling", ("first", "last", "mean"))
        choice("classifier_activation", ACTIVATIONS + ("tanh",))
        for fname in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
                      "head_dim", "intermediate_size", "embedding_size"):
            if not isinstance(getattr(self, fname), int) or getattr(self, fname) <= 0:
                raise ConfigError(f"{fname} must be a positive integer, got {getattr(self, fname)!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                f"(grouped-query attention shares each key/value head among n_head // n_kv_head "
                f"query heads); pick n_kv_head among {_divisors(self.n_head)}")
        if self.task in ("sequence-classification", "token-classification") and self.num_labels < 1:
            raise ConfigError(f"num_labels={self.num_labels} must be >= 1 for task={self.task!r}")
        if self.task == "pretraining" and (not self.lm_head or self.num_labels != 2):
            raise ConfigError(f"task='pretraining' predicts masked tokens and a 2-way sentence-pair label (NSP/SOP): "
                              f"it needs lm_head=True (got {self.lm_head}) and num_labels=2 (got {self.num_labels})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be positive")
        if self.rope_base <= 0:
            raise ConfigError(f"rope_base={self.rope_base} must be positive (the rotary wavelength base; "
                              f"LLaMA uses 10000, LLaMA 3 500000)")
        if self.attn_scale is not None and self.attn_scale <= 0:
            raise ConfigError(f"attn_scale={self.attn_scale} must be positive (it multiplies q.k); leave it None for "
                              f"1/sqrt(head_dim)")
        if self.n_decoder_layer is not None and self.n_decoder_layer <= 0:
            raise ConfigError(f"n_decoder_layer={self.n_decoder_layer} must be a positive integer (or None = n_layer)")
        if self.position == "relative_bias":
            bidirectional = not self.causal or self.is_encoder_decoder  # an encoder halves the buckets per side
            least = 4 if bidirectional else 2
            if self.rel_buckets < least:
                why = "an encoder gives half to each direction, and " if bidirectional else ""
                raise ConfigError(f"rel_buckets={self.rel_buckets} must be >= {least} ({why}half of each side's "
                                  f"buckets are exact distances); T5 uses 32")
            exact = self.rel_buckets // (4 if bidirectional else 2)
            if self.rel_max_distance <= exact:
                raise ConfigError(f"rel_max_distance={self.rel_max_distance} must exceed the {exact} exact-distance "
                                  f"buckets of rel_buckets={self.rel_buckets}; T5 uses 128")
        if self.position != "rotary" and self.rotary_pct != 1.0:
            raise ConfigError(
                f"rotary_pct={self.rotary_pct} only applies with position='rotary' "
                f"(got position={self.position!r}); drop rotary_pct or set position='rotary'")
        if self.position == "rotary":
            if not 0.0 < self.rotary_pct <= 1.0:
                raise ConfigError(f"rotary_pct={self.rotary_pct} must be in (0, 1]")
            if self.rope_n_elem % 2:
                raise ConfigError(
                    f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} rotates "
                    f"{self.rope_n_elem} dims; rotary needs an even number")
        if self.parallel_residual and self.norm_placement == "post":
            raise ConfigError(
                "parallel_residual=True needs norm_placement='pre' (both branches read a "
                "normalised input); post-norm has no place to put the shared residual")
        if self.position_offset and self.position != "learned":
            raise ConfigError(f"position_offset={self.position_offset} only applies to position='learned' "
                              f"(got {self.position!r})")
        if self.type_vocab_size < 0 or self.position_offset < 0:
            raise ConfigError("type_vocab_size and position_offset must be >= 0")
        if self.lm_head and self.embedding_size != self.n_embd and self.tie_embeddings and not self.head_transform:
            raise ConfigError(
                f"embedding_size={self.embedding_size} != n_embd={self.n_embd} with tied embeddings needs "
                f"head_transform=True (it maps hidden states back to the embedding size), or tie_embeddings=False")
        if self.is_encoder_decoder and (self.cross_attention or not self.causal):
            raise ConfigError("an encoder-decoder config describes its decoder (causal=True); its stacks are derived "
                              "with encoder_config() / decoder_config() — do not set cross_attention or causal=False on it")
        self._validate_stacks()
        if self.default_token_type is not None and self.type_vocab_size and not \
                0 <= self.default_token_type < self.type_vocab_size:
            raise ConfigError(f"default_token_type={self.default_token_type} is not a type id below "
                              f"type_vocab_size={self.type_vocab_size}; pick one, or None to embed no type")
        if self.is_encoder_decoder and self.task != "lm":
            raise ConfigError(f"task={self.task!r} is not available for encoder-decoders yet; use task='lm'")
        if (self.position == "disentangled") != (self.attention_class == "DisentangledAttention"):
            raise ConfigError(
                f"position={self.position!r} with attention_class={self.attention_class!r}: DeBERTa's disentangled "
                f"positions and attention go together; leave attention_class unset (it follows from position) or "
                f"set both position='disentangled' and attention_class='DisentangledAttention'")
        if self.position == "disentangled":
            if self.rel_buckets < 0 or self.rel_buckets % 2 or self.rel_max_distance < 1:
                raise ConfigError(f"rel_buckets={self.rel_buckets} must be even and >= 0 (0 = no buckets; half go to "
                                  f"each side) and rel_max_distance={self.rel_max_distance} >= 1")
            per_side = self.rel_buckets // 2
            if per_side and not 2 <= per_side // 2 + 1 < self.rel_max_distance:
                raise ConfigError(f"rel_buckets={self.rel_buckets} spends half of each side's {per_side} buckets on "
                                  f"exact distances; it needs 4 <= rel_buckets < 4 * (rel_max_distance - 1) "
                                  f"(rel_max_distance={self.rel_max_distance}); DeBERTa-v3 uses 512 and 512")
            bad = [t for t in self.pos_att_type.split("|") if t and t not in POS_ATT_TERMS]
            if bad:
                raise ConfigError(f"pos_att_type={self.pos_att_type!r}: {bad} not among {list(POS_ATT_TERMS)} "
                                  f"(write them joined by '|', e.g. 'c2p|p2c')")
            if self.n_kv_head != self.n_head:
                raise ConfigError(f"position='disentangled' projects positions with every head's query and key; "
                                  f"it needs n_kv_head == n_head (got {self.n_kv_head} and {self.n_head})")
        if self.attention_pattern is not None:
            self._validate_pattern()
        if self.n_expert:
            self._validate_moe()
        self._validate_xl()
        if self.shared_parallel_norm and not self.parallel_residual:
            raise ConfigError("shared_parallel_norm=True only makes sense with parallel_residual=True")

    def _validate_pattern(self):
        pattern = self.attention_pattern
        if not isinstance(pattern, (list, tuple)) or not pattern or any(p not in ATTENTION_PATTERNS for p in pattern):
            raise ConfigError(f"attention_pattern={pattern!r} must be a non-empty list of {list(ATTENTION_PATTERNS)}, "
                              f"cycled over the layers (e.g. ['global', 'local'])")
        if set(pattern) != {"global"} and (not self.causal or self.attention_class != "Attention"):
            raise ConfigError(f"attention_pattern={list(pattern)} needs causal=True and attention_class='Attention' "
                              f"(got causal={self.causal}, attention_class={self.attention_class!r})")
        if len(set(pattern)) > 1 and self.share_layers in ("all", "attention"):
            raise ConfigError(f"share_layers={self.share_layers!r} shares one attention module across layers; "
                              f"it cannot follow attention_pattern={list(pattern)} — use one pattern or share_layers='ffn'")
        if self.window_size < 1 or self.attention_stride < 1:
            raise ConfigError(f"window_size={self.window_size} and attention_stride={self.attention_stride} must be >= 1")

    def _validate_moe(self):
        if self.n_expert < 0 or not 1 <= self.n_expert_per_token <= self.n_expert:
            raise ConfigError(f"n_expert_per_token={self.n_expert_per_token} must be between 1 and n_expert={self.n_expert}")
        if self.moe_every < 1 or self.moe_every > self.n_layer:
            raise ConfigError(f"moe_every={self.moe_every} must be between 1 and n_layer={self.n_layer} "
                              f"(every moe_every-th layer gets experts)")
        for fname in ("moe_capacity_factor", "moe_eval_capacity_factor"):
            if getattr(self, fname) is not None and getattr(self, fname) <= 0:
                raise ConfigError(f"{fname}={getattr(self, fname)} must be > 0, or None for no capacity limit")
        if self.share_layers in ("all", "ffn"):
            raise ConfigError(f"share_layers={self.share_layers!r} shares one feed-forward across layers; "
                              f"it cannot be combined with n_expert={self.n_expert} — use share_layers='attention' or 'none'")

    def _validate_xl(self):
        xl = self.position == "relative_xl"
        if xl != (self.attention_class == "RelativeXLAttention"):
            raise ConfigError(
                f"position={self.position!r} with attention_class={self.attention_class!r}: Transformer-XL's relative "
                f"positions and attention go together; leave attention_class unset (it follows from position) or "
                f"set both position='relative_xl' and attention_class='RelativeXLAttention'")
        switches = {"mem_len": 0, "reuse_len": 0, "clamp_len": 0, "same_length": False, "bi_data": False,
                    "relative_segments": False}
        if not xl:
            used = [f"{k}={getattr(self, k)!r}" for k, off in switches.items() if getattr(self, k) != off]
            if used:
                raise ConfigError(f"{', '.join(used)} only apply to position='relative_xl' (Transformer-XL / XLNet); "
                                  f"drop them or set position='relative_xl'")
            return
        bad = [name for name, on in [("parallel_residual", self.parallel_residual),
                                     (f"n_kv_head={self.n_kv_head} != n_head", self.n_kv_head != self.n_head),
                                     ("type_vocab_size (use relative_segments)", self.type_vocab_size > 0),
                                     ("embedding_size != n_embd", self.embedding_size != self.n_embd),
                                     ("head_transform", self.head_transform),
                                     ("is_encoder_decoder / cross_attention", self.is_encoder_decoder or self.cross_attention)]
               if on]
        if bad:
            raise ConfigError(f"position='relative_xl' (Transformer-XL / XLNet: layers whose memory holds what each "
                              f"attention read) does not support {', '.join(bad)}")
        negative = [f"{k}={getattr(self, k)}" for k in ("mem_len", "reuse_len", "clamp_len") if getattr(self, k) < 0]
        if negative:
            raise ConfigError(f"{', '.join(negative)} must be >= 0 (0 turns it off)")

    _DECODER_FIELDS = ("n_decoder_layer", "n_decoder_head", "decoder_intermediate_size")

    def _validate_stacks(self):
        """The decoder's own sizes: only for encoder-decoders, and each a stack the blocks can build."""
        if not self.is_encoder_decoder:
            given = [f for f in self._DECODER_FIELDS if getattr(self, f) is not None]
            if given:
                raise ConfigError(f"{given} only apply to encoder-decoders (is_encoder_decoder=True); drop them")
            return
        for fname in self._DECODER_FIELDS:
            if not isinstance(getattr(self, fname), int) or getattr(self, fname) <= 0:
                raise ConfigError(f"{fname} must be a positive integer, got {getattr(self, fname)!r}")
        if self.n_kv_head != self.n_head and self.n_decoder_head % self.n_kv_head:  # an explicit n_kv_head is shared
            raise ConfigError(f"n_decoder_head={self.n_decoder_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.n_decoder_head != self.n_head and self.head_dim * self.n_head == self.n_embd \
                and self.n_embd % self.n_decoder_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_decoder_head={self.n_decoder_head}; "
                              f"pick n_decoder_head among {_divisors(self.n_embd)}")

    # ---------------------------------------------------------------- derived
    def layer_is_moe(self, i: int) -> bool:
        """Does layer i hold experts (the first of every moe_every layers)?"""
        return self.n_expert > 0 and i % self.moe_every == 0

    def layer_attention(self, i: int) -> str:
        """Layer i's attention pattern: "global", "local" or "strided"."""
        return self.attention_pattern[i % len(self.attention_pattern)] if self.attention_pattern else "global"

    def encoder_config(self) -> "Config":
        """The encoder stack of an encoder-decoder: bidirectional, no LM head."""
        return self.replace(is_encoder_decoder=False, causal=False, lm_head=False,
                            **dict.fromkeys(self._DECODER_FIELDS))

    def decoder_config(self) -> "Config":
        """The decoder stack: causal, cross-attends to the encoder; its own depth, heads and FFN width
        (head_dim and n_kv_head follow the heads unless they were set explicitly)."""
        return self.replace(is_encoder_decoder=False, cross_attention=True, n_layer=self.n_decoder_layer,
                            n_head=self.n_decoder_head, intermediate_size=self.decoder_intermediate_size,
                            **dict.fromkeys(self._DECODER_FIELDS))

    @property
    def activation_is_glu(self) -> bool:
        return self.mlp_class == "GLU"

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path=None) -> str:
        return config_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = _renamed_fields(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        d = {k: v for k, v in d.items() if k != "rope_n_elem"}  # derived: always recomputed
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "Config":
        return cls.from_dict(read_config_file(path))

    def replace(self, **changes) -> "Config":
        """A copy with `changes`; fields that were derived (left as None) are derived again."""
        d = self.to_dict()
        for fname in _DERIVED:
            if fname not in changes and d[fname] == _derived_value(self, fname):
                d[fname] = None
        d.update(changes)
        return type(self).from_dict(d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        # REGISTRY is filled by allformers/zoo, which allformers/__init__.py imports before any
        # submodule runs: config stays below the zoo (no import back up, tests/test_imports.py).
        if name not in REGISTRY:
            raise UnknownModelError(name, REGISTRY)
        d = dict(REGISTRY[name])
        d.update(overrides)
        return cls.from_dict(d)


# Names -> dict of Config fields. The zoo modules fill it with `register(...)`.
REGISTRY: dict[str, dict[str, Any]] = {}
# Fields that __post_init__ fills when they are None.
_DERIVED = ("head_dim", "n_kv_head", "attention_class", "attn_out_bias", "final_norm", "intermediate_size", "embedding_size",
            "head_activation", "lm_head", "n_decoder_layer", "moe_mlp_class", "n_decoder_head",
            "decoder_intermediate_size")


def register(**kwargs) -> dict:
    name = kwargs["name"]
    if name in REGISTRY:
        raise ConfigError(f"model name {name!r} is registered twice")
    Config(**kwargs)  # validate at import time: a broken zoo entry fails loudly
    REGISTRY[name] = kwargs
    return kwargs


_NOT_DERIVABLE = object()  # equals no field value


def _derived_value(cfg: Config, fname: str):
    """What __post_init__ would give `fname` for this config if it were left as None."""
    d = cfg.to_dict()
    d[fname] = None
    d.pop("rope_n_elem")
    try:
        return getattr(Config(**d), fname)
    except ConfigError:  # it cannot be derived (e.g. head_dim when n_embd % n_head != 0): it was explicit
        return _NOT_DERIVABLE


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


class SavedConfig:
    """Mixin for the config dataclasses of models that are not one `Config` (the image models, the
    composites): JSON with their class name as "config_class", so `allformers.load` finds the loader
    (checkpoints/composite.py). The one way nested configs are written and read: a field annotated
    with Config or a SavedConfig class (Optional or not) is written as its own dict and read back
    through that class's from_dict. Other lists come back as tuples; unknown fields are refused."""

    def to_dict(self) -> dict:
        d = {"config_class": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (Config, SavedConfig)):
                value = {k: v for k, v in value.to_dict().items() if k != "config_class"}
            d[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
        return d

    def to_json(self, path=None) -> str:
        return config_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        kind = d.pop("config_class", cls.__name__)
        if kind != cls.__name__:
            raise ConfigError(f"config_class={kind!r} is not a {cls.__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
        nested = nested_config_fields(cls)
        return cls(**{k: nested[k].from_dict(v) if k in nested and isinstance(v, dict)
                      else tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_config_file(path))


def nested_config_fields(cls) -> dict:
    """Field name -> the config class it holds (Config or a SavedConfig), read from the annotations."""
    hints = typing.get_type_hints(cls)  # resolves the string annotations in the class's module
    out = {}
    for f in fields(cls):
        for t in (hints.get(f.name), *typing.get_args(hints.get(f.name))):
            if isinstance(t, type) and issubclass(t, (Config, SavedConfig)):
                out[f.name] = t
    return out
