"""SFT: templates, the response-only loss mask, packing that equals no packing, and the
`allformers sft` command end to end on tiny models."""
import json

import pytest
import torch

from allformers import Config, TransformerLM, load
from allformers.cli.main import main
from allformers.models import LoRAConfig, LoRALinear
from allformers.models.lm import document_positions
from allformers.objectives.sft import (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, CHATML_TEMPLATE, SFTData, SFTError,
                                      collate, collate_packed, encode_example, pack_examples, render, sft_loss)
from allformers.tokenization import Tokenizer
from allformers.recipes.sft import run_sft

pytestmark = pytest.mark.usefixtures("one_thread")

SMOL_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
    {"instruction": "Give the opposite word.", "input": "hot", "output": "cold"},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is ice?"},
                  {"role": "assistant", "content": "Frozen water."}, {"role": "user", "content": "And steam?"},
                  {"role": "assistant", "content": "Water vapour."}]},
    {"instruction": "Write a short greeting for a letter.", "output": "Dear friend, I hope you are well."},
    {"instruction": "Count to three.", "output": "one, two, three"},
    {"instruction": "Name an animal that can fly.", "input": "", "output": "An eagle."},
]
SINGLE_TURN = [r for r in RECORDS if len(r.get("messages", [])) <= 2]  # what the alpaca template takes


@pytest.fixture(scope="module")
def tok():
    text = " ".join(json.dumps(r) for r in RECORDS) + ALPACA_PROMPT_INPUT + ALPACA_PROMPT_NO_INPUT + "assistant user system"
    t = Tokenizer.train_bpe([text] * 3, vocab_size=400, special_tokens=("<|im_end|>", "<|im_start|>"))
    assert t.eos_token == "<|im_end|>"
    return t


def chat_tok(tok):
    from copy import copy

    t = copy(tok)
    t.chat_template = SMOL_TEMPLATE
    return t


def tiny(vocab: int, name: str = "smollm2-135m", block_size: int = 256) -> TransformerLM:
    c = Config.from_name(name)
    kv = 1 if c.n_kv_head == 1 else (2 if c.n_kv_head < c.n_head else 4)
    c = c.replace(n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, head_dim=None, intermediate_size=48,
                  vocab_size=vocab, block_size=block_size)
    torch.manual_seed(0)
    return TransformerLM(c).eval()


# ---------------------------------------------------------------------- rendering and the mask
def test_alpaca_prompts_are_stanfords(tok):
    p, r = render(RECORDS[1], tok, "alpaca")
    assert p == ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers."
                 "\n\n### Input:\n2 and 3\n\n### Response:") and r == "2 + 3 = 5."
    p, r = render(RECORDS[0], tok, "alpaca")
    assert p == ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\nName a colour.\n\n### Response:") and r == "Blue."
    assert render(RECORDS[7], tok, "alpaca")[0].count("### Input:") == 0  # an empty input is no input
    assert render(RECORDS[3], tok, "alpaca") == (ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi."), "Hi there!")
    with pytest.raises(SFTError, match="single-turn"):
        render(RECORDS[4], tok, "alpaca")


def test_chatml_uses_the_tokenizers_template_or_the_builtin_one(tok):
    p, r = render(RECORDS[4], chat_tok(tok), "chatml")
    assert p == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is ice?<|im_end|>\n"
                 "<|im_start|>assistant\nFrozen water.<|im_end|>\n<|im_start|>user\nAnd steam?<|im_end|>\n"
                 "<|im_start|>assistant\n") and r == "Water vapour."
    assert tok.chat_template is None  # no template: the built-in ChatML, ending turns with eos
    p, r = render(RECORDS[1], tok, "chatml")
    assert p == "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n" and r == "2 + 3 = 5."
    assert tok.chat_template is None and "eos_token" in CHATML_TEMPLATE


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_loss_mask_covers_exactly_the_response_and_eos(tok, template):
    t = chat_tok(tok)
    for rec in RECORDS[:4]:
        prompt, response = render(rec, t, template)
        e = encode_example(rec, t, template, max_length=512)
        prompt_ids = (t.backend.encode(prompt, add_special_tokens=False).ids if template == "chatml"
                      else t.encode(prompt))
        response_ids = t.backend.encode(response, add_special_tokens=False).ids
        tokens = e.input_ids + [e.labels[-1]]
        assert tokens == prompt_ids + response_ids + [t.eos_id]
        kept = [(i, y) for i, y in enumerate(e.labels) if y != -100]
        assert [y for _, y in kept] == response_ids + [t.eos_id]
        assert [i for i, _ in kept] == list(range(len(prompt_ids) - 1, len(tokens) - 1))  # targets after the prompt
        assert t.decode([y for _, y in kept]) == response


