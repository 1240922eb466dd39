"""int8 weight quantization (allformers/models/int8.py, checkpoints/int8.py, `allformers quantize`).

Two schemes: "weight-only" (the default; Int8Linear: int8 weights, bf16 activations, rows independent)
and "dynamic" (torch.ao's dynamic Linear: int8 activations too, one scale per call).

Tolerances. The dynamic int8 Linear rounds each weight to its row's grid (max |w| / 127, relative RMS
error ~ 4 / (127 * sqrt 12) ~ 1% for Gaussian rows whose max is ~4 sigma) and each input to a 7-bit
grid over the whole input (fbgemm's reduce_range: (max - min) / 127, ~ 2% RMS for inputs spread over
~8 sigma). Those add to ~2% per Linear, and a 2-layer model has four Linears on the path of each
layer's residual update, which is a fraction of the stream: measured 0.04-2.6% relative L2 on the
families below. The bound is 5% relative L2 of the logits (about twice the worst measured) and
argmax agreement >= 90% of positions; a broken quantizer (a wrong scale axis, a transposed weight,
a lost bias) gives 30-140%. The weight-only Linear has only the weight rounding and bf16's (2^-9
relative on the input and the output), so it sits well inside the same bound.

Under the dynamic scheme, cached decoding is not bit-equal to recomputing the whole sequence under int8, and is not meant to
be: the input scale is per call, so a 1-token decode step and a 60-token forward pass quantize the
same row differently. The cache is checked to carry the right keys by the same 5% bound, step by
step, and against fp32 recomputation."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import allformers
from allformers import Config, TransformerLM
from allformers.cli.main import main
from allformers.errors import AllformersError, CheckpointError, QuantizationError
from allformers.models.int8 import (DEQUANT_ROWS, DYNAMIC, SCHEMES, WEIGHT_ONLY, Int8Config, Int8Linear, int8_modules,
                                    is_int8, linear_weight_bytes, quantize_int8, quantize_weight)
from allformers.tokenization import Tokenizer

from .serve_util import tiny_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
REL_TOL, AGREE = 0.05, 0.90
T5_SMALL = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=50, intermediate_size=64)
SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=97, block_size=64)
FAMILIES = {  # tied heads; GQA + rotary + SwiGLU; ALiBi; partial rotary + parallel + untied; experts
    "gpt2": {}, "smollm2-135m": dict(n_kv_head=2, intermediate_size=128), "bloom-560m": {}, "pythia-70m": {},
    "mixtral-8x7b": dict(n_kv_head=2, intermediate_size=96, n_expert=4),
}


def tiny(name="smollm2-135m", seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerLM(Config.from_name(name, **{**SMALL, **FAMILIES.get(name, {}), **kw})).eval()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def ids(n=48, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_int8_logits_are_close_to_fp32(family, scheme):
    fp32 = tiny(family)
    q = quantize_int8(copy.deepcopy(fp32), scheme=scheme)
    x = ids()
    with torch.no_grad():
        a, b = q(x), fp32(x)
    assert rel(a, b) < REL_TOL
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= AGREE


def test_a_broken_quantizer_would_be_caught():
    """The tolerance is tight enough to see a lost bias or a transposed weight (why 5% means something)."""
    fp32 = tiny("gpt2")
    q = quantize_int8(copy.deepcopy(fp32))
    with torch.no_grad():
        good = rel(q(ids()), fp32(ids()))
        broken = copy.deepcopy(fp32)
        w = broken.blocks[0].mlp.fc.weight
        w.copy_(w[torch.randperm(w.shape[0])])  # rows in the wrong order: what a wrong scale axis does to the output
        assert rel(broken(ids()), fp32(ids())) > 3 * REL_TOL > 6 * good


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_weights_are_really_int8_and_about_4x_smaller(scheme):
    import torch.ao.nn.quantized.dynamic as nnqd

    fp32 = tiny("pythia-70m")  # untied head: quantized too
    q = quantize_int8(copy.deepcopy(fp32), scheme=scheme)
    names = int8_modules(q)
    assert names == [n for n, m in fp32.named_modules() if type(m) is nn.Linear] and "lm_head" in names
    assert not any(type(m) is nn.Linear for m in q.modules()) and is_int8(q) and not is_int8(fp32)
    for n in names:
        mod = dict(q.named_modules())[n]
        if scheme == WEIGHT_ONLY:
            assert isinstance(mod, Int8Linear) and mod.weight.dtype == torch.int8
            assert mod.weight_scale.dtype == torch.float32 and mod.weight_scale.shape == (mod.out_features,)
            assert 126 <= int(mod.weight.abs().max()) <= 127  # the rows' max reaches the grid's end
            continue
        w = mod.weight()
        assert isinstance(mod, nnqd.Linear)
        assert w.dtype == torch.qint8 and w.qscheme() == torch.per_channel_affine and w.q_per_channel_axis() == 0
        assert int(w.q_per_channel_zero_points().abs().max()) == 0  # symmetric
    assert q.wte.weight.dtype == torch.float32 and q.norm.weight.dtype == torch.float32  # embeddings, norms fp32
    b = {"fp32": linear_weight_bytes(fp32)["fp32"], "int8": linear_weight_bytes(q)["int8"]}
    assert 3.5 < b["fp32"] / b["int8"] <= 4.0  # int8 + one fp32 scale per row


@pytest.mark.parametrize("width", [64, 40])  # 40: not a multiple of the kernel's 16, the dequantizing path
def test_the_weight_only_linear_is_the_dequantized_matmul_within_bf16(width):
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(96, width, generator=g), torch.randn(96, generator=g)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.equal(s.bfloat16().float(), s) and bool((s * 127 >= w.abs().amax(1)).all())  # bf16-exact, rounded up
    assert rel(q.float() * s[:, None], w) < 0.02  # the weight rounding alone: ~1% for Gaussian rows
    lin = Int8Linear(q, s, b)
    for rows in (1, 5, DEQUANT_ROWS + 3):  # decode, a short prompt, a long one (the bf16 matmul path)
        x = torch.randn(2, rows, width, generator=g)
        ref = torch.nn.functional.linear(x, q.float() * s[:, None], b)
        y = lin(x)
        assert y.shape == (2, rows, 96) and y.dtype == torch.float32
        assert rel(y, ref) < 4e-3  # bf16 input and output: 2^-9 relative each
    odd = Int8Linear(q, s * 1.001)  # an fp32 scale bf16 cannot hold: applied after the kernel, in fp32
    x = torch.randn(3, width, generator=g)
    assert not odd._exact and rel(odd(x), x @ (q.float() * (s * 1.001)[:, None]).T) < 4e-3
    lin.load_state_dict({**lin.state_dict(), "weight_scale": s * 2})  # the kernel's bf16 scales follow a load
    assert rel(lin(x), 2 * torch.nn.functional.linear(x, q.float() * s[:, None]) + b) < 4e-3


def test_weight_only_rows_do_not_depend_on_their_neighbours():
    q = quantize_int8(tiny("gpt2"))
    with torch.no_grad():
        batch = q(torch.cat([ids(20, seed=1), ids(20, seed=2), ids(20, seed=3)]))
        alone = q(ids(20, seed=2))
    assert torch.equal(batch[1], alone[0])  # the dynamic scheme's one input scale per call would couple them


def test_tied_heads_get_an_int8_copy_and_moe_routers_stay_fp32():
    fp32 = tiny("smollm2-135m")  # head tied to the embedding: a bare F.linear on wte in fp32
    q = quantize_int8(copy.deepcopy(fp32))
    assert "lm_head" in int8_modules(q) and "wte" not in " ".join(int8_modules(q))
    assert q.wte.weight.dtype == torch.float32 and torch.equal(q.wte.weight, fp32.wte.weight)  # lookup exact
    with torch.no_grad():
        assert rel(q(ids()), fp32(ids())) < REL_TOL
    moe = quantize_int8(tiny("mixtral-8x7b"))
    routers = [m.router for m in moe.modules() if hasattr(m, "router")]
    assert routers and all(type(r) is nn.Linear for r in routers)  # read as router.weight in fp32 on purpose
    assert "blocks.0.attn.qkv" in int8_modules(moe)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_save_load_gives_identical_logits_and_the_tokenizer(tmp_path, scheme):
    tok = Tokenizer.byte_level()
    q = quantize_int8(tiny("pythia-70m", vocab_size=tok.vocab_size), scheme=scheme)
    q.save(tmp_path / "int8", tokenizer=tok)
    raw = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert raw["quantization"] == "int8" and raw["config_class"] == "Int8Config" and raw["modules"] == int8_modules(q)
    assert raw["scheme"] == scheme
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.int8
        assert f.get_tensor("blocks.0.attn.qkv.weight_scale").dtype == torch.float32
        assert f.get_tensor("wte.weight").dtype == torch.float32
    back = allformers.load(tmp_path / "int8")
    assert is_int8(back) and back.quantization == "int8" and back.tokenizer is not None
    assert int8_modules(back) == int8_modules(q)
    assert [type(m) for m in back.modules()] == [type(m) for m in q.modules()]  # the same scheme's Linears
    x = ids(40)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert "loaded" in str(back.load_report)
    back.save(tmp_path / "again")  # a loaded int8 model saves again, to the same tensors
    with torch.no_grad():
        assert torch.equal(allformers.load(tmp_path / "again")(x), q(x))


def test_int8_folders_refuse_other_formats_and_dtypes(tmp_path):
    q = quantize_int8(tiny())
    with pytest.raises(CheckpointError, match="fp32 model it was quantized from"):
        q.save(tmp_path / "hf", format="hf")
    with pytest.raises(CheckpointError, match="no dtype"):
        q.save(tmp_path / "bf16", dtype=torch.bfloat16)
    q.save(tmp_path / "int8")
    with pytest.raises(CheckpointError, match="without dtype"):
        allformers.load(tmp_path / "int8", dtype=torch.bfloat16)
    raw = json.loads((tmp_path / "int8" / "config.json").read_text())
    (tmp_path / "int8" / "config.json").write_text(json.dumps({**raw, "quantization": "int4"}))
    with pytest.raises(CheckpointError, match="int4"):
        allformers.load(tmp_path / "int8")
    (tmp_path / "int8" / "config.json").write_text(json.dumps({**raw, "scheme": "nf4"}))
    with pytest.raises(CheckpointError, match="nf4.*weight-only"):
        allformers.load(tmp_path / "int8")


def test_folders_from_before_the_weight_only_scheme_load_as_dynamic(tmp_path):
    import torch.ao.nn.quantized.dynamic as nnqd

    q = quantize_int8(tiny(), scheme=DYNAMIC)
    q.save(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "config.json").read_text())
    # what such folders hold: the scheme's description, not its key
    (tmp_path / "old" / "config.json").write_text(json.dumps({**raw, "scheme": SCHEMES[DYNAMIC]}))
    back = allformers.load(tmp_path / "old")
    assert isinstance(back.blocks[0].attn.qkv, nnqd.Linear)
    with torch.no_grad():
        assert torch.equal(back(ids()), q(ids()))


def test_int8_config_round_trips():
    c = Int8Config(lm=Config.from_name("gpt2", **SMALL), modules=("a", "b"))
    assert Int8Config.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("family", ["smollm2-135m", "gpt2"])
def test_cached_generation_matches_recomputation_under_int8(family, scheme):
    model = tiny(family)
    q = quantize_int8(copy.deepcopy(model), scheme=scheme)
    prompt = ids(12)
    out = q.generate(prompt, max_new_tokens=24)
    assert out.shape == (1, prompt.shape[1] + 24)
    T = prompt.shape[1]
    with torch.no_grad():
        cache = q.new_cache(1, 64)
        steps = [q(out[:, :T], cache=cache)[:, -1]]
        for t in range(T, out.shape[1] - 1):
            steps.append(q(out[:, t:t + 1], cache=cache)[:, -1])
        cached = torch.stack(steps, 1)
        assert torch.equal(cached.argmax(-1), out[:, T:])  # generate() is greedy over exactly these cached logits
        recomputed_int8 = q(out)[:, T - 1:-1]
        recomputed_fp32 = model(out)[:, T - 1:-1]
    assert rel(cached, recomputed_int8) < REL_TOL and rel(cached, recomputed_fp32) < REL_TOL
    assert (cached.argmax(-1) == recomputed_fp32.argmax(-1)).float().mean() >= AGREE


def test_the_serve_engine_runs_on_an_int8_model():
    from allformers.serve.engine import Engine, SamplingParams, Seq

    model, tok = tiny_chat_model("smollm2-135m")
    q = quantize_int8(model)
    eng = Engine(q, tok, slots=2)
    seqs = [Seq(tok.encode(p), SamplingParams(max_tokens=8, temperature=0.0), tok, lambda e: None)
            for p in ("hello", "int8 weights")]
    eng.submit(seqs)
    for _ in range(100):
        if all(s.finish_reason is not None for s in seqs):
            break
        eng.step()
    assert all(len(s.generated) == 8 for s in seqs)


def test_unsupported_models_are_refused_with_the_fix():
    from allformers.models import LoRAConfig, Seq2SeqLM, apply_lora

    with pytest.raises(QuantizationError, match="decoder"):
        quantize_int8(Seq2SeqLM(Config.from_name("t5-small", **T5_SMALL)))
    lora = tiny()
    apply_lora(lora, LoRAConfig(rank=2))
    with pytest.raises(QuantizationError, match="merge_lora"):
        quantize_int8(lora)
    with pytest.raises(QuantizationError, match="model.float"):
        quantize_int8(tiny().to(torch.bfloat16))
    with pytest.raises(QuantizationError, match="CPU only.*model.cpu"):
        quantize_int8(tiny().to("meta"))  # what a CUDA model meets, without needing a GPU here
    q = quantize_int8(tiny())
    with pytest.raises(QuantizationError, match="already"):
        quantize_int8(q)
    assert issubclass(QuantizationError, AllformersError)


# ---------------------------------------------------------------------- SmoothQuant
SMOOTH_FAMILIES = {  # RMSNorm + SwiGLU + GQA + rotary (LLaMA-like); LayerNorm + GELU + bias (GPT-2); parallel
    "smollm2-135m": {}, "gpt2": {}, "pythia-70m": {}, "qwen2-0.5b": dict(n_kv_head=2, intermediate_size=128)}


def _outliers(model):
    """Non-trivial norms (and a few loud channels) so a wrong fold shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
                if n.endswith("weight"):
                    p[:3] *= 20
    return model


