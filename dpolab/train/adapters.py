"""LoRA (and peft's other weight adapters) through ``peft``, the ``dpolab[peft]`` extra.

With ``TrainConfig(peft_config=peft.LoraConfig(...))``, ``train`` wraps the policy with peft's ``get_peft_model``, as
TRL's ``DPOTrainer(peft_config=...)`` does: every base weight W is frozen and only the adapter trains, a linear layer
computing W x + (alpha / r) B A x with A (r x d_in) and B (d_out x r), B = 0 at the start. The reference pi_ref is the
base model itself, the adapter disabled (``PeftModel.disable_adapter``), as in TRL; its log-probs are precomputed
once before the first step (``reference.py``), so no second copy of the weights is ever held.

A model that is already a ``PeftModel`` is trained as it is (its trainable adapter), and its reference is that model
as it was given, adapter included: TRL 1.16 copies such an adapter into a frozen "ref" adapter, which gives the same
reference log-probs; dpolab computes them once instead. A ``PeftModel`` together with a ``peft_config`` is refused,
as TRL refuses it.

The speed-ups of ``speedups.py`` stay exact: each matches GPT-2's plain modules by exact type (``Conv1D``,
``nn.LayerNorm``, ``nn.Embedding``), so a layer peft wrapped is left alone, and a frozen weight only loses its
gradient. The lean LM head (``dpolab.lm_head``) looks through the wrapper; an adapter on the head itself makes it fall
back to the model's own logits.

Saved adapters (checkpoints, ``dpolab train``'s ``model/``) are peft's two files, ``adapter_model.safetensors`` and
``adapter_config.json`` (its ``base_model_name_or_path`` written as ``dpolab.files.portable_text`` writes paths), so
``PeftModel.from_pretrained(base, folder)`` and ``dpolab.models.load_model(folder)`` load them.
``merge_adapter`` folds an adapter into its base weights: a plain transformers model.
"""

from __future__ import annotations

import contextlib
import enum
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_text, portable_text

__all__ = [
    "ADAPTER_WEIGHTS",
    "ADAPTER_CONFIG",
    "is_peft_model",
    "peft_config_dict",
    "peft_config_object",
    "add_adapter",
    "adapter_added",
    "adapter_state_dict",
    "load_adapter_state_dict",
    "save_adapter",
    "merge_adapter",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)
ADAPTER_CONFIG = "adapter_config.json"
# Fields of a peft config's dict that describe where and with what it ran, not the adapter: left out of TrainConfig.
_PROVENANCE = ("peft_version", "base_model_name_or_path", "auto_mapping", "inference_mode")
_SHOWN = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules")  # kept even at their defaults