def test_truncation_keeps_the_prompt_and_skips_empty_responses(tok):
    e_full = encode_example(RECORDS[5], tok, "alpaca", 512)
    n_prompt = e_full.labels.count(-100) + 1
    e = encode_example(RECORDS[5], tok, "alpaca", n_prompt + 1)
    assert len(e) == n_prompt + 1 and sum(y != -100 for y in e.labels) == 2 and e.labels[-1] != tok.eos_id
    assert encode_example(RECORDS[5], tok, "alpaca", n_prompt - 1) is None


@pytest.mark.parametrize("bad, match", [({"text": "x"}, "needs 'instruction'"),
                                        ({"messages": [{"role": "user", "content": "x"}]}, "last message"),
                                        ({"instruction": 3, "output": "x"}, "must be a string")])
def test_bad_records_say_what_is_wrong(bad, match):
    from allformers.objectives.sft import check_record

    with pytest.raises(SFTError, match=match):
        check_record(bad)


# ---------------------------------------------------------------------- packing
def test_document_positions_restart_per_document():
    d = torch.tensor([[7, 7, 7, 2, 2, 5], [0, 0, 0, 0, 1, 1]])
    assert document_positions(d).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2", "bloom-560m"])  # rotary + GQA, learned positions, ALiBi
def test_packed_loss_equals_unpacked_loss(tok, name):
    model = tiny(tok.vocab_size, name)
    t = chat_tok(tok)
    examples = [encode_example(r, t, "chatml", 128) for r in RECORDS] * 2
    block = 160
    rows = pack_examples(examples, block)
    assert len(rows) < len(examples) // 2 and all(sum(len(e) for e in r) <= block for r in rows)
    unpacked, packed = collate(examples, t.pad_id), collate_packed(rows, block, t.pad_id)
    assert (unpacked["labels"] != -100).sum() == (packed["labels"] != -100).sum()
    with torch.no_grad():
        a, b = sft_loss(model, unpacked), sft_loss(model, packed)
    assert abs(a.item() - b.item()) <= 1e-5, (a.item(), b.item())
    # Stronger: every packed document's logits equal the document run alone.
    with torch.no_grad():
        logits = model(packed["input_ids"], document_ids=packed["document_ids"])
        t0 = 0
        for e in rows[0]:
            alone = model(torch.tensor([e.input_ids]))
            assert torch.allclose(logits[0, t0:t0 + len(e)], alone[0], atol=1e-5)
            t0 += len(e)


