"""``mmalign export``: a trained model as a folder that plain ``transformers`` or ``open_clip`` loads.

LoRA adapters are merged first (peft ``merge_and_unload``); a linear projection head is folded into the
checkpoint's own projection where the architecture has one (``W' = A W``), so nothing mmalign-specific is needed
to compute the embeddings. Every layout also writes ``mmalign_export.json`` describing what it wrote.

``--format hf``
    layout ``dual``: every tower came from one HF dual encoder (``tower: hf_clip`` on the same checkpoint) and every
    head folds (``proj: none``, or ``linear`` where the checkpoint has a projection). The folder is that checkpoint's
    class (``CLIPModel``, ``SiglipModel``, ...) with tokenizer and image processor;
    ``normalize(CLIPModel.from_pretrained(DIR).get_image_features(x).pooler_output)`` is the embedding, and
    ``logit_scale`` (and ``logit_bias``) hold the trained values.

    layout ``towers``: otherwise. One folder per modality with a transformers model (``save_pretrained``) and its
    tokenizer / image processor / audio feature extractor, plus ``heads.safetensors`` and ``mmalign_export.json``.
    For modality NAME (``spec = json["modalities"][NAME]``; the class lives in ``spec["module"]``, which is
    ``transformers`` itself for all but a few, e.g. Whisper's encoder)::

        hidden  = getattr(import_module(spec["module"]), spec["class"]).from_pretrained(DIR / folder)(**inputs)
        pooled  = hidden.pooler_output                      # "pooling": "pooler_output"
                | hidden.audio_embeds                       # "audio_embeds" (a CLAP audio tower with projection)
                | mean of last_hidden_state over the attention mask   # "mean" (audio: over the frames
                                                                      #  holding signal)
                | last_hidden_state[:, 0]                   # "cls"

    Audio inputs come from the exported feature extractor (``AutoFeatureExtractor.from_pretrained(DIR / folder)``)
    on a clip at ``sample_rate`` cut to ``clip_seconds`` (``eval_crop`` says where; ``windows`` averages
    ``eval_windows`` crops' embeddings).
        for layer in "head": x = x @ W.T + b ("linear": heads[weight], heads[bias] or no bias) | activation (by name)
        embedding = x / ||x||

``--format open_clip``
    Both towers are ``open_clip`` towers of one architecture: ``open_clip_config.json`` (``model_cfg`` +
    ``preprocess_cfg``) and ``open_clip_model.safetensors``, loaded with
    ``open_clip.create_model("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import ConfigError
from .io import atomic_dir, write_json
from .modalities import TOWERS
from .model_card import write_model_card

log = logging.getLogger(__name__)

EXPORT_INFO = "mmalign_export.json"
HEADS_NAME = "heads.safetensors"
ACTIVATIONS = {"GELU": "gelu", "GELUActivation": "gelu", "ReLU": "relu", "SiLU": "silu", "Tanh": "tanh",
               "QuickGELUActivation": "quick_gelu"}


def export_model(model, out: str | Path, fmt: str = "hf", run: dict | None = None) -> dict:
    """Write ``model`` (an ``AlignmentModel``; its LoRA adapters get merged in place) to ``out`` as ``fmt``, with a
    model card (``README.md``) that takes the name, recipe and results of ``run``, the run the model comes from
    (``rundir.source_run``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    if model.config.caption is not None:
        raise ConfigError("export: captioning (CoCa) models have no hf/open_clip export; use the saved model "
                          "folder itself (AlignmentModel.from_pretrained, mmalign caption --model)")
    model.merge_lora().eval()
    with atomic_dir(out) as tmp:
        info = FORMATS[fmt](model, tmp)
        info.update(format=fmt, embed_dim=model.config.embed_dim, logit_scale=model.logit_scale().item(),
                    logit_bias=model.logit_bias.item() if model.logit_bias is not None else None)
        write_json(tmp / EXPORT_INFO, info)
        write_model_card(model, tmp, info, run)
    log.info("exported %s (%s) to %s", fmt, info.get("layout", fmt), out)
    return {"export_dir": str(out), "format": fmt, "layout": info.get("layout", fmt)}


# ------------------------------------------------------------------------------------------------ folding heads


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def fold_linear(weight: torch.Tensor, bias: torch.Tensor | None, head: nn.Linear) -> tuple:
    """``head(W x + b)`` as one linear map: ``(A W, A b)`` for a bias-free head ``A``."""
    a = head.weight.detach()
    return a @ weight, (a @ bias if bias is not None else None)


def head_layers(module: nn.Module) -> list[nn.Module]:
    """A projection head as a flat list of ``nn.Linear`` and activation modules, applied in order: a Sequential, or
    a module made of linear layers and activations only, registered in the order it applies them (transformers'
    projection layers, e.g. CLAP's ``ClapProjectionLayer``: linear, activation, linear)."""
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, nn.Linear) or type(module).__name__ in ACTIVATIONS:
        return [module]
    children = list(module.children())
    if isinstance(module, nn.Sequential) or (children and all(
            isinstance(c, nn.Linear) or type(c).__name__ in ACTIVATIONS for c in children)):
        return [layer for child in children for layer in head_layers(child)]
    raise ConfigError(f"cannot describe head {type(module).__name__} as linear layers and activations")


