"""Reference log-probs, computed once before training and cached on disk.

The DPO family needs log pi_ref(y_w|x) and log pi_ref(y_l|x) for every pair (eq. 4.2 of notebook 04), listwise DPO
log pi_ref(y_k|x) for the K completions of every ranking (eq. 5.2 of notebook 05). pi_ref is
frozen, so they are the same at every step: computing them once, before the first step, saves one forward per
step and frees the memory a second model would hold. When no separate reference is given, the policy itself
before training is the reference (pi_ref = pi_theta at step 0).

The cache key is a hash of everything the numbers depend on: the model's weights (names, dtypes, shapes and
bytes) and class, the tokenized data (which carries the tokenizer and the truncation), the tokenizer's name
and size, the reduction and the precision, and a note for a model scored in another state than its weights say (a
PEFT model with its adapter disabled). Change any of them and the log-probs are recomputed.

``score_completions`` is the scoring itself, without the cache: ``train`` also scores its policy on eval pairs with it.
``reference_logps`` is what ``train`` computes with its config, and what the Penn experiment computes ahead of it
(``reference_cached``: whether that is on disk already).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..data.collate import PreferenceCollator, completion_parts, n_completions
from ..data.packing import PackedPreferenceCollator
from ..device import autocast_dtype
from ..files import atomic_directory, cache_root
from ..logprobs import listwise_logps
from .config import TrainConfig

__all__ = [
    "weights_hash",
    "examples_hash",
    "reference_cache_path",
    "score_completions",
    "precompute_reference_logps",
    "precompute_reference_list_logps",
    "reference_logps",
    "reference_cached",
]


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's class and its state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def examples_hash(examples: Sequence[dict[str, Any]]) -> str:
    """sha256 over the token ids of tokenized examples, in order (with each sequence's own kept prompt where
    ``keep_end`` truncation gave one); a ranking's K completions in its order."""
    digest = hashlib.sha256()
    for ex in examples:
        if "completions_ids" in ex:
            parts = [ex["prompt_ids"], *ex["completions_ids"], *ex.get("completions_prompt_ids", ())]
        else:
            parts = [ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]]
            if "chosen_prompt_ids" in ex:
                parts += [ex["chosen_prompt_ids"], ex["rejected_prompt_ids"]]
        digest.update(json.dumps(parts).encode())
    return digest.hexdigest()


def reference_cache_path(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    tokenizer,
    *,
    reduction: str = "sum",
    autocast_dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    note: str | None = None,
) -> Path:
    """The file that holds the reference log-probs of tokenized ``examples`` once :func:`precompute_reference_logps`
    has computed them with these arguments: ``<cache_dir>/<key>/logps.safetensors``, the key hashing everything the
    numbers depend on (see the module docstring); ``cache_dir`` None: $DPOLAB_CACHE/ref-logps. ``.exists()`` asks
    whether they are cached. ``note`` names a state of the model its weights do not show (e.g. "adapter
    disabled")."""
    digest = hashlib.sha256()
    digest.update(weights_hash(model).encode())
    meta = {
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "vocab": len(tokenizer),
        "reduction": reduction,
        "precision": "fp32" if autocast_dtype is None else str(autocast_dtype),
    }
    if note is not None:  # absent otherwise: the keys of every earlier cache stay valid
        meta["note"] = note
    digest.update(json.dumps(meta, sort_keys=True).encode())
    digest.update(examples_hash(examples).encode())
    key = digest.hexdigest()[:32]
    return Path(cache_dir or cache_root() / "ref-logps") / key / "logps.safetensors"


def _n_tokens(example: dict[str, Any]) -> int:
    return len(example["prompt_ids"]) + sum(len(own) + len(ids) for own, ids in completion_parts(example))


@torch.no_grad()
def _compute(model, examples, collate, *, batch_size, device, autocast_dtype, reduction, rank, world_size):
    """(K, N) log-probs (K = 2: chosen, rejected); each process scores every world_size-th batch, the sum over
    processes fills them all."""
    order = sorted(range(len(examples)), key=lambda i: -_n_tokens(examples[i]))
    K = n_completions(examples)
    out = torch.zeros(K, len(examples), dtype=torch.float32, device=device)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]  # similar lengths: little padding
    for batch_indices in batches[rank::world_size]:
        batch = collate([examples[i] for i in batch_indices])
        batch = {k: v.to(device) for k, v in batch.items() if k != "index"}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logps = listwise_logps(model, batch, K, reduction=reduction)  # (b, K); pairs: (chosen, rejected)
        out[:, batch_indices] = logps.float().t()
    if world_size > 1:
        dist.all_reduce(out)  # rows are disjoint across processes: the sum gathers them
    return out


