"""GGUF import. Fast: a tiny random LLaMA (GQA) written here with gguf.GGUFWriter, the way
llama.cpp's converter writes one (quantized tensors, permuted q/k). Slow: the real SmolLM2-135M
(Q4_1) against `transformers`' own GGUF loader."""
import json
import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

import allformers
from allformers.checkpoints.hf import FAMILIES, hf_to_ours
from allformers.errors import CheckpointError
from allformers.tokenization import Tokenizer
from allformers.tokenization.gguf import tokenizer_from_gguf

CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "In 2024, 3.14159 and 1,000,000 were numbers.",
          "naïve café — 東京 ünïcödé text\n\nwith  double  spaces\tand tabs", "def f(x):\n    return x ** 2  # square"]
TEXTS = ["Hello, world!", "x = 12345; y = 3.14", "naïve café 東京 🤖", "line1\nline2\n\n  indented\r\n",
         "I'm they're we'll", "<|im_start|>user\nhi<|im_end|>\n", "   ", "unknownwordzzq"]
CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 10 * 10?"}]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
N_EMBD, N_HEAD, N_KV, FF, N_LAYER = 64, 4, 2, 96, 2  # 64 and 96: multiples of the 32-wide quant blocks


def llama_cpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab():
    """A small trained byte-level BPE: (tokens by id, merges, token types)."""
    tok = Tokenizer.train_bpe(CORPUS, vocab_size=330, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    vocab = tok.backend.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.backend.to_str())["model"]["merges"]]
    return tokens, merges, [3 if t.startswith("<|") else 1 for t in tokens]


