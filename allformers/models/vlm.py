"""Image tokens in a language model's input sequence: the mechanism BLIP-2's soft prompts, PaLM-E and
LLaVA (the GPT-4-style image + text decoder) share.

The text carries one placeholder id (`image_token_id`) per image vector, where the image goes (Hugging Face's
processors expand each <image> into that many placeholders); the word embeddings of those positions are
replaced by the image vectors, row-major, and the language model runs on the result. Generation prefills the
KV cache with those embeddings and continues with ordinary token ids.

    ids = with_image_tokens(prompt_ids, n_image_tokens, image_token_id)   # placeholders in front of the prompt
    embeds = scatter_image_tokens(lm.wte(ids), ids, image_token_id, image_vectors)
    new = generate_from_embeds(lm, embeds, attention_mask, max_new_tokens=20, prompt_ids=ids)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, SavedConfig
from ..errors import AllformersError, ConfigError, ContextLengthError
from .lm import TransformerLM
from .vit import ViT, ViTConfig


class ImageTokenError(AllformersError, ValueError):
    """The image placeholders in the text do not match the image vectors."""


class FrozenParts(nn.Module):
    """A model some of whose parts are frozen (a pretrained image encoder, a pretrained LM): `freeze_parts(names)`
    turns their gradients off, so no optimizer step or weight decay reaches them and they stay bit-identical, and
    keeps them in eval mode (no dropout) whatever train() is called with. The others train."""

    frozen: tuple = ()

    def freeze_parts(self, names: Sequence[str]):
        for p in self.parameters():
            p.requires_grad_(True)
        for n in names:
            getattr(self, n).requires_grad_(False)
        self.frozen = tuple(names)
        return self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for n in self.frozen:
            getattr(self, n).eval()
        return self


def with_image_tokens(ids: Sequence[int], n: int, image_token_id: int, *, at: int = 0) -> list:
    """Token ids with n image placeholders inserted at position `at` (0: before the text, as BLIP-2 does)."""
    ids = list(ids)
    return ids[:at] + [image_token_id] * n + ids[at:]


def expand_image_tokens(ids: Sequence[int], n: int, image_token_id: int) -> list:
    """Each single image placeholder -> n of them (what a processor does with "<image>" before the model sees it)."""
    out = []
    for i in ids:
        out.extend([image_token_id] * n if i == image_token_id else [i])
    return out


def scatter_image_tokens(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                         features: torch.Tensor) -> torch.Tensor:
    """embeds (B, T, E) of input_ids (B, T): the positions holding image_token_id take the rows of features
    ((B, N, E) or (M, E), row-major, as transformers' masked_scatter) -> (B, T, E)."""
    where = input_ids == image_token_id  # (B, T)
    n, rows = int(where.sum()), features.reshape(-1, features.shape[-1])
    if n != rows.shape[0]:
        raise ImageTokenError(f"the text holds {n} image placeholder(s) (id {image_token_id}) but the images give "
                              f"{rows.shape[0]} vectors; put {rows.shape[0] // max(len(input_ids), 1)} placeholders "
                              f"per image in each row (allformers.models.vlm.with_image_tokens)")
    if rows.shape[-1] != embeds.shape[-1]:
        raise ImageTokenError(f"image vectors of width {rows.shape[-1]}; the language model embeds {embeds.shape[-1]}")
    return embeds.masked_scatter(where[..., None], rows.to(embeds.dtype))


def left_padded(attention_mask: Optional[torch.Tensor], *tensors: torch.Tensor):
    """Right (or mixed) padding -> left padding: each row's real positions moved to its end, in order.
    -> (mask or None, *tensors), the mask unchanged when it was None or already left-padded."""
    if attention_mask is None or bool((attention_mask.long().diff(dim=1) >= 0).all()):
        return (attention_mask, *tensors)
    m = attention_mask.bool()
    order = torch.sort(m.long(), dim=1, stable=True).indices  # padding first, then the real positions in order
    out = [t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand_as(t)) for t in tensors]
    return (m.gather(1, order).long(), *out)