def describe_head(prefix: str, layers: list[nn.Module], tensors: dict) -> list[dict]:
    """JSON description of ``layers``; their weights go to ``tensors`` as ``prefix.i.weight``/``prefix.i.bias``."""
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            tensors[f"{prefix}.{i}.weight"] = layer.weight.detach().contiguous()
            if layer.bias is not None:
                tensors[f"{prefix}.{i}.bias"] = layer.bias.detach().contiguous()
            out.append({"type": "linear", "weight": f"{prefix}.{i}.weight",
                        "bias": f"{prefix}.{i}.bias" if layer.bias is not None else None})
        else:
            out.append({"type": ACTIVATIONS[type(layer).__name__]})
    return out


# ------------------------------------------------------------------------------------------------ hf


def export_hf(model, out: Path) -> dict:
    dual = dual_encoder(model)
    if isinstance(dual, str):
        log.info("writing one transformers folder per modality: %s", dual)
        return {**export_hf_towers(model, out), "why_not_dual": dual}
    dual.save_pretrained(out)
    preprocessing = save_preprocessors(model, out, list(model.adapters))
    return {"layout": "dual", "class": type(dual).__name__, "modalities": preprocessing}


def writers(model, fmt: str) -> dict:
    """Modality name -> its tower spec's writer for ``fmt`` (modalities whose tower has one)."""
    specs = {name: model.modalities[name].spec for name in model.adapters}
    return {name: spec.export[fmt] for name, spec in specs.items() if fmt in spec.export}


def dual_encoder(model):
    """The HF dual-encoder model equal to ``model``, or the reason there is none (a string)."""
    from transformers import AutoModel

    parts = writers(model, "hf_dual")
    if len(parts) != len(model.adapters):
        return "not every tower is hf_clip"
    towers = {name: write(model.adapters[name].tower) for name, write in parts.items()}
    first = next(iter(towers.values()))
    if len({architecture(t.model.config) for t in towers.values()}) > 1:
        return "the hf_clip towers come from different checkpoints"
    if len({t.part for t in towers.values()}) != len(towers):
        return "two modalities use the same part of the checkpoint"
    state: dict[str, torch.Tensor] = {}
    for name, tower in towers.items():
        sd = dict(tower.model.state_dict())
        head = model.adapters[name].proj
        if isinstance(head, nn.Linear) and tower.projection_name:
            inner, linear = last_linear(getattr(tower.model, tower.projection_name))
            key = ".".join(k for k in (tower.projection_name, inner) if k)
            sd[f"{key}.weight"], bias = fold_linear(linear.weight.detach(), linear.bias, head)
            if bias is not None:
                sd[f"{key}.bias"] = bias
        elif not isinstance(head, nn.Identity):
            return f"modality {name}: a {model.config.modalities[name].proj} head does not fold into the checkpoint"
        state.update(sd)
    config = copy.deepcopy(first.model.config)
    if getattr(config, "projection_dim", None) not in (None, model.config.embed_dim):
        config.projection_dim = model.config.embed_dim
        for sub in ("text_config", "vision_config", "audio_config"):
            if hasattr(getattr(config, sub, None), "projection_dim"):
                getattr(config, sub).projection_dim = model.config.embed_dim
    dual = AutoModel.from_config(config)
    try:
        result = dual.load_state_dict(state, strict=False)
    except RuntimeError as e:
        return f"the folded weights do not fit {type(dual).__name__} ({str(e).splitlines()[-1].strip()})"
    towers_missing = [k for k in result.missing_keys if not k.startswith("logit_")]
    if towers_missing or result.unexpected_keys:
        return f"weights do not match {type(dual).__name__}: {(towers_missing + result.unexpected_keys)[:3]}"
    with torch.no_grad():  # logit_scale (ClapModel: logit_scale_a and logit_scale_t, one per direction), logit_bias
        for name, p in dual.named_parameters(recurse=False):
            if name.startswith("logit_scale"):
                p.copy_(model.log_logit_scale.detach())
            elif name == "logit_bias":
                p.fill_(model.logit_bias.item() if model.logit_bias is not None else 0.0)
    return dual


def architecture(config) -> str:
    """A config as JSON without where it was loaded from: equal for towers cut from one checkpoint."""
    return json.dumps({k: v for k, v in config.to_dict().items() if k != "_name_or_path"}, sort_keys=True,
                      default=str)


