"""Hugging Face folders in and out, driven by the key tables in hf_decoders.py and
hf_encoders.py (one small table per family; the row kinds are in maps.py).

Import reads config.json's `model_type` and `architectures` to pick the family and the task
head; export picks the family whose architecture can hold the config exactly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import Config
from ..errors import AllformersError, CheckpointError
from . import hf_decoders, hf_encoders, hf_seq2seq, hf_deberta, hf_xlnet  # noqa: F401  (register the tables)
from .files import (CONFIG_FILE, atomic_folder_write, cast_state, contiguous_state, load_state_dict_into,
                    read_config_json, read_safetensors)
from .maps import FAMILIES, Family


def _family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(f"Hugging Face model_type {model_type!r} is not supported yet; "
                              f"supported: {sorted(FAMILIES)} (and the composites of io.py's OTHER_HF_LOADERS)")
    return FAMILIES[model_type]


def architecture(family: Family, config: Config) -> Optional[str]:
    """The HF class that holds the config's head; a sentence encoder is the bare backbone (BertModel), with
    sentence-transformers' pooling file beside it."""
    return family.architectures.get("base" if config.task == "embedding" else config.task)


def hf_family(config: Config) -> Optional[Family]:
    """The first family whose HF architecture holds the config exactly, or None. A pooler (task="base" with
    classifier_dense) needs a family whose bare backbone has one."""
    pooler = config.task == "base" and config.classifier_dense
    return next((f for f in FAMILIES.values() if f.holds(config) and f.fits(config) and architecture(f, config) is not None
                 and (not pooler or "base" in f.head_rows)), None)


def rows_for(family: Family, config: Config) -> list:
    """Every row for this config, with our keys as they appear in the model's state dict."""
    task = config.task
    body = family.body_rows(config)
    head = family.head_rows.get(task)
    if task == "lm":
        return body + (head(config) if head else [])
    body = [_prefixed(r, "body.") for r in body]
    if task == "embedding" or (task == "base" and not config.classifier_dense):
        return body
    if head is None:
        raise CheckpointError(f"{family.model_type} has no {task} head in its key table")
    return body + head(config)


def _prefixed(row, prefix):
    from dataclasses import replace

    return replace(row, ours=prefix + row.ours)


def _stacks(config: Config):
    """row -> the config its tensors are shaped by: an encoder-decoder's decoder rows follow the decoder stack
    (its own depth, heads and FFN width), every other row the config itself."""
    decoder = config.decoder_config() if config.is_encoder_decoder else None
    return lambda row: decoder if decoder is not None and row.ours.startswith("decoder.") else config


def _layer_of(key: str) -> int:
    return int(next(p for p in key.split(".") if p.isdigit()))


# ---------------------------------------------------------------------- conversion
def canonical_hf_state(hf_state: dict, family: Family, config: Config) -> dict:
    """HF keys as the family's table names them: a bare backbone's keys get the family prefix, newer in-memory
    names their on-disk names."""
    hf_state = dict(hf_state)
    prefix = family.base_prefix
    if prefix and not any(k.startswith(prefix) for k in hf_state):  # bare backbone (BertModel, GPT2Model)
        hf_state = {prefix + k: v for k, v in hf_state.items()}
    for alias, canonical in family.aliases:
        if alias in hf_state and canonical not in hf_state:
            hf_state[canonical] = hf_state.pop(alias)
    if family.normalize is not None:  # in-memory names of newer transformers (e.g. fused experts)
        hf_state = family.normalize(hf_state, config)
    return hf_state


def hf_to_ours(hf_state: dict, config: Config, family: Family):
    """Returns (our state dict, HF keys left over)."""
    hf_state = canonical_hf_state(hf_state, family, config)
    ours, used, stack = {}, set(), _stacks(config)
    for row in rows_for(family, config):
        n = stack(row).n_layer if "{}" in row.ours else 1
        for i in range(n):
            keys = [t.format(i) for t in row.hf]
            if not all(k in hf_state for k in keys):
                continue  # reported as missing by load_state_dict_into
            ours[row.ours.format(i)] = row.to_ours([hf_state[k] for k in keys], stack(row)).contiguous()
            used.update(keys)
    leftover = [k for k in hf_state if k not in used and not any(k.endswith(s) for s in family.ignore)]
    if config.tie_embeddings and family.tied_hf_key in leftover:
        leftover.remove(family.tied_hf_key)  # a duplicated tied head carries nothing new
    return ours, leftover


def ours_to_hf(state: dict, config: Config, family: Family) -> dict:
    out, stack = {}, _stacks(config)
    for row in rows_for(family, config):
        keys = [row.ours.format(i) for i in range(stack(row).n_layer)] if "{}" in row.ours else [row.ours]
        for key in keys:
            if key not in state:
                continue
            i = _layer_of(key) if "{}" in row.ours else None
            for t, tensor in zip(row.hf, row.to_hf(state[key], stack(row))):
                out[t.format(i) if i is not None else t] = tensor.contiguous()
    return out


def read_hf_weights(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.exists():  # sharded checkpoint
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(read_safetensors(path / f))
        return state
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path} has a config.json but no model.safetensors, sharded index or pytorch_model.bin")


