"""Encoder-decoders: the original Transformer (2017), T5 v1.0 / v1.1, mT5, Flan-T5 and BART.
Each entry is a Config of the same blocks with is_encoder_decoder=True (models/seq2seq.py builds
the bidirectional encoder and the cross-attending decoder from it); the comments say what sets
it apart. The T5 and BART entries are derived from the Hugging Face config values through the
same functions that import those checkpoints (checkpoints/hf_seq2seq.py), so a zoo entry and an
imported model of the same name cannot disagree.

Also here: a Flan-style instruction-mixture renderer (`render_instruction`, `flan_mixture`) that
turns records into "instruction: ... input: ..." -> target pairs for a few tasks."""
from __future__ import annotations

import hashlib
from typing import Optional

from ..checkpoints.hf_seq2seq import bart_config, mt5_config, t5_config
from ..config import register

_seq2seq = dict(family="encoder-decoder")

# --- The Transformer (Vaswani et al. 2017, "base"): 6 + 6 post-LN layers, 512 wide, 8 heads, ReLU FFN of 2,048,
#     fixed sinusoidal positions, embeddings scaled by sqrt(d_model), one 37,000-token BPE shared by source and
#     target, with the embedding tied to the pre-softmax projection (section 3.4). 65M in the paper.
register(name="transformer-base", description="Transformer base (2017) 63M: 6+6 post-LN layers, 512 wide, ReLU, "
         "sinusoidal positions, embeddings x sqrt(512), shared 37K vocabulary tied to the output",
         is_encoder_decoder=True, vocab_size=37000, block_size=1024, n_layer=6, n_decoder_layer=6, n_head=8,
         n_embd=512, intermediate_size=2048, position="sinusoidal", norm_placement="post", norm_eps=1e-6,
         activation="relu", embed_scale=512 ** 0.5, tie_embeddings=True, **_seq2seq)


def _t5(d_model, d_ff, heads, layers, *, vocab=32128, gated=False, tied=True, mt5=False):
    h = dict(vocab_size=vocab, d_model=d_model, d_kv=64, num_heads=heads, d_ff=d_ff, num_layers=layers,
             feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=tied,
             relative_attention_num_buckets=32, relative_attention_max_distance=128, n_positions=512)
    return {**(mt5_config if mt5 else t5_config)(h), **_seq2seq}


# --- T5 v1.0 (Raffel et al. 2020): pre-norm RMSNorm without bias, no biases anywhere, unscaled attention, one
#     relative position bias (32 log buckets up to distance 128) per stack, ReLU FFN, the 32,128 vocabulary's
#     embedding tied to the output with hidden states scaled by d_model**-0.5 before it.
for name, (d, ff, h, layers), size in [("t5-small", (512, 2048, 8, 6), "60M"), ("t5-base", (768, 3072, 12, 12), "220M"),
                                       ("t5-large", (1024, 4096, 16, 24), "770M")]:
    register(name=name, description=f"T5 v1.0 {name[3:]} {size}: pre-RMSNorm, relative bias (32 buckets / 128), ReLU, "
             f"tied embeddings scaled by d_model**-0.5", **_t5(d, ff, h, layers))

# --- T5 v1.1 (2020): gated-GELU FFN, untied output layer, no output scaling, thinner heads (6 in small).
for name, (d, ff, h, layers), size in [("t5-v1_1-small", (512, 1024, 6, 8), "77M"),
                                       ("t5-v1_1-base", (768, 2048, 12, 12), "248M")]:
    register(name=name, description=f"T5 v1.1 {name[8:]} {size}: gated-GELU FFN, untied output layer without "
             f"scaling, relative bias", **_t5(d, ff, h, layers, gated=True, tied=False))

# --- mT5 (Xue et al. 2021): T5 v1.1 layers over a 250,112-token multilingual SentencePiece vocabulary (most of
#     the parameters are the two embedding tables).
for name, (d, ff, h, layers), size in [("mt5-small", (512, 1024, 6, 8), "300M"), ("mt5-base", (768, 2048, 12, 12), "580M")]:
    register(name=name, description=f"mT5 {name[4:]} {size}: T5 v1.1 layers, 250,112-token multilingual vocabulary "
             f"(untied input and output tables)", **_t5(d, ff, h, layers, vocab=250112, gated=True, tied=False, mt5=True))