def write_llama_gguf(path, tied=True, pre="gpt2", seed=0, linears=None):
    """Returns the HF-layout weights as a loader should see them (quantized then dequantized).
    linears: one storage type for every block Linear (e.g. Q4_1, as most of SmolLM2's file is)."""
    tokens, merges, types = byte_level_vocab()
    g = torch.Generator().manual_seed(seed)
    hf = {"model.embed_tokens.weight": torch.randn(len(tokens), N_EMBD, generator=g) * 0.5,
          "model.norm.weight": 1 + 0.1 * torch.randn(N_EMBD, generator=g)}
    if not tied:
        hf["lm_head.weight"] = torch.randn(len(tokens), N_EMBD, generator=g) * 0.5
    d = N_EMBD // N_HEAD
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (N_HEAD * d, N_EMBD)), ("self_attn.k_proj", (N_KV * d, N_EMBD)),
                            ("self_attn.v_proj", (N_KV * d, N_EMBD)), ("self_attn.o_proj", (N_EMBD, N_HEAD * d)),
                            ("mlp.gate_proj", (FF, N_EMBD)), ("mlp.up_proj", (FF, N_EMBD)), ("mlp.down_proj", (N_EMBD, FF))]:
            hf[p + name + ".weight"] = torch.randn(*shape, generator=g) * 0.2
        for name in ("input_layernorm", "post_attention_layernorm"):
            hf[p + name + ".weight"] = 1 + 0.1 * torch.randn(N_EMBD, generator=g)

    # GGUF name, HF name, storage type: one of each kind the real files use.
    layout = [("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0), ("output_norm.weight", "model.norm.weight", Q.F32)]
    if not tied:
        layout.append(("output.weight", "lm_head.weight", Q.F16))
    for i in range(N_LAYER):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        layout += [(b + "attn_q.weight", p + "self_attn.q_proj.weight", Q.Q4_1),
                   (b + "attn_k.weight", p + "self_attn.k_proj.weight", Q.Q4_1),
                   (b + "attn_v.weight", p + "self_attn.v_proj.weight", Q.Q8_0),
                   (b + "attn_output.weight", p + "self_attn.o_proj.weight", Q.F32),
                   (b + "ffn_gate.weight", p + "mlp.gate_proj.weight", Q.Q4_1),
                   (b + "ffn_up.weight", p + "mlp.up_proj.weight", Q.Q4_0),
                   (b + "ffn_down.weight", p + "mlp.down_proj.weight", Q.Q8_0),
                   (b + "attn_norm.weight", p + "input_layernorm.weight", Q.F32),
                   (b + "ffn_norm.weight", p + "post_attention_layernorm.weight", Q.F32)]
    if linears is not None:
        layout = [(g, h, linears if g.startswith("blk.") and "norm" not in g else q) for g, h, q in layout]

    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(N_LAYER), w.add_context_length(128), w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(FF), w.add_head_count(N_HEAD), w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(d)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre(pre), w.add_token_list(tokens), w.add_token_types(types)
    w.add_token_merges(merges), w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>")), w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False), w.add_chat_template(TEMPLATE)
    expected = {}
    for gname, hname, qtype in layout:
        t = hf[hname].numpy()
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            t = llama_cpp_permute(t, N_HEAD if "attn_q" in gname else N_KV)
        if qtype == Q.F32:
            w.add_tensor(gname, t)
        elif qtype == Q.F16:
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(t, qtype), raw_shape=quantize(t, qtype).shape, raw_dtype=qtype)
        # Quantization works on blocks along a row, so it commutes with the row permutation:
        # the loader must give back exactly the dequantized HF-layout weight.
        h = hf[hname].numpy()
        expected[hname] = torch.from_numpy(h if qtype == Q.F32 else
                                           h.astype(np.float16).astype(np.float32) if qtype == Q.F16 else
                                           dequantize(quantize(h, qtype), qtype).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return expected


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_llama_gguf(path, tied=request.param), request.param


def test_weights_are_the_dequantized_originals_in_hf_layout(tiny):
    path, expected, tied = tiny
    model, report = allformers.load(path, return_report=True)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.intermediate_size) == (N_LAYER, N_HEAD, N_KV, N_EMBD, FF)
    assert c.tie_embeddings == tied and c.vocab_size == expected["model.embed_tokens.weight"].shape[0]
    ours, _ = hf_to_ours(expected, c, FAMILIES["llama"])
    state = model.state_dict()
    assert sorted(report.loaded) == sorted(ours)
    for k, v in ours.items():
        assert torch.equal(state[k], v), k


def test_logits_match_transformers_llama(tiny):
    import transformers as T

    path, expected, tied = tiny
    model = allformers.load(path)
    cfg = T.LlamaConfig(num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD, num_key_value_heads=N_KV,
                        hidden_size=N_EMBD, intermediate_size=FF, vocab_size=model.config.vocab_size,
                        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    ref = T.LlamaForCausalLM(cfg).eval()
    missing, unexpected = ref.load_state_dict(expected, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.tensor([model.tokenizer.encode(t) for t in ["The quick brown fox jumps over"] * 2])
    ids[1, :3] = torch.tensor([5, 7, 11])  # a second, different row
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_tokenizer_metadata(tiny):
    path, _, _ = tiny
    tok = allformers.load(path).tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.add_bos) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>", False)
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id  # control tokens match whole
    assert tok.decode(ids) == "user\nhi"  # ... and are dropped when decoding
    assert tok.apply_chat_template(CHAT[:1]) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_byte_level_tokenizer_matches_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    write_llama_gguf(tmp_path / "t.gguf", pre=pre)
    ours = tokenizer_from_gguf(GGUFReader(tmp_path / "t.gguf"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in TEXTS + CORPUS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def write_sentencepiece_gguf(path):
    """A LLaMA-1/2 style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces ranked by score; no merges."""
    backend = HFTokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, show_progress=False))
    rank = backend.get_vocab()  # piece -> merge rank
    learned = sorted(rank, key=rank.get, reverse=True)  # stored worst-first: only the scores rank them
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama"), w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(rank[t]) for t in learned])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(learned))
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = tokenizer_from_gguf(GGUFReader(tmp_path / "spm.gguf"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.add_bos and ours.bos_token == "<s>"
    for text in TEXTS + CORPUS + ["quick</s>brown fox<s> jumps"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text  # both add <s>
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_bad_files_raise_checkpoint_error(tmp_path, tiny):
    good = tiny[0].read_bytes()
    cases = {"truncated.gguf": good[: len(good) * 2 // 3], "header_only.gguf": good[:200],
             "random.gguf": np.random.default_rng(0).bytes(4096), "empty.gguf": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable GGUF"):
            allformers.load(tmp_path / name)


def test_unsupported_architecture_is_named(tmp_path):
    w = GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_block_count(1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"'falcon'.*supported: \['llama'\]"):
        allformers.load(tmp_path / "falcon.gguf")


# ---------------------------------------------------------------------- the real model (slow)
@pytest.fixture(scope="module")
def smollm2():
    from allformers.zoo.assets import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except allformers.AllformersError as e:
        pytest.skip(str(e))
    return path, allformers.load(path)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    path = smollm2[0]
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, hf_tokenizer):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    from transformers import AutoModelForCausalLM

    path, model = smollm2
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Name three primes below 20."}])
    ids = torch.tensor([model.tokenizer.encode(prompt)])  # (1, T)
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits  # (1, T, vocab)
    assert (ours - theirs).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    tok = smollm2[1].tokenizer
    texts = TEXTS + CORPUS + [hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]
    # transformers 5.x does not know llama.cpp's "smollm" pre-tokenizer (every digit split off before
    # GPT-2's regex, as SmolLM2's own tokenizer.json does) and uses GPT-2's regex alone. The two differ
    # only where whitespace runs into a digit ("a  1"); compare those against the rule itself.
    plain = [t for t in texts if not re.search(r"\s\s\d", t)]
    assert len(plain) >= len(TEXTS)
    for text in plain:
        assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=True), text
    rule = HFTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture is shared
    rule.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in texts + ["a  1 b   22\t3", "  9", "\t\t42"]:
        assert tok.encode(text) == rule.encode(text).ids, text
    assert (tok.bos_id, tok.eos_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)


@pytest.mark.slow
def test_smollm2_chat_template_matches_transformers(smollm2, hf_tokenizer):
    tok = smollm2[1].tokenizer
    for messages in (CHAT, CHAT[:1], [{"role": "system", "content": "Be brief."}] + CHAT[:1]):
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
                hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_load_runs_q4_1_linears_on_int4_and_the_rest_on_int8(tmp_path, tied):
    from allformers.models.int4 import Int4Linear
    from allformers.models.int8 import Int8Linear

    path = tmp_path / "q4.gguf"
    write_llama_gguf(path, tied=tied, linears=Q.Q4_1)  # every block Linear Q4_1, the embedding Q8_0
    fp32 = allformers.load(path)
    q = allformers.load(path, quantized=True)
    assert q.quantization == "int4" and q.tokenizer is not None
    assert all(isinstance(b.attn.qkv, Int4Linear) and isinstance(b.mlp.fc, Int4Linear) and
               isinstance(b.attn.proj, Int4Linear) and isinstance(b.mlp.proj, Int4Linear) for b in q.blocks)
    # the head: a Q8_0 table (tied) or an F16 one, neither on a 4-bit grid: weight-only int8
    assert isinstance(q.lm_head, Int8Linear) and q.int4_layout["int8"] == ["lm_head"]
    ids = torch.tensor([q.tokenizer.encode("The quick brown fox jumps over")])
    with torch.no_grad():
        a, b = q(ids), fp32(ids)
    assert ((a - b).norm() / b.norm()).item() < 0.02  # bf16 rounding of the inputs and the scales, and int8's head
    assert torch.equal(q.generate(ids, max_new_tokens=5)[:, :ids.shape[1]], ids)
    with pytest.raises(CheckpointError, match="int4 model.*does not save"):
        q.save(tmp_path / "out")


def test_quantized_load_of_a_file_without_q4_1_is_int8_and_other_sources_are_refused(tiny, tmp_path):
    path, _, _ = tiny  # its fused Linears mix Q4_1, Q4_0, Q8_0 and F32 rows: none lies on one 4-bit grid
    q = allformers.load(path, quantized=True)
    assert q.int4_layout["int4"] == [] and len(q.int4_layout["int8"]) == 4 * N_LAYER + 1
    allformers.load(path).save(tmp_path / "folder")
    with pytest.raises(CheckpointError, match="not a .gguf file.*quantize_int8"):
        allformers.load(tmp_path / "folder", quantized=True)
    with pytest.raises(CheckpointError, match="no dtype"):
        allformers.load(path, quantized=True, dtype=torch.bfloat16)


def test_cli_quantized_flag_runs_a_gguf_on_the_quantized_kernels(tmp_path, capsys):
    from allformers.cli.main import main

    path = tmp_path / "q4.gguf"
    write_llama_gguf(path, linears=Q.Q4_1)
    assert main(["generate", str(path), "The quick", "--max-new-tokens", "4", "--quantized"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The quick") and "quantized kernels: 8 int4, 1 int8 Linears" in out.err
    allformers.load(path).save(tmp_path / "folder")
    assert main(["chat", str(tmp_path / "folder"), "-m", "hi", "--quantized"]) == 2  # not a .gguf: one-line error
    assert "not a .gguf file" in capsys.readouterr().err