def export_hf_towers(model, out: Path) -> dict:
    tensors: dict[str, torch.Tensor] = {}
    modalities: dict[str, Any] = {}
    hf = writers(model, "hf")
    for name, adapter in model.adapters.items():
        if name not in hf:
            cfg = model.config.modalities[name]
            raise ConfigError(f"modality {name!r}: export hf writes HF towers ({towers_with('hf')}), not the "
                              f"{cfg.kind} tower {cfg.tower!r} (open_clip towers: --format open_clip)")
        part = hf[name](adapter.tower)
        head = [layer for module in part.head for layer in head_layers(module)] + head_layers(adapter.proj)
        part.model.save_pretrained(out / name)
        modalities[name] = {"folder": name, "class": type(part.model).__name__, "module": module_of(part.model),
                            "pooling": part.pooling, "head": describe_head(name, head, tensors)}
    preprocessing = save_preprocessors(model, out, list(model.adapters), per_modality=True)
    for name in modalities:
        modalities[name].update(preprocessing[name])
    save_file(tensors, str(out / HEADS_NAME))
    return {"layout": "towers", "heads": HEADS_NAME, "modalities": modalities}


def towers_with(fmt: str) -> str:
    """The registered towers a format exports, by kind: "text hf/hf_clip, image hf_clip, ..."."""
    kinds = {kind: "/".join(n for n, spec in towers.items() if fmt in spec.export) for kind, towers in TOWERS.items()}
    return ", ".join(f"{kind} {names}" for kind, names in kinds.items() if names)


def module_of(net: nn.Module) -> str:
    """Where to import ``net``'s class from: ``transformers`` when it is exported there, else its own module."""
    import transformers

    return "transformers" if hasattr(transformers, type(net).__name__) else type(net).__module__


def save_preprocessors(model, out: Path, names: list[str], per_modality: bool = False) -> dict[str, dict]:
    """Tokenizers, image processors and audio feature extractors next to the weights; returns each modality's
    preprocessing settings."""
    info = {}
    for name in names:
        m = model.modalities[name]
        info[name] = {"kind": m.kind, **m.save_hf_preprocessor(out / name if per_modality else out)}
    return info


# ------------------------------------------------------------------------------------------------ open_clip


def fold_into(state: dict, key: str, head: nn.Module) -> None:
    """Fold a linear head into the projection at ``key``: a parameter used as ``x @ P`` or an ``nn.Linear``."""
    if isinstance(head, nn.Identity):
        return
    if not isinstance(head, nn.Linear):
        raise ConfigError("open_clip export: only proj none or linear fold into open_clip's projections")
    if f"{key}.weight" in state:
        state[f"{key}.weight"], bias = fold_linear(state[f"{key}.weight"], state.get(f"{key}.bias"), head)
        if bias is not None:
            state[f"{key}.bias"] = bias
    elif key in state:
        state[key] = state[key] @ head.weight.detach().T
    else:
        raise ConfigError(f"open_clip export: no projection {key!r} to fold the linear head into")


def export_open_clip(model, out: Path) -> dict:
    import open_clip

    parts = {name: write(model.adapters[name].tower) for name, write in writers(model, "open_clip").items()}
    images = [n for n, p in parts.items() if p.part == "image"]
    texts = [n for n, p in parts.items() if p.part == "text"]
    if len(images) != 1 or len(texts) != 1 or len(model.adapters) != 2:
        raise ConfigError("export open_clip needs exactly one open_clip image tower and one open_clip text tower")
    image, text = parts[images[0]], parts[texts[0]]
    if image.model_name != text.model_name:
        raise ConfigError(f"export open_clip: the towers are different architectures "
                          f"({image.model_name} vs {text.model_name})")
    model_cfg = {**copy.deepcopy(image.model_cfg), "text_cfg": copy.deepcopy(text.model_cfg["text_cfg"]),
                 "embed_dim": model.config.embed_dim}
    state = {**image.state, **text.state}
    fold_into(state, image.projection, model.adapters[images[0]].proj)
    fold_into(state, text.projection, model.adapters[texts[0]].proj)
    state["logit_scale"] = model.log_logit_scale.detach().clone()  # open_clip's: a 0-dim log scale
    if model_cfg.get("init_logit_bias") is not None:  # an architecture with a bias (SigLIP) needs one
        bias = model.logit_bias if model.logit_bias is not None else torch.tensor(model_cfg["init_logit_bias"])
        state["logit_bias"] = bias.detach().reshape(()).clone()
    cfg = model.modalities[images[0]].cfg
    preprocess = {"size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std),
                  "interpolation": cfg.interpolation, "resize_mode": cfg.resize_mode}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                          indent=2))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "open_clip_model.safetensors"))
    try:  # load it as a user would: open_clip checks every key and shape
        open_clip.create_model(f"local-dir:{out}")
    except RuntimeError as e:
        raise ConfigError(f"export open_clip: weights do not fit the architecture: {str(e).splitlines()[-1]}")
    return {"layout": "open_clip", "model_cfg": model_cfg, "preprocess_cfg": preprocess}


FORMATS = {"hf": export_hf, "open_clip": export_open_clip}