# --- Flan-T5 (Chung et al. 2022): the T5 v1.1 LM-adapted checkpoints fine-tuned on the Flan instruction mixture;
#     the architecture and shapes are exactly T5 v1.1's, only the weights differ.
for name, (d, ff, h, layers), size in [("flan-t5-small", (512, 1024, 6, 8), "77M"),
                                       ("flan-t5-base", (768, 2048, 12, 12), "248M")]:
    register(name=name, description=f"Flan-T5 {name[8:]} {size}: instruction-tuned weights of the same shape as "
             f"T5 v1.1 {name[8:]} (gated-GELU, untied, relative bias)", **_t5(d, ff, h, layers, gated=True, tied=False))


# --- BART (Lewis et al. 2019): a BERT-like post-LN encoder and GPT-like decoder (GELU, biases, LayerNorm after
#     the embeddings, learned positions offset by 2 up to 1,024), GPT-2's byte BPE of 50,265, tied embeddings
#     plus a final logits bias. Pretrained as a denoiser (text infilling + sentence permutation).
def _bart(d_model, heads, ffn, layers):
    h = dict(vocab_size=50265, d_model=d_model, encoder_attention_heads=heads, decoder_attention_heads=heads,
             encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_layers=layers, decoder_layers=layers,
             max_position_embeddings=1024, activation_function="gelu", scale_embedding=False,
             decoder_start_token_id=2)
    return {**bart_config(h), **_seq2seq}


for name, (d, h, ff, layers), size in [("bart-base", (768, 12, 3072, 6), "140M"),
                                       ("bart-large", (1024, 16, 4096, 12), "406M")]:
    register(name=name, description=f"BART {name[5:]} {size}: {layers}+{layers} post-LN layers, GELU, learned positions "
             f"offset by 2, embedding LayerNorm, tied byte-BPE vocabulary with a logits bias", **_bart(d, h, ff, layers))


# ---------------------------------------------------------------------- Flan-style instruction mixture
# Several phrasings per task, as Flan does (it rendered each task with ~10 templates, some with the options
# spelled out); a record gets one, chosen by its id so the rendering is stable.
TEMPLATES = {
    "subject": ["Write a subject line for this e-mail.", "What is a good subject for the following message?",
                "Summarise this e-mail in one short subject line."],
    "classify": ["Is this e-mail spam or ham? OPTIONS: spam, ham", "Classify the message as spam or ham.",
                 "Would a spam filter flag this e-mail? Answer spam or ham."],
    "continue": ["Continue the text.", "Write the next sentences of this passage.",
                 "How might this speech go on?"],
}


def _pick(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % n


def render_instruction(task: str, record: dict, template: Optional[int] = None, max_chars: int = 1000) -> tuple[str, str]:
    """One record -> (source, target) text. Tasks: "subject" (e-mail body -> its subject line),
    "classify" (e-mail -> spam / ham), "continue" (record["text"] split in two -> second half)."""
    if task not in TEMPLATES:
        raise KeyError(f"unknown instruction task {task!r}; known: {sorted(TEMPLATES)}")
    text = " ".join(str(record.get("text", "")).split())
    key = f"{task}:{record.get('id', text[:200])}"
    instruction = TEMPLATES[task][template if template is not None else _pick(key, len(TEMPLATES[task]))]
    if task == "subject":
        body, target = text[:max_chars], " ".join(str(record.get("subject", "")).split())
    elif task == "classify":
        subject = " ".join(str(record.get("subject", "")).split())
        body, target = (f"{subject} -- {text}" if subject else text)[:max_chars], str(record["label"])
    else:
        words = text[:2 * max_chars].split()
        cut = max(1, len(words) // 2)
        body, target = " ".join(words[:cut]), " ".join(words[cut:])
    return f"instruction: {instruction} input: {body}", target


def flan_mixture(tasks: dict, seed: int = 0) -> list[tuple[str, str, str]]:
    """{task: records} -> a shuffled mixture of (task, source, target), each task's examples
    rendered with its templates (examples-proportional mixing: every record once)."""
    import random

    rows = [(task, *render_instruction(task, r)) for task, records in tasks.items() for r in records]
    random.Random(seed).shuffle(rows)
    return rows
