"""Which LM head dpolab may take on a model: its own lean head, or the model's full forward (notebook 06).

The lean path of ``dpolab.logprobs`` runs the transformer body (``model.base_model``) and applies the LM head
(``model.get_output_embeddings()``, a linear map) at the scored positions only. A model's own forward may do more
between the two, and the log-probs must be those of the model's own logits (eq. 6.1), so:

- the post-head transforms that transformers' causal LMs apply are applied here too, as ``LogitTransform``:
  logits z -> c tanh(s z / c), with s the logit scale (Cohere's ``logit_scale`` multiplies, Granite's
  ``logits_scaling`` divides) and c the final-logit soft-cap (Gemma-2/3's ``final_logit_softcapping``), or s z
  without a cap. The fused head ``linear_log_softmax`` takes s and c; its backward multiplies eq. (6.8)'s
  d/dz' by dz'/dz = s (1 - (z'/c)^2), or s;
- a PEFT-wrapped model (``peft.PeftModel``) is looked through to the transformers model it wraps, whose body and
  head carry the adapters;
- whatever else a model does, a one-time probe decides: on the first call with a model, the first row's first
  ``PROBE_TOKENS`` tokens go through the model's own forward and through the lean path (eval mode, no gradient,
  no autocast, in the weights' dtype), and the lean path is taken only if its log-softmax equals the model's to
  the dtype's rounding. Otherwise dpolab falls back to the model's own forward logits, and says so once per model
  class and reason (a ``logging`` warning). The probe draws no random numbers, leaves every module's train/eval
  mode as it was and runs once per model object, so it changes no result.

Which way each model went is kept in a weak dictionary keyed by the model (nothing is stored on the model).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "LogitTransform",
    "logit_transform",
    "LeanHead",
    "lean_head",
    "attention_implementation",
    "probing",
    "close",
    "say_once",
]

logger = logging.getLogger("dpolab")

PROBE_TOKENS = 16  # tokens of the first row the probe runs through both paths


@dataclass(frozen=True)
class LogitTransform:
    """z -> c tanh(s z / c) (``softcap`` c), or s z without a cap: what a model does to its LM head's output.

    Cohere: s = ``config.logit_scale``; Granite: s = 1 / ``config.logits_scaling``; Gemma-2/3: c =
    ``config.final_logit_softcapping``. The identity is s = 1, no cap.
    """

    scale: float = 1.0  # s, multiplies the head's logits
    softcap: float | None = None  # c, caps |logits| below c smoothly; None: no cap

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The transform, out of place (autograd differentiates it): (..., V) -> (..., V)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def logit_transform(config) -> LogitTransform:
    """The post-head transform a transformers config names (TRL's reading of the same fields): ``logit_scale``
    (Cohere, multiplies), ``logits_scaling`` (Granite, divides; HyperCLOVA X multiplies), ``final_logit_softcapping``
    (Gemma-2/3). The probe in ``lean_head`` checks it against the model's own forward."""
    config = _text_config(config)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if scale is None and divisor is not None:
        scale = divisor if getattr(config, "model_type", None) == "hyperclovax" else 1 / divisor
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(
        scale=1.0 if not isinstance(scale, (int, float)) else float(scale),
        softcap=float(softcap) if isinstance(softcap, (int, float)) and softcap > 0 else None,
    )


@dataclass(frozen=True)
class LeanHead:
    """The lean path's parts: logits = transform(hidden @ weight.T + bias), hidden = body(...).last_hidden_state."""

    body: torch.nn.Module  # the transformer body: returns last_hidden_state
    weight: torch.Tensor  # (V, D) the LM head's weight
    bias: torch.Tensor | None  # (V,) or None
    transform: LogitTransform


_said: set[str] = set()
_decisions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> LogitTransform | None (fallback)


def say_once(message: str) -> None:
    """A ``logging`` warning on the "dpolab" logger, the first time ``message`` comes up in this process."""
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (``PeftModel.get_base_model``), else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | str:
    """(body, head) of the lean path, or why the model has none."""
    inner = _inner(model)
    body = getattr(inner, "base_model", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(body, torch.nn.Module) or body is inner:
        return "it has no transformer body apart from its head (base_model)"
    if type(head) is not torch.nn.Linear or not head.weight.is_floating_point():
        return f"its output embedding is {type(head).__name__}, not a floating-point torch.nn.Linear"
    return body, head


def attention_implementation(model: torch.nn.Module) -> str:
    """The model's attention implementation as transformers records it (``config._attn_implementation``)."""
    return getattr(_inner(model).config, "_attn_implementation", None) or "eager"


@contextlib.contextmanager
def probing(model: torch.nn.Module):
    """Eval mode (no dropout, no random numbers drawn), no gradient, no autocast; every module's mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device.type
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device, enabled=False):
            yield
    finally:
        for module, training in modes:
            module.training = training


def close(lean: torch.Tensor, own: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether log-probabilities ``lean`` agree with ``own`` to the rounding of a model computed in ``dtype``."""
    rtol = 1e-5 if torch.finfo(dtype).bits >= 32 else 3e-2
    return bool(((lean - own).abs().max() <= rtol * (1 + own.abs().max())).item())


def _probe(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[LogitTransform | None, str]:
    """(the transform of the lean path, "") if it gives the model's own log-softmax on the first tokens of
    ``input_ids``, else (None, why not)."""
    ids = input_ids[:1, :PROBE_TOKENS]
    every = torch.ones_like(ids)  # attend to every token (pad tokens included: a plain sequence)
    with probing(model):
        try:
            own = model(input_ids=ids, attention_mask=every, use_cache=False).logits
        except Exception as error:  # nothing dpolab can compute log-probs from
            raise TypeError(
                f"{type(model).__name__}(input_ids=...) gives no logits ({type(error).__name__}: {error}); "
                "dpolab needs a causal LM whose forward returns .logits (transformers' AutoModelForCausalLM)"
            ) from error
        parts = _parts(model)
        if isinstance(parts, str):
            return None, parts
        body, head = parts
        try:
            hidden = body(input_ids=ids, attention_mask=every, use_cache=False).last_hidden_state
        except Exception as error:
            return None, f"its base_model gives no last_hidden_state ({type(error).__name__})"
        z = F.linear(hidden, head.weight, head.bias).float()
        if z.shape != own.shape:
            return None, f"its logits have shape {tuple(own.shape)}, its head's {tuple(z.shape)}"
        own = torch.log_softmax(own.float(), -1)
        known = logit_transform(_inner(model).config)
        for transform in dict.fromkeys((known, LogitTransform())):
            if close(torch.log_softmax(transform(z), -1), own, head.weight.dtype):
                return transform, ""
    named = "" if known.identity else f" (nor after {known})"
    return None, f"its logits are not its head's output under any post-head transform dpolab knows{named}"


def lean_head(model: torch.nn.Module, input_ids: torch.Tensor) -> LeanHead | None:
    """The lean path's parts for ``model``, or None where its log-probs must come from its own forward logits.

    Decided once per model object by ``_probe`` on ``input_ids`` (the first call's batch); a fallback is said once.
    """
    if model not in _decisions:
        transform, why = _probe(model, input_ids)
        _decisions[model] = transform
        if transform is None:
            say_once(
                f"dpolab: {type(model).__name__}: {why}; its log-probs come from the model's own forward logits "
                "(exact, but slower, with all B x L x V logits in memory)"
            )
    transform = _decisions[model]
    if transform is None:
        return None
    body, head = _parts(model)
    return LeanHead(body, head.weight, head.bias, transform)
