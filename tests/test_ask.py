"""`allformers ask IMAGE "question" --model FOLDER` and allformers/models/vqa.py: the prompt each model family reads (LLaVA-1.5's
chat format for a VisionLanguageLM, BLIP-2's "Question: ... Answer:" after the queries), greedy answers from saved
folders (a tiny PaLM-E trained here to read a colour off the picture answers each picture right; a BLIP-2's CLI answer
is its own generate() on the hand-built prompt), and one-line errors (exit 2)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers

from allformers import Config, TransformerLM
from allformers.models.vqa import BLIP2_PROMPT, prompt_ids
from allformers.cli.main import main
from allformers.data.image_processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from allformers.models.blip2 import BLIP2, BLIP2Config
from allformers.models.qformer import QFormerConfig
from allformers.models.vit import ViTConfig
from allformers.models.vlm import VisionLanguageLM, VLMConfig
from allformers.tokenization import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "USER ASSISTANT Question Answer : ? what colour is the circle red blue green"
COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30)}


def tokenizer():
    tok = Tokenizer.word_level([WORDS], special_tokens=("<pad>", "</s>", "<image>"))
    tok.backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def picture(colour):
    """A 32 x 32 grey picture with a coloured disc in the middle."""
    y, x = np.mgrid[:32, :32]
    img = np.full((32, 32, 3), 128, dtype=np.uint8)
    img[(x - 16) ** 2 + (y - 16) ** 2 < 64] = COLOURS[colour]
    return img


def pixels(img):
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    return torch.from_numpy(((img / 255 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))


def vlm(tok):
    vision = ViTConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2)
    lm = Config(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32, position="learned")
    return VisionLanguageLM(VLMConfig(lm, vision, image_token_id=tok.token_id("<image>"), vision_feature_layer=None))


def save(model, tok, path):
    model.save(path, tokenizer=tok)
    proc = ImageProcessor(shortest_edge=None, size=(32, 32), crop=None)
    (path / "preprocessor_config.json").write_text(json.dumps(proc.to_hf()))
    return path


@pytest.fixture(scope="module")
def palme_dir(tmp_path_factory):
    """A tiny PaLM-E trained to say the disc's colour (the only question): it must read the picture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a module fixture runs before one_thread; a second thread only stalls tiny models
    torch.manual_seed(0)
    tok = tokenizer()
    model = vlm(tok)
    prompt = prompt_ids("vlm", tok, "what colour is the circle?", config=model.config)
    ids = torch.tensor([prompt + tok.encode(c) + [tok.eos_id] for c in COLOURS])
    labels = ids.clone()
    labels[:, :len(prompt)] = -100
    px = torch.cat([pixels(picture(c)) for c in COLOURS])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids, px, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.05
    return save(model.eval(), tok, tmp_path_factory.mktemp("palme"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    for c in COLOURS:
        Image.fromarray(picture(c)).save(folder / f"{c}.png")
    return folder


def test_prompts_are_each_family_s_format():
    tok = tokenizer()
    model = vlm(tok)
    N, img = model.config.image_seq_length, tok.token_id("<image>")
    words = lambda s: [tok.token_id(w) for w in s.split()]  # noqa: E731
    # LLaVA-1.5: "USER: <image>\n{question} ASSISTANT:"
    assert prompt_ids("vlm", tok, "what colour is the circle?", config=model.config) == (
        words("USER :") + [img] * N + words("what colour is the circle ? ASSISTANT :"))
    assert prompt_ids("vlm", tok, "what colour is the circle?", with_image=False) == words(
        "USER : what colour is the circle ? ASSISTANT :")
    qf = QFormerConfig(width=32, depth=1, heads=2, intermediate_size=64, vision_width=32, num_query_tokens=3,
                       text_input=False)
    cfg = BLIP2Config(model.config.vision, qf, model.config.text, image_token_id=img, stage1=False, itg_head=False)
    assert BLIP2_PROMPT == "Question: {} Answer:"
    assert prompt_ids("blip2", tok, "what colour is the circle?", config=cfg) == (
        [img] * 3 + words("Question : what colour is the circle ? Answer :"))


def test_palme_answers_what_it_sees(palme_dir, pictures, capsys):
    for colour in COLOURS:
        assert main(["ask", str(pictures / f"{colour}.png"), "what colour is the circle?", "--model", str(palme_dir)]) == 0
        assert capsys.readouterr().out.strip() == colour


def test_blip2_answer_is_its_generate_on_the_prompt(tmp_path, pictures, capsys):
    torch.manual_seed(1)
    tok = tokenizer()
    base = vlm(tok)
    qf = QFormerConfig(width=32, depth=1, heads=2, intermediate_size=64, vision_width=32, num_query_tokens=3,
                       text_input=False)
    model = BLIP2(BLIP2Config(base.config.vision, qf, base.config.text, image_token_id=tok.token_id("<image>"),
                              stage1=False, itg_head=False)).eval()
    with torch.no_grad():
        model.language_projection.weight.mul_(20)  # a random model that does not just say one word everywhere
    save(model, tok, tmp_path / "blip2")
    q = "what colour is the circle?"
    ids = torch.tensor([[tok.token_id("<image>")] * 3 + tok.encode(BLIP2_PROMPT.format(q))])
    for colour in COLOURS:
        new = model.generate(pixels(picture(colour)), ids, max_new_tokens=4, eos_id=tok.eos_id)[0].tolist()
        want = tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new).strip()
        assert main(["ask", str(pictures / f"{colour}.png"), q, "--model", str(tmp_path / "blip2"),
                     "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out.strip() == want


def _error(capsys, argv):
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if not x.startswith("[allformers] loaded")]
    assert len(lines) == 1 and lines[0].startswith("allformers ask: error:"), lines
    return lines[0]


def test_errors_are_one_line(palme_dir, pictures, tmp_path, capsys):
    png = str(pictures / "red.png")
    assert "does not exist" in _error(capsys, ["ask", str(tmp_path / "nope.png"), "what colour?", "--model", str(palme_dir)])
    assert "question is empty" in _error(capsys, ["ask", png, "  ", "--model", str(palme_dir)])
    assert "'banana'" in _error(capsys, ["ask", png, "what colour is the banana?", "--model", str(palme_dir)])
    tok = tokenizer()
    TransformerLM(Config(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).save(
        tmp_path / "text-only", tokenizer=tok)
    assert "cannot answer questions about pictures" in _error(
        capsys, ["ask", png, "what colour is the circle?", "--model", str(tmp_path / "text-only")])
