"""The policy as ``train`` trains it, for the duration of the run: a LoRA adapter (peft_config), dropout off, the
speed-ups (speedups.py), gradient checkpointing. Each is undone when ``train`` returns or raises, but the adapter,
which holds what was trained (``TrainResult.model``)."""

from __future__ import annotations

import contextlib

import torch

from .adapters import adapter_added
from .config import TrainConfig
from .speedups import speedups_applied

__all__ = ["prepared", "dropout_disabled", "gradient_checkpointing"]


@contextlib.contextmanager
def dropout_disabled(model: torch.nn.Module, disable: bool):
    """Every nn.Dropout's p set to 0 inside the block (as TRL does), its own p back afterwards."""
    dropouts = [(module, module.p) for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    for module, _ in dropouts if disable else ():
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in dropouts:
            module.p = p


def _checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enable: bool):
    """transformers' activation checkpointing (non-reentrant) inside the block, where asked and not already on;
    switched off again afterwards, with the input-embedding hook transformers adds for it."""
    if not enable or _checkpointing_on(model):
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support it (transformers' "
            "supports_gradient_checkpointing is False); train with gradient_checkpointing=False"
        )
    hooked = bool(getattr(model, "_require_grads_hooks", None))
    enable_checkpointing = getattr(model, "activation_checkpointing_enable", None)  # gradient_checkpointing_enable's
    # current name in transformers (the old one is its deprecated alias)
    if enable_checkpointing is not None:
        enable_checkpointing(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        yield
    finally:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if not hooked and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()


def check_trainable(model: torch.nn.Module, config: TrainConfig) -> None:
    """Some parameter must require a gradient (a peft_config adds its own)."""
    if config.peft_config is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"no parameter of {type(model).__name__} requires a gradient: nothing would train (a PeftModel loaded "
            "without is_trainable=True?); set requires_grad on the weights to train"
        )


@contextlib.contextmanager
def prepared(model: torch.nn.Module, config: TrainConfig):
    """The policy to train, inside the block: ``model`` with a LoRA adapter added (``config.peft_config``; the
    PeftModel is yielded and kept afterwards), its dropout off (``disable_dropout``), the speed-ups of
    ``config.speedups`` applied, and gradient checkpointing on where asked; all of it but the adapter undone on
    leaving, normally or by an exception (the adapter too, then)."""
    with contextlib.ExitStack() as restore:
        if config.peft_config is not None:
            model = restore.enter_context(adapter_added(model, config.peft_config))
        restore.enter_context(dropout_disabled(model, config.disable_dropout))
        restore.enter_context(speedups_applied(model, config.speedups))
        restore.enter_context(gradient_checkpointing(model, config.gradient_checkpointing))
        yield model