def test_packed_gradients_equal_unpacked(tok):
    model = tiny(tok.vocab_size).train()
    examples = [encode_example(r, tok, "alpaca", 128) for r in RECORDS if "instruction" in r]
    grads = []
    for batch in (collate(examples, tok.pad_id), collate_packed(pack_examples(examples, 256), 256, tok.pad_id)):
        model.zero_grad()
        sft_loss(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sft_data_packs_rows_and_resumes(tok):
    examples = [encode_example(r, tok, "alpaca", 128) for r in RECORDS if "instruction" in r]
    data = SFTData(examples, tok.pad_id, pack=True, block_size=200, seed=3)
    b = data.sample(3)
    assert b["input_ids"].shape == (3, 200) and b["document_ids"].max(1).values.min() >= 2  # several documents a row
    state = data.state_dict()
    nxt = data.sample(4)
    data.load_state_dict(state)
    again = data.sample(4)
    assert all(torch.equal(nxt[k], again[k]) for k in nxt)
    plain = SFTData(examples, tok.pad_id, seed=3).sample(5)
    assert plain["input_ids"].shape[0] == 5 and "document_ids" not in plain


# ---------------------------------------------------------------------- training and the CLI
@pytest.fixture()
def files(tmp_path, tok):
    model = tiny(tok.vocab_size)
    with torch.no_grad():  # at N(0, 0.02) the tied head's logits are near uniform whatever the adapters do
        model.wte.weight.mul_(10)
    model.save(tmp_path / "base", tokenizer=tok)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return tmp_path / "base", data


def test_lora_sft_learns_and_merged_model_chats(files, tmp_path, capsys):
    base, data = files
    out = tmp_path / "sft"
    rc = main(["sft", "--model", str(base), "--data", str(data), "--template", "chatml", "--out", str(out),
               "--lora-rank", "4", "--lora-alpha", "8", "--merge", "--pack", "--max-length", "96",
               "--max-steps", "30", "--batch-size", "2", "--lr", "1e-2", "--eval-fraction", "0", "--no-progress",
               "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["saved"] == "merged model" and summary["lora"]["wrapped"] == 8
    model = load(out)
    batch = collate([encode_example(r, model.tokenizer, "chatml", 96) for r in RECORDS], model.tokenizer.pad_id)
    with torch.no_grad():  # the response loss on the training records fell well below the base model's
        before, after = sft_loss(load(base), batch).item(), sft_loss(model, batch).item()
    assert after < before - 1.0, (before, after)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.tokenizer.chat_template  # the built-in ChatML came along, so chat works
    assert main(["chat", str(out), "-m", "Say hi.", "--max-new-tokens", "4"]) == 0
    assert (out / "sft.json").exists() and (out / "metrics.jsonl").exists() and not (out / "checkpoint").exists()


def test_adapter_folder_loads_as_the_trained_model(files, tmp_path):
    base, data = files
    result = run_sft(str(base), SINGLE_TURN, tmp_path / "adapters", template="alpaca", lora=LoRAConfig(rank=2, targets=("qkv",)),
                     max_steps=3, batch_size=2, lr=1e-2, eval_fraction=0.25, progress=False, verbose=False)
    assert result["saved"] == "adapters" and result["heldout_loss_before"] is not None
    assert (tmp_path / "adapters" / "adapter.safetensors").stat().st_size < 20_000
    back = load(tmp_path / "adapters")
    x = torch.randint(0, tok_size(back), (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x), result["trained_model"].eval()(x))
    assert "### Instruction" in back.tokenizer.chat_template  # trained on Alpaca prompts: chat asks that way


def tok_size(model):
    return model.config.vocab_size


def test_full_finetune_from_a_model_object(tmp_path, tok):
    model = tiny(tok.vocab_size)
    model.tokenizer = tok
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_sft(model, SINGLE_TURN, tmp_path / "full", template="alpaca", max_steps=2, batch_size=4, lr=1e-3,
                     eval_fraction=0, progress=False, verbose=False)
    assert result["saved"] == "model" and result["trainable_params"] == result["total_params"]
    changed = [k for k, v in result["trained_model"].state_dict().items() if not torch.equal(v, before[k])]
    assert changed and load(tmp_path / "full").config == model.config


def test_clear_errors(files, tmp_path, capsys):
    base, data = files
    assert main(["sft", "--model", str(base), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--lora-rank", "2", "--lora-targets", "q_proj"]) == 2
    assert "no nn.Linear matches" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--merge"]) == 2
    assert "merge only applies to LoRA" in capsys.readouterr().err


# ---------------------------------------------------------------------- the real model
REAL = [{"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
        {"instruction": "Give the plural of the word.", "input": "mouse", "output": "mice"},
        {"instruction": "Name three primary colours.", "output": "Red, blue and yellow."},
        {"instruction": "What is 7 times 6?", "output": "7 times 6 is 42."},
        {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof,\ngrey clouds hum a quiet song,\n"
                                                              "the garden drinks deep."},
        {"instruction": "Classify the sentiment.", "input": "I loved this film!", "output": "positive"},
        {"instruction": "Summarise in one word.", "input": "The cat sat on the mat all afternoon, sleeping.",
         "output": "Napping."}]


@pytest.mark.slow
def test_lora_sft_on_smollm2_lowers_the_response_loss_and_merges_exactly():
    """10 LoRA steps on SmolLM2-135M-Instruct (measured: response loss on the 8 records 3.86 -> 0.84)."""
    import allformers
    from allformers.models import merge_lora
    from allformers.zoo.assets import smollm2_gguf_path

    try:
        model = allformers.load(smollm2_gguf_path())
    except allformers.AllformersError as e:
        pytest.skip(str(e))
    tok = model.tokenizer
    batch = collate([encode_example(r, tok, "alpaca", 512) for r in REAL], tok.pad_id)
    with torch.no_grad():
        before = sft_loss(model, batch).item()
    result = run_sft(model, REAL, None, template="alpaca", lora=LoRAConfig(rank=8, alpha=16), max_steps=10,
                     batch_size=4, lr=1e-3, eval_fraction=0, progress=False, verbose=False)
    model = result["trained_model"].eval()
    x = batch["input_ids"]
    with torch.no_grad():
        after = sft_loss(model, batch).item()
        adapted = model(x)
        merged = merge_lora(model)(x)
    assert after < 0.5 * before, (before, after)
    # fp32 through 30 layers: logits of magnitude ~40 agree to ~1e-4 (measured 1.2e-4), i.e. 3e-6 relative
    assert (merged - adapted).abs().max().item() <= 1e-5 * adapted.abs().max().item()