def _peft(what: str):
    try:
        import peft
    except ImportError as error:
        raise ValueError(
            f"{what} needs the peft package, which is not installed: pip install 'dpolab[peft]' (or pip install peft)"
        ) from error
    return peft


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft: a PeftModel exists only once it is)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _plain(value):
    """A peft config value as JSON: sets as sorted lists, enums as their values, nested containers converted."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def peft_config_object(config):
    """A fresh ``peft.PeftConfig`` from a PeftConfig or its dict (``{"peft_type": "LORA", "r": 8, ...}``)."""
    peft = _peft("peft_config")
    if isinstance(config, peft.PeftConfig):
        config = config.to_dict()
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(
            f"peft_config must be a peft config (e.g. peft.LoraConfig(r=8, target_modules=['q_proj', 'v_proj'])) or "
            f"its dict with a 'peft_type', got {config!r:.80}"
        )
    kwargs = {k: v for k, v in config.items() if k not in ("peft_version", "auto_mapping")}
    try:
        return peft.get_peft_config(kwargs)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"peft_config {config!r:.120} is not a valid peft config: {error}") from error


def peft_config_dict(config) -> dict[str, Any]:
    """The JSON form ``TrainConfig`` keeps of a peft config: its type, task, LoRA's rank, alpha, dropout and target
    modules where it has them, and every other field that differs from that config class's default (lists for sets),
    without peft's version and the base model's name."""
    obj = peft_config_object(config)
    full = _plain(obj.to_dict())
    try:
        defaults = _plain(type(obj)().to_dict())
    except (TypeError, ValueError):  # a config class with required fields: keep them all
        defaults = {}
    out = {k: full[k] for k in _SHOWN if k in full}
    out.update({k: v for k, v in full.items() if k not in _PROVENANCE and k not in out and defaults.get(k, ...) != v})
    try:
        json.dumps(out)
    except TypeError as error:
        raise ValueError(f"peft_config: a field cannot be written as JSON ({error}); give plain values") from error
    return out


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The leaf names of the model's linear layers (nn.Linear, transformers' Conv1D), what LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return sorted(names)


def add_adapter(model: torch.nn.Module, config) -> torch.nn.Module:
    """``peft.get_peft_model(model, config)``: the adapter layers are put into ``model`` in place and its own weights
    frozen (peft's behaviour); returns the PeftModel. One clear line when the config targets no module of the model,
    when ``model`` already is a PeftModel, or for a prompt-learning method (virtual tokens, not weights)."""
    peft = _peft("peft_config")
    if is_peft_model(model):
        raise ValueError(
            "peft_config: the model already is a PeftModel (it has an adapter): train it without peft_config to "
            "train that adapter, or merge it first (dpolab.train.merge_adapter) and pass the merged model with "
            "peft_config (TRL refuses this too)"
        )
    config = peft_config_object(config)
    if config.is_prompt_learning:
        raise ValueError(
            f"peft_config: {config.peft_type.value} adds virtual tokens, not weights; dpolab trains weight adapters "
            "(LoRA, DoRA, LoHa, IA3, ...): use peft.LoraConfig"
        )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # peft's NoMatchingPeftModuleError is a ValueError, as is "specify target_modules"
        targets = getattr(config, "target_modules", None)
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        said = " ".join(str(error).split())  # peft's own words, on one line
        raise ValueError(
            f"peft_config: target_modules {targets!r} match no module of {type(model).__name__} ({said}); its linear "
            f"layers are {', '.join(_linear_names(model))}: target some of them (--lora-target q_proj v_proj) or "
            "'all-linear'"
        ) from error


@contextlib.contextmanager
def adapter_added(model: torch.nn.Module, config):
    """:func:`add_adapter` for a block that returns the PeftModel on success; if the block raises, the adapter is
    taken out again (peft's ``unload``: the model's own modules back in place) and every weight's ``requires_grad``
    restored, so the caller's model is as it was."""
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    wrapped = add_adapter(model, config)
    try:
        yield wrapped
    except BaseException:
        wrapped.unload()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise


def _active(model) -> str:
    active = model.active_adapter
    return active if isinstance(active, str) else active[0]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The active adapter's weights, as peft saves them (the base weights are not in it)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=_active(model), save_embedding_layers=False)


def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`adapter_state_dict`'s tensors into ``model``'s active adapter; every key must match."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"the adapter weights do not match the model's adapter: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    result = set_peft_model_state_dict(model, state, adapter_name=_active(model))
    if result.unexpected_keys:
        raise ValueError(
            f"the adapter weights do not match the model's adapter: unexpected {result.unexpected_keys[:5]}"
        )


def save_adapter(model, folder: str | Path) -> None:
    """peft's adapter files in ``folder``: ``adapter_model.safetensors`` (the active adapter's weights) and
    ``adapter_config.json`` (inference mode, as peft's ``save_pretrained`` writes it; paths made portable)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = _plain(model.peft_config[_active(model)].to_dict())
    config["inference_mode"] = True
    base = config.get("base_model_name_or_path")
    if base and Path(base).expanduser().is_dir():  # a folder: found from anywhere (home written as ~)
        config["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
    atomic_write_text(folder / ADAPTER_CONFIG, portable_text(json.dumps(config, indent=2, sort_keys=True)))


def merge_adapter(model) -> torch.nn.Module:
    """The adapter folded into the base weights, W + (alpha / r) B A (peft's ``merge_and_unload``): a plain
    transformers model that computes what the adapted model computed, to float rounding. The PeftModel is consumed:
    its base model is the returned one."""
    if not is_peft_model(model):
        raise ValueError(f"merge_adapter: {type(model).__name__} has no adapter to merge (not a peft.PeftModel)")
    return model.merge_and_unload()