def _task_of(family: Family, hf: dict, path: Path) -> dict:
    """Which head the folder holds, from its architecture name."""
    arch = (hf.get("architectures") or [None])[0]
    by_arch = {a: t for t, a in family.architectures.items()}
    if arch is None:  # no head named: the bare backbone, as transformers' AutoModel reads it
        task = "lm" if len(family.architectures) == 1 else "base"
    elif arch in by_arch:
        task = by_arch[arch]
    else:
        raise CheckpointError(f"{path}: architecture {arch} is not supported; supported: {sorted(by_arch)}")
    pooling = path / "1_Pooling" / "config.json"  # a sentence-transformers folder: it says how to pool
    if task == "base" and pooling.exists():
        mean = json.loads(pooling.read_text()).get("pooling_mode_mean_tokens")
        return dict(task="embedding", pooling="mean" if mean else "first")
    out = dict(task=task)
    if task in ("sequence-classification", "token-classification"):
        labels = hf.get("id2label") or {}
        out["labels"] = [labels[k] for k in sorted(labels, key=int)] if labels else None
        if not labels:
            out["num_labels"] = hf.get("num_labels", 2)
        out["classifier_activation"] = "tanh"
        out["classifier_dense"] = task == "sequence-classification"
    if task == "base":  # a pooler where the family's base class has one; load_hf drops it if its weights are absent
        out["classifier_dense"] = "base" in family.head_rows
    head = family.head_config.get(task)
    return {**out, **(head(hf) if head else {})}


def _has_pooler(family: Family, config: Config, hf_state: dict) -> bool:
    """BertModel(add_pooling_layer=False) and friends save no pooler weights."""
    return all(t in hf_state for row in family.head_rows["base"](config) for t in row.hf)


def config_from_hf(hf: dict, path: Path = Path(".")) -> Config:
    family = _family(hf.get("model_type"))
    try:
        task = _task_of(family, hf, path)
        kwargs = family.config_from_hf(hf)
    except KeyError as e:  # a required key is absent: name it rather than raise a bare KeyError
        raise CheckpointError(f"{path / CONFIG_FILE} has no {e.args[0]!r}, which a Hugging Face {family.model_type} "
                              f"config needs; restore the key (see the model's original config.json)") from None
    except AllformersError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} has a value of the wrong type ({e}); restore the original "
                              f"config.json") from None
    shape = "encoder-decoder" if kwargs.get("is_encoder_decoder") else "encoder" if kwargs.get("causal") is False else "decoder"
    fields = {**task, **kwargs}  # a family may fix its heads (DistilBERT: ReLU) ...
    if task["task"] == "embedding":  # ... but a sentence-transformers folder says how its sentences are pooled
        fields["pooling"] = task["pooling"]
    return Config(name=hf.get("_name_or_path", "") or family.model_type, family=shape,
                  description=f"imported from a Hugging Face {(hf.get('architectures') or [family.model_type])[0]}",
                  **fields)


def load_hf(path):
    from ..models import build_model

    path = Path(path)
    hf = read_config_json(path / CONFIG_FILE)
    family = _family(hf.get("model_type"))
    config = config_from_hf(hf, path)
    hf_state = canonical_hf_state(read_hf_weights(path), family, config)
    if config.task == "base" and config.classifier_dense and not _has_pooler(family, config, hf_state):
        config = config.replace(classifier_dense=False)
    model = build_model(config)
    ours, leftover = hf_to_ours(hf_state, config, family)
    report = load_state_dict_into(model, ours, str(path), strict=False)
    report.unexpected = sorted(set(report.unexpected) | set(leftover))
    if config.task == "embedding":  # a pooler or MLM head beside a sentence encoder is not needed
        report.unexpected = [k for k in report.unexpected if "pooler" not in k]
    if report.missing or report.unexpected:
        raise CheckpointError(f"{path} does not match a {(hf.get('architectures') or [family.model_type])[0]}: {report}")
    return model, report


def save_hf(model, path, tokenizer=None, dtype=None, overwrite: bool = False):
    """Write a folder that `transformers` loads with the matching Auto class (atomically, like save)."""
    from safetensors.torch import save_file

    config = model.config
    family = hf_family(config)
    if family is None and config.task == "sequence-classification" and config.pooling != "first":
        raise CheckpointError(  # each family's fits() checks the pooling its classifier uses
            f"this {config.task} model pools by {config.pooling!r}; Hugging Face's classes for it pool the first "
            f"token, so the export would behave differently — save it with format='allformers'")
    if family is None:
        pooler = (" with a pooler (classifier_dense=True; only some families' bare backbones have one)"
                  if config.task == "base" and config.classifier_dense else "")
        raise CheckpointError(
            f"config {config.name!r} (task={config.task}{pooler}) has no Hugging Face equivalent among "
            f"{sorted(FAMILIES)} (position={config.position}, norm={config.norm_class}, mlp={config.mlp_class}); "
            f"save it with format='allformers'")
    state = cast_state(ours_to_hf(contiguous_state(model.state_dict()), config, family), dtype)
    if config.tie_embeddings and family.tied_hf_key:
        state.pop(family.tied_hf_key, None)
    hf_config = {"model_type": family.model_type, "architectures": [architecture(family, config)],
                 "dtype": str(dtype or torch.float32).removeprefix("torch."), **family.config_to_hf(config)}
    if config.task in ("sequence-classification", "token-classification"):
        names = config.labels or [f"LABEL_{i}" for i in range(config.num_labels)]
        hf_config["id2label"] = {str(i): n for i, n in enumerate(names)}
        hf_config["label2id"] = {n: i for i, n in enumerate(names)}
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)

    def write(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
        if config.task == "embedding":  # sentence-transformers' way of saying how to pool
            (tmp / "1_Pooling").mkdir()
            (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
                {"word_embedding_dimension": config.n_embd, "pooling_mode_cls_token": config.pooling == "first",
                 "pooling_mode_mean_tokens": config.pooling == "mean"}, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_folder_write(path, write, overwrite=overwrite)