@torch.inference_mode()
def generate_from_embeds(lm, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                         max_new_tokens: int = 64, temperature: float = 0.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, repetition_penalty: float = 1.0, eos_id=None,
                         pad_id: Optional[int] = None, prompt_ids: Optional[torch.Tensor] = None, generator=None,
                         on_token=None, lm_kwargs: Optional[dict] = None, step_kwargs: Optional[dict] = None,
                         stop=None, tokenizer=None) -> torch.Tensor:
    """A decoder-only TransformerLM continues inputs_embeds (B, T, E), left-padded by attention_mask (B, T) ->
    the new tokens (B, n), n <= max_new_tokens (rows that finished are filled with pad_id). prompt_ids (B, T):
    the ids the embeddings stand for (the repetition penalty sees them, as transformers' does). lm_kwargs /
    step_kwargs: extra arguments of the prefill / of each cached step (Flamingo's image context)."""
    from ..generation.checks import check_generation
    from ..generation.generate import decode_loop, eos_tensor

    stop = check_generation(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=stop)
    B, T = inputs_embeds.shape[:2]
    if T + max_new_tokens > lm.config.block_size:
        raise ContextLengthError(f"{T} prompt positions (image tokens included) and max_new_tokens={max_new_tokens} "
                                 f"exceed the language model's {lm.config.block_size}")
    eos = eos_tensor(eos_id)
    cache = lm.new_cache(B, T + max_new_tokens)
    mask = attention_mask.long() if attention_mask is not None else None
    logits = lm(None, attention_mask=mask, cache=cache, last_only=True, inputs_embeds=inputs_embeds,
                **(lm_kwargs or {}))[:, -1]
    step = lambda nxt: lm(nxt[:, None], cache=cache, last_only=True, **(step_kwargs or {}))[:, -1]  # noqa: E731
    seen = prompt_ids if prompt_ids is not None else torch.empty(B, 0, dtype=torch.long, device=inputs_embeds.device)
    out = decode_loop(step, logits, seen.to(inputs_embeds.device), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                      eos=eos, pad_id=pad_id if pad_id is not None else (int(eos[0]) if len(eos) else 0), stop=stop,
                      tokenizer=tokenizer, on_token=on_token, generator=generator)
    return out[:, seen.shape[1]:]


# ---------------------------------------------------------------------- the general image + text decoder
PROJECTORS = ("linear", "mlp")
FEATURE_SELECT = ("default", "full")
IMAGE_PLACEHOLDER = "<image>"  # where a chat message's picture goes before tokenization
# LLaVA-1.5's conversation format, for tokenizers that carry no chat template of their own
LLAVA_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
                       "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclass
class VLMConfig(SavedConfig):
    text: Config  # the decoder-only LM
    vision: ViTConfig
    name: str = ""
    description: str = ""
    image_token_id: int = 0  # the placeholder id in the LM's vocabulary (one per image vector in the text)
    projector: str = "mlp"  # "linear": one affine map (PaLM-E) | "mlp": Linear, activation, Linear (LLaVA-1.5)
    projector_activation: str = "gelu"
    projector_bias: bool = True
    # which ViT output the LM reads: None = the ViT's output (after its final norm); an int (or list, concatenated)
    # = Hugging Face's hidden_states index: 0 the embeddings, i block i, -1 the last block, -2 the one before (LLaVA)
    vision_feature_layer: Optional[Any] = -2
    # "default": drop the first token (the class token; also a tower without one loses its first patch, as in
    # transformers) | "full": keep every token
    vision_feature_select: str = "default"

    def __post_init__(self):
        from ..blocks.feedforward import ACTIVATIONS

        if self.projector not in PROJECTORS:
            raise ConfigError(f"projector={self.projector!r} is not one of {list(PROJECTORS)}")
        if self.vision_feature_select not in FEATURE_SELECT:
            raise ConfigError(f"vision_feature_select={self.vision_feature_select!r} is not one of {list(FEATURE_SELECT)}")
        if self.projector_activation not in ACTIVATIONS:
            raise ConfigError(f"projector_activation={self.projector_activation!r} is not one of {list(ACTIVATIONS)}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ConfigError(f"image_token_id={self.image_token_id} is outside the LM's vocabulary of {self.text.vocab_size}")
        if self.text.is_encoder_decoder or not self.text.causal or not self.text.lm_head:
            raise ConfigError("the language model of a VLMConfig is a decoder-only LM with its head (task='lm')")
        if isinstance(self.vision_feature_layer, tuple):
            self.vision_feature_layer = list(self.vision_feature_layer)

    @property
    def feature_layers(self) -> list:
        v = self.vision_feature_layer
        return [None] if v is None else list(v) if isinstance(v, list) else [v]

    @property
    def image_seq_length(self) -> int:
        """Vectors (placeholders) per image."""
        return self.vision.grid ** 2 + int(self.vision.class_token) - int(self.vision_feature_select == "default")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "VLMConfig":
        from ..errors import UnknownModelError

        if name not in VLM_CONFIGS:
            raise UnknownModelError(name, VLM_CONFIGS)
        return dataclasses.replace(VLM_CONFIGS[name](), name=name, **overrides)


class Projector(nn.Module):
    """Image vectors (.., P) -> the LM's embedding width (.., E): linear_1 [-> activation -> linear_2]."""

    def __init__(self, c: VLMConfig):
        super().__init__()
        from ..blocks.feedforward import ACTIVATIONS

        P, E = c.vision.width * len(c.feature_layers), c.text.embedding_size
        self.linear_1 = nn.Linear(P, E, bias=c.projector_bias)
        self.act = ACTIVATIONS[c.projector_activation] if c.projector == "mlp" else None
        self.linear_2 = nn.Linear(E, E, bias=c.projector_bias) if c.projector == "mlp" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        return x if self.linear_2 is None else self.linear_2(self.act(x))


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: Optional[torch.Tensor] = None
    image_features: Optional[torch.Tensor] = None  # (images, N, E) the projected image vectors


class VisionLanguageLM(FrozenParts):
    """PaLM-E (Driess et al. 2023) / LLaVA (Liu et al. 2023), the GPT-4-style image + text decoder: ViT tokens,
    projected to the LM's embedding width, stand in the text where its image placeholders are.

        pixels (images, 3, H, W) -> ViT [hidden state vision_feature_layer, class token dropped] -> projector
        text ids with image_seq_length placeholders per image -> word embeddings, placeholders replaced -> the LM

    Hugging Face's LlavaForConditionalGeneration loads both ways (checkpoints/hf_llava.py). freeze(vision=True,
    lm=...) : LLaVA's stage 1 trains the projector alone, stage 2 the projector and the LM; PaLM-E's frozen-LM
    variant keeps the LM frozen and trains the ViT with the projector."""

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = c = config
        self.vision = ViT(c.vision)
        self.projector = Projector(c)
        self.lm = TransformerLM(c.text)

    @property
    def device(self):
        return self.lm.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def freeze(self, vision: bool = True, lm: bool = True) -> "VisionLanguageLM":
        return self.freeze_parts([n for n, on in (("vision", vision), ("lm", lm)) if on])

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) normalised pixels -> (images, image_seq_length, E) vectors for the LM."""
        c = self.config
        feats = []
        for layer in c.feature_layers:
            h = self.vision(pixel_values).last_hidden_state if layer is None else self.vision.hidden_state(pixel_values, layer)
            if c.vision_feature_select == "default":
                h = h[:, 1:]
            feats.append(h)
        return self.projector(torch.cat(feats, dim=-1))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> tuple:
        """-> (inputs_embeds (B, T, E) with the image vectors in the placeholders, image features or None)."""
        embeds = self.lm.wte(input_ids)
        if pixel_values is None:
            if bool((input_ids == self.config.image_token_id).any()):
                raise ImageTokenError("the text holds image placeholders but no pixel_values were given")
            return embeds, None
        feats = self.image_features(pixel_values.to(self.device))
        return scatter_image_tokens(embeds, input_ids, self.config.image_token_id, feats), feats

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> VLMOutput:
        """input_ids (B, T) with image_seq_length placeholders per image, pixel_values (images, 3, H, W) in the order
        the images appear (row by row); labels (B, T) aligned with input_ids (-100 unscored; next-token shift inside)."""
        embeds, feats = self.embed(input_ids, pixel_values)
        logits = self.lm(None, attention_mask=attention_mask, inputs_embeds=embeds)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return VLMOutput(logits, loss, feats)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *, max_new_tokens: int = 30, **kwargs) -> torch.Tensor:
        """Prompt ids (B, T) with the placeholders (padded either side) + their images -> the new tokens (B, n),
        decoded with the LM's KV cache."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device) if attention_mask is not None else None
        embeds, _ = self.embed(input_ids, pixel_values)
        attention_mask, embeds, input_ids = left_padded(attention_mask, embeds, input_ids)
        return generate_from_embeds(self.lm, embeds, attention_mask, max_new_tokens=max_new_tokens, prompt_ids=input_ids,
                                    **kwargs)

    # ------------------------------------------------------------------ chat with images
    def chat_ids(self, tokenizer, messages: list, add_generation_prompt: bool = True) -> list:
        """A conversation whose user messages may hold pictures -> prompt ids with image_seq_length placeholders
        per picture. A message's content is text (with "<image>" where a picture goes) or Hugging Face's list of
        parts, {"type": "image"} and {"type": "text", "text": ...}; the tokenizer's chat template renders it
        (LLaVA-1.5's "USER: ... ASSISTANT:" when it has none)."""
        flat = [{**m, "content": _flatten(m["content"])} for m in messages]
        prompt = tokenizer.apply_chat_template(flat, add_generation_prompt,
                                               template=tokenizer.chat_template or LLAVA_CHAT_TEMPLATE)
        ids = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        for i, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += [self.config.image_token_id] * self.config.image_seq_length
            if piece.strip():
                ids += tokenizer.encode(piece, add_bos=False)
        return ids

    def chat(self, tokenizer, messages: list, images: Optional[torch.Tensor] = None, **kwargs) -> str:
        """One assistant reply to a conversation with pictures; images (n, 3, H, W) normalised, one per "<image>"."""
        ids = torch.tensor([self.chat_ids(tokenizer, messages)])
        kwargs.setdefault("eos_id", tokenizer.eos_id)
        out = self.generate(ids, images, **kwargs)
        return tokenizer.decode(out[0].tolist()).strip()

    @classmethod
    def from_name(cls, name: str, **overrides) -> "VisionLanguageLM":
        return cls(VLMConfig.from_name(name, **overrides))

    def save(self, path, format: str = "allformers", tokenizer=None):
        """An allformers folder, or format="hf": LlavaForConditionalGeneration."""
        if format == "hf":
            from ..checkpoints.hf_llava import save_hf_llava

            return save_hf_llava(self, path, tokenizer=tokenizer)
        from ..checkpoints import save

        return save(self, path, format=format, tokenizer=tokenizer)