def score_completions(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    tokenizer,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    reduction: str = "sum",
    rank: int = 0,
    world_size: int = 1,
    packing: bool = True,
) -> torch.Tensor:
    """(K, N) float32 log-probs on ``device`` of every completion of the tokenized ``examples`` (eq. 6.1; pairs: K = 2,
    chosen then rejected), in batches of ``batch_size`` examples of similar length, without gradients and with
    ``model`` in eval mode (left in the mode it was in). Under torch.distributed every process scores a share and all
    get every row. ``packing``: shared-prefix packed batches (``dpolab.data.packing``; the model's attention must be
    sdpa or eager), else the padded K*B-row batches; the same numbers to float tolerance."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id or 0
    collate = PackedPreferenceCollator(pad) if packing else PreferenceCollator(pad_token_id=pad)  # prompt once
    try:
        return _compute(
            model,
            examples,
            collate,
            batch_size=batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            reduction=reduction,
            rank=rank,
            world_size=world_size,
        )
    finally:
        model.train(was_training)


def precompute_reference_logps(model: torch.nn.Module, examples: Sequence[dict[str, Any]], tokenizer, **kwargs):
    """``(ref_chosen_logps, ref_rejected_logps)``, each (N,) float32 on CPU, for the tokenized pairs ``examples``
    (:func:`precompute_reference_list_logps` for the arguments)."""
    logps = precompute_reference_list_logps(model, examples, tokenizer, **kwargs)
    return logps[:, 0], logps[:, 1]


def precompute_reference_list_logps(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    tokenizer,
    *,
    batch_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    reduction: str = "sum",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    rank: int = 0,
    world_size: int = 1,
    packing: bool = True,
    cache_note: str | None = None,
) -> torch.Tensor:
    """log pi_ref of every completion of the tokenized ``examples``, (N, K) float32 on CPU: (chosen, rejected) of
    pairs (K = 2), a ranking's K completions in its order.

    ``model`` is scored by :func:`score_completions` (eval mode, no gradients, left in the mode it was in). Under
    torch.distributed every process computes a share and all get the full tensors; only rank 0 touches the cache.
    ``packing`` changes the numbers only to float tolerance, so the cache key ignores it; ``cache_note`` enters the
    key (``reference_cache_path``'s ``note``). The cache holds the (K, N) tensor ``logps``.
    """
    path = None
    if use_cache:
        path = reference_cache_path(
            model,
            examples,
            tokenizer,
            reduction=reduction,
            autocast_dtype=autocast_dtype,
            cache_dir=cache_dir,
            note=cache_note,
        )
    hit = torch.tensor([int(bool(path and rank == 0 and path.exists()))], device=device)
    if world_size > 1:
        dist.broadcast(hit, src=0)
    if hit.item():
        logps = (
            load_file(str(path))["logps"].to(device)
            if rank == 0
            else torch.zeros(n_completions(examples), len(examples), device=device)
        )
        if world_size > 1:
            dist.broadcast(logps, src=0)
    else:
        logps = score_completions(
            model,
            examples,
            tokenizer,
            batch_size=batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            reduction=reduction,
            rank=rank,
            world_size=world_size,
            packing=packing,
        )
        if path is not None and rank == 0:
            with atomic_directory(path.parent, replace=False) as tmp:
                save_file({"logps": logps.cpu().contiguous()}, str(tmp / path.name))
    return logps.cpu().t()


def _arguments(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """precompute_reference_list_logps' arguments as ``train`` passes them for ``config`` on ``device``."""
    return {
        "batch_size": 2 * config.batch_size,
        "device": device,
        "autocast_dtype": autocast_dtype(config.precision, device),
        "reduction": config.reduction,
        "cache_dir": config.ref_cache_dir,
        "use_cache": config.use_ref_cache,
        "packing": config.speedups.packing,
    }


def reference_logps(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    tokenizer,
    config: TrainConfig,
    device: torch.device,
    *,
    rank: int = 0,
    world_size: int = 1,
    cache_note: str | None = None,
) -> torch.Tensor:
    """log pi_ref of every completion of ``examples`` as ``train`` computes them for ``config``, once, before its first
    step: :func:`precompute_reference_list_logps` with the config's batch size (2 x batch_size), reduction,
    precision, cache and packing. (N, K) float32 on CPU."""
    return precompute_reference_list_logps(
        model,
        examples,
        tokenizer,
        **_arguments(config, device),
        rank=rank,
        world_size=world_size,
        cache_note=cache_note,
    )


def reference_cached(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    tokenizer,
    config: TrainConfig,
    device: torch.device,
    cache_note: str | None = None,
) -> bool:
    """Whether :func:`reference_logps` with these arguments reads its numbers from the disk cache."""
    args = _arguments(config, device)
    path = reference_cache_path(
        model,
        examples,
        tokenizer,
        reduction=args["reduction"],
        autocast_dtype=args["autocast_dtype"],
        cache_dir=args["cache_dir"],
        note=cache_note,
    )
    return args["use_cache"] and path.exists()