@pytest.mark.parametrize("family", [f for f in SMOOTH_FAMILIES if f in __import__("allformers").config.REGISTRY])
def test_smoothing_alone_leaves_the_fp32_logits_unchanged(family):
    from allformers.models.smoothquant import smooth

    m = _outliers(tiny(family, **SMOOTH_FAMILIES[family]))
    s = copy.deepcopy(m)
    rec = smooth(s, calibration=ids(200, seed=5)[0], alpha=0.65)
    assert "blocks.0.attn.qkv" in rec["smoothed"] and "blocks.0.attn.proj" in rec["smoothed"]
    assert "lm_head" in rec["smoothed"] or m.norm is None
    moved = max((a - b).abs().max().item() for a, b in zip(s.parameters(), m.parameters()) if a.shape == b.shape)
    assert moved > 1e-3  # it did change the weights
    with torch.no_grad():
        assert (s(ids()) - m(ids())).abs().max().item() <= 1e-4
    if m.config.mlp_class == "GLU":
        assert "blocks.0.mlp.proj" in rec["smoothed"]  # into the up rows
    else:
        assert "blocks.0.mlp.proj" not in rec["smoothed"]  # a GELU sits before it: left as it is


def test_smoothing_helps_int8_on_outlier_channels_and_round_trips(tmp_path):
    tok = Tokenizer.byte_level()
    m = _outliers(tiny("smollm2-135m", vocab_size=tok.vocab_size))
    cal = torch.randint(0, tok.vocab_size, (256,), generator=torch.Generator().manual_seed(9))
    plain = quantize_int8(copy.deepcopy(m), scheme=DYNAMIC)
    smooth = quantize_int8(copy.deepcopy(m), smooth=True, calibration=cal, scheme=DYNAMIC)
    weight_only = quantize_int8(copy.deepcopy(m))  # no int8 activations: the outliers cost it nothing
    x = torch.randint(0, tok.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
        assert rel(smooth(x), ref) < rel(plain(x), ref)
        assert rel(weight_only(x), ref) < rel(smooth(x), ref)
    assert smooth.smoothing["alpha"] == 0.65 and "lm_head" in int8_modules(smooth)
    smooth.save(tmp_path / "s", tokenizer=tok)
    raw = json.loads((tmp_path / "s" / "config.json").read_text())
    assert raw["smoothing"]["alpha"] == 0.65 and "blocks.0.mlp.proj" in raw["smoothing"]["smoothed"]
    back = allformers.load(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(back(x), smooth(x))
    assert back.smoothing == smooth.smoothing


def test_exclusions_keep_those_linears_fp32():
    q = quantize_int8(tiny(), exclude=("mlp.proj",))
    assert all(type(b.mlp.proj) is nn.Linear for b in q.blocks) and "blocks.0.mlp.fc" in int8_modules(q)


def test_what_smoothing_cannot_fold_is_refused():
    from allformers.models.smoothquant import smooth

    with pytest.raises(QuantizationError, match="post-norm"):
        smooth(tiny("gpt2", norm_placement="post"), calibration=ids(50)[0])
    with pytest.raises(QuantizationError, match="share"):
        smooth(tiny("gpt2", share_layers="all"), calibration=ids(50)[0])
    with pytest.raises(QuantizationError, match="alpha"):
        smooth(tiny(), calibration=ids(50)[0], alpha=1.5)
    with pytest.raises(QuantizationError, match="smooth=True"):
        quantize_int8(tiny(), alpha=0.5)
    with pytest.raises(QuantizationError, match="scheme='dynamic'"):
        quantize_int8(tiny(), smooth=True, calibration=ids(50)[0])
    with pytest.raises(QuantizationError, match="int4.*weight-only"):
        quantize_int8(tiny(), scheme="int4")


# ---------------------------------------------------------------------- the CLI
@pytest.fixture()
def fp32_dir(tmp_path):
    tok = Tokenizer.byte_level()
    tiny("gpt2", vocab_size=tok.vocab_size).save(tmp_path / "fp32", tokenizer=tok)
    return tmp_path / "fp32"


def test_cli_quantize_writes_a_folder_that_loads_quantized(fp32_dir, tmp_path, capsys):
    assert main(["quantize", str(fp32_dir), "-o", str(tmp_path / "q")]) == 0
    assert "wrote int8 folder" in capsys.readouterr().out
    q, fp32 = allformers.load(tmp_path / "q"), allformers.load(fp32_dir)
    assert is_int8(q) and q.tokenizer is not None and q.smoothing is None  # the default: weight-only, every Linear
    assert isinstance(q.blocks[0].mlp.proj, Int8Linear)
    with torch.no_grad():
        assert rel(q(ids()), fp32(ids())) < REL_TOL
    assert main(["quantize", str(fp32_dir), "-o", str(tmp_path / "dyn"), "--scheme", "dynamic"]) == 0
    dyn = allformers.load(tmp_path / "dyn")
    assert dyn.smoothing["calibration"] == "sotu-first" and "blocks.0.mlp.proj" not in int8_modules(dyn)
    with torch.no_grad():
        assert rel(dyn(ids()), fp32(ids())) < REL_TOL
    assert main(["quantize", str(fp32_dir), "-o", str(tmp_path / "plain"), "--scheme", "dynamic", "--calibrate", "none",
                 "--exclude", ""]) == 0
    plain = allformers.load(tmp_path / "plain")
    assert plain.smoothing is None and "blocks.0.mlp.proj" in int8_modules(plain)
    assert main(["quantize", "baby-gpt-char", "-o", str(tmp_path / "zoo")]) == 0  # a zoo name: random weights
    assert is_int8(allformers.load(tmp_path / "zoo"))


def test_cli_quantize_bad_inputs_are_one_line_and_exit_2(fp32_dir, tmp_path, capsys):
    def refused(argv, words):
        assert main(argv) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]  # beside a load report, at most
        assert len(errors) == 1 and words in errors[0] and "Traceback" not in err, err

    refused(["quantize", str(tmp_path / "nope" / "x"), "-o", str(tmp_path / "o1")], "does not exist")
    refused(["quantize", "gtp2", "-o", str(tmp_path / "o2")], "Did you mean: gpt2")
    refused(["quantize", str(fp32_dir), "-o", str(tmp_path / "o4"), "--calibrate", "shakespeare"], "--scheme dynamic")
    assert not (tmp_path / "o4").exists()
    out = tmp_path / "out"
    assert main(["quantize", str(fp32_dir), "-o", str(out)]) == 0
    capsys.readouterr()
    before = (out / "model.safetensors").read_bytes()
    refused(["quantize", str(fp32_dir), "-o", str(out)], "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["quantize", str(fp32_dir), "-o", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    refused(["quantize", str(fp32_dir), "-o", str(fp32_dir), "--overwrite"], "MODEL itself")
    (tmp_path / "afile").write_text("x")
    refused(["quantize", str(fp32_dir), "-o", str(tmp_path / "afile")], "is a file")
    from allformers.models import Seq2SeqLM

    Seq2SeqLM(Config.from_name("t5-small", **T5_SMALL)).save(tmp_path / "t5")
    refused(["quantize", str(tmp_path / "t5"), "-o", str(tmp_path / "o3")], "decoder")
    assert not (tmp_path / "o3").exists()


# ---------------------------------------------------------------------- the benchmark's tiny path
def test_bench_quant_tiny_prints_the_figures():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_quant.py"), "--tiny", "--threads", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mode"] == "tiny" and set(out["models"]) == {"smollm2-135m", "gpt2-124m-shape"}
    assert out["int8_decode_ratio"] > 0 and abs(out["int8_ppl_increase"]) < 0.05
    assert out["gguf"]["decode_ratio"] > 0 and abs(out["gguf"]["ppl_increase"]) < 0.2 and "int4" in out["gguf"]["what"]
    assert out["gguf"]["layout"]["int4"] > 0
    for m in out["models"].values():
        assert m["fp32_greedy_identical_to_transformers"] and m["logits_parity_vs_transformers"] < 1e-3


# ---------------------------------------------------------------------- int4 (models/int4.py: a GGUF file's Q4 path)
def on_a_4bit_grid(out_f, in_f, seed=0, group=32):
    """Weights as a Q4_1 file holds them: per group of 32 a minimum, a scale and 16 levels, both ends used."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_f, in_f // group, group), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    scale = (torch.rand(out_f, in_f // group, 1, generator=g) * 0.02 + 0.005).half().float()
    lo = (-torch.rand(out_f, in_f // group, 1, generator=g) * 0.1).half().float()
    return (q * scale + lo).reshape(out_f, in_f)


def test_int4_linear_is_its_grid_within_bf16_and_finds_q4_grids():
    from allformers.models.int4 import Int4Linear, group_quantize, on_grid

    w = on_a_4bit_grid(48, 64)
    assert on_grid(w, 32) and not on_grid(torch.randn(48, 64), 32) and not on_grid(w[:, :48], 32)
    q, scale, lo = group_quantize(w, 32)
    assert int(q.min()) == 0 and int(q.max()) == 15
    assert torch.allclose(q.reshape(48, 2, 32) * scale[..., None] + lo[..., None], w.reshape(48, 2, 32), atol=1e-6)
    b = torch.randn(48)
    lin = Int4Linear(w, b, group_size=32)
    assert lin.packed.dtype == torch.uint8 and lin.packed.numel() == 48 * 64 // 2  # two weights a byte
    for rows in (1, 7, 300):
        x = torch.randn(rows, 64)
        ref = torch.nn.functional.linear(x, w, b)
        assert rel(lin(x), ref) < 1e-2  # bf16 inputs, outputs, scales and minimums
    with pytest.raises(QuantizationError, match="divisible by 16"):
        Int4Linear(torch.randn(40, 64))
    with pytest.raises(QuantizationError, match="group_size=48"):
        Int4Linear(w, group_size=48)


def test_quantize_int4_puts_what_fits_on_int4_and_the_rest_on_int8(tmp_path):
    from allformers.models.int4 import Int4Linear, NoInt4Linear, quantize_int4, weight_bytes

    fp32 = tiny()  # vocabulary 97: the head does not fit the kernel (out_features % 16)
    q = quantize_int4(copy.deepcopy(fp32))
    assert q.quantization == "int4" and q.int4_layout["int8"] == ["lm_head"] and isinstance(q.lm_head, Int8Linear)
    assert all(isinstance(b.attn.qkv, Int4Linear) and isinstance(b.mlp.proj, Int4Linear) for b in q.blocks)
    with torch.no_grad():
        a, b = q(ids()), fp32(ids())
    assert rel(a, b) < 0.08  # 16 levels per group of random weights: ~9% RMS per weight; measured 0.027
    assert weight_bytes(q)["int4"] < linear_weight_bytes(fp32)["fp32"] / 6
    with pytest.raises(QuantizationError, match="already int4"):
        quantize_int8(q)
    with pytest.raises(QuantizationError, match="already int4"):
        quantize_int4(q)
    with pytest.raises(CheckpointError, match="does not save"):
        q.save(tmp_path / "int4")
    untouched = tiny()
    with pytest.raises(NoInt4Linear, match="unchanged"):  # random weights lie on no 4-bit grid
        quantize_int4(untouched, on_grid_only=True)
    assert not is_int8(untouched) and getattr(untouched, "quantization", None) is None
    with pytest.raises(QuantizationError, match="rest="):
        quantize_int4(tiny(), rest="int2")