def _flatten(content) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "image":
            parts.append(IMAGE_PLACEHOLDER + "\n")
        elif kind == "text":
            parts.append(part["text"])
        else:
            raise ImageTokenError(f"a message part of type {kind!r}; use 'image' or 'text'")
    return "".join(parts)


VLM_CONFIGS = {  # name -> a function making the config (the shapes of the released checkpoints)
    "llava-1.5-7b": lambda: VLMConfig(
        Config.from_name("llama-7b", vocab_size=32064, block_size=4096, norm_eps=1e-5),
        ViTConfig.from_name("clip-vit-base-patch32", image_size=336, patch_size=14, width=1024, depth=24, heads=16,
                            intermediate_size=4096),
        image_token_id=32000, description="LLaVA-1.5 7B: CLIP ViT-L/14-336 (penultimate layer, 576 tokens), 2-layer "
                                          "GELU projector, Vicuna-7B (LLaMA)"),
    "llava-1.5-13b": lambda: VLMConfig(
        Config.from_name("llama-13b", vocab_size=32064, block_size=4096, norm_eps=1e-5),
        ViTConfig.from_name("clip-vit-base-patch32", image_size=336, patch_size=14, width=1024, depth=24, heads=16,
                            intermediate_size=4096),
        image_token_id=32000, description="LLaVA-1.5 13B: CLIP ViT-L/14-336, 2-layer GELU projector, Vicuna-13B"),
}
