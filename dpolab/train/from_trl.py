"""``TrainConfig.from_trl(dpo_config)``: a ``trl.DPOConfig`` (TRL 1.16) as a TrainConfig, or a refusal by field name.

Every DPOConfig field falls in one of three groups:

- converted (``_convert``): the objective (``beta``, ``loss_type`` through ``dpolab.losses.TRL_LOSS_TYPES``,
  ``loss_weights``, ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``), the optimiser and its
  schedule (``learning_rate``, ``lr_scheduler_type``, ``lr_scheduler_kwargs``, ``warmup_steps``, ``weight_decay``,
  ``adam_beta1``, ``adam_beta2``, ``adam_epsilon``, ``max_grad_norm``, ``optim``), the steps
  (``num_train_epochs``, ``max_steps``, ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` x
  processes), the data (``max_length``, ``truncation_mode``, ``pad_to_multiple_of``), ``seed``,
  ``disable_dropout``, precision (``bf16``), ``use_cpu``, the files (``output_dir``, ``save_strategy``,
  ``save_steps``, ``save_total_limit``), ``disable_tqdm`` and evaluation (``eval_strategy`` "steps" or "epoch",
  ``eval_steps``, ``eval_on_start``; TRL's default "no" leaves dpolab's, which evaluates each epoch when
  ``train`` is given eval data);
- ignored (``NO_EFFECT``): fields that change no number dpolab computes (logging, trackers, the hub, the eval batch
  size, data loader workers, memory savers such as gradient checkpointing, TRL's reference log-prob precomputation,
  which dpolab always does);
- everything else is refused when it is not at its default, one line per field naming it and what to do.

What stays different from a TRL run: the order of the pairs (dpolab's seeded per-epoch permutation, not the
Trainer's sampler), and a ``save_total_limit`` of None (TRL keeps every checkpoint, dpolab the default number).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ..losses import TRL_LOSS_TYPES
from .config import loss_parameters

__all__ = ["config_from_trl", "NO_EFFECT"]

# Fields that change no number dpolab computes: logging and trackers, the hub, how evaluation is batched and gathered,
# checkpoint format, data loading and memory/speed switches, distributed plumbing.
NO_EFFECT = frozenset(
    {
        *("logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter"),
        *("log_level", "log_level_replica", "log_on_each_node", "report_to", "run_name", "project"),
        *("trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "include_num_input_tokens_seen"),
        *("skip_memory_metrics", "debug", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy"),
        *("hub_always_push", "hub_revision", "per_device_eval_batch_size"),
        *("prediction_loss_only", "eval_do_concat_batches", "eval_use_gather_object"),
        *("eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval"),
        *("metric_for_best_model", "greater_is_better", "do_train", "do_eval", "do_predict"),
        *("save_only_model", "save_on_each_node", "enable_jit_checkpoint", "restore_callback_states_from_checkpoint"),
        *("ignore_data_skip", "resume_from_checkpoint", "dataloader_num_workers", "dataloader_pin_memory"),
        *("dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context"),
        *("dataloader_in_order", "remove_unused_columns", "label_names", "length_column_name", "dataset_num_proc"),
        *("gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing"),
        *("activation_checkpointing_kwargs", "activation_offloading", "torch_compile", "torch_compile_backend"),
        *("torch_compile_mode", "use_liger_kernel", "liger_kernel_config", "use_cache", "torch_empty_cache_steps"),
        *("full_determinism", "average_tokens_across_devices", "precompute_ref_log_probs"),
        *("precompute_ref_batch_size", "padding_free", "local_rank", "ddp_find_unused_parameters"),
        *("ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout"),
        *("accelerator_config", "trust_remote_code", "pad_token", "discopop_tau", "ref_model_mixup_alpha"),
        "ref_model_sync_steps",
    }
)

# What to do about a field dpolab cannot honour, when it is not at its default.
_ADVICE = {
    "fp16": "dpolab trains in fp32 or bf16: set bf16=True or leave fp16 off",
    "tf32": "dpolab leaves torch's matmul precision as it is: set it with torch.backends.cuda.matmul yourself",
    "ld_alpha": "LD-DPO's length weighting is not in dpolab",
    "use_weighting": "WPO weighting is not in dpolab's loop (dpolab.losses.wpo_weights computes the weights)",
    "sync_ref_model": "dpolab's reference is frozen and its log-probs precomputed (TR-DPO is not in dpolab)",
    "router_aux_loss_coef": "dpolab adds no MoE load-balancing loss",
    "model_init_kwargs": "dpolab trains the model you pass: load it with these arguments yourself",
    "neftune_noise_alpha": "NEFTune noise is not in dpolab",
    "label_smoothing_factor": "the Trainer's label smoothing does not apply to DPO; DPO's is label_smoothing",
    "data_seed": "dpolab orders the pairs by seed alone",
    "dataloader_drop_last": "dpolab keeps a last partial batch; leave it False",
    "train_sampling_strategy": "dpolab shuffles the pairs every epoch (seeded)",
    "auto_find_batch_size": "set per_device_train_batch_size yourself",
    "optim_args": "dpolab's optimiser is AdamW with adam_beta1, adam_beta2, adam_epsilon, weight_decay",
    "optim_target_modules": "dpolab's optimiser is AdamW over every parameter",
    "fsdp": "dpolab runs on one device or under DDP (torchrun)",
    "fsdp_config": "dpolab runs on one device or under DDP (torchrun)",
    "deepspeed": "dpolab runs on one device or under DDP (torchrun)",
    "parallelism_config": "dpolab runs on one device or under DDP (torchrun)",
    "push_to_hub": "dpolab does not push: save the model and push it yourself",
    "load_best_model_at_end": "dpolab.train keeps the last model, not the best one: pick a checkpoint yourself",
    "eval_delay": "dpolab evaluates from the first eval step on",
}
_CONVERTED = frozenset(
    {
        *("beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"),
        *("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay"),
        *("adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "num_train_epochs", "max_steps"),
        *("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "truncation_mode"),
        *("pad_to_multiple_of", "seed", "disable_dropout", "bf16", "use_cpu", "output_dir", "save_strategy"),
        *("save_steps", "save_total_limit", "disable_tqdm", "eval_strategy", "eval_steps", "eval_on_start"),
    }
)
_ADAMW = ("adamw_torch", "adamw_torch_fused")


def _value(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def _is_default(value: Any, default: Any) -> bool:
    """Equal, or both empty (None, "", [], {}: __post_init__ turns some None defaults into empty containers)."""
    value, default = _value(value), _value(default)
    empty = (None, "", [], {}, ())
    return value == default or (value in empty and default in empty)


def _objective(c, refuse: list[str]) -> dict[str, Any]:
    """loss, loss_weights, loss_kwargs and reduction of TRL's loss_type list (dpolab.losses.TRL_LOSS_TYPES)."""
    types = [c.loss_type] if isinstance(c.loss_type, str) else list(c.loss_type)
    unknown = [t for t in types if t not in TRL_LOSS_TYPES]
    for t in unknown:
        why = {
            "sft": "TRL's is a per-token mean over the batch's chosen tokens; dpolab's sft and rpo are per example",
            "discopop": "DiscoPOP is not in dpolab's registry",
        }.get(t, "not a TRL 1.16 loss type dpolab knows")
        refuse.append(f"loss_type {t!r}: {why}; choose from {', '.join(TRL_LOSS_TYPES)}")
    types = [t for t in types if t in TRL_LOSS_TYPES]
    if not types:
        return {}
    names = [TRL_LOSS_TYPES[t][0] for t in types]
    reductions = {TRL_LOSS_TYPES[t][1] for t in types}
    if len(reductions) > 1:
        refuse.append(
            f"loss_type {types}: mixes losses TRL normalises by length (ipo, sigmoid_norm) with summed ones; dpolab "
            "uses one reduction for all: combine losses of one kind"
        )
    kwargs: dict[str, Any] = {}
    f = c.f_divergence_type
    if _value(f) != "reverse_kl":
        if names != ["dpo"] or types != ["sigmoid"]:
            refuse.append(f"f_divergence_type={_value(f)!r}: dpolab's fdpo is TRL's 'sigmoid' with it; use it alone")
        names, kwargs = ["fdpo"], {"f_divergence": _value(f)}
        if kwargs["f_divergence"] == "alpha_divergence":
            kwargs["alpha"] = c.f_alpha_divergence_coef
    takers = [n for n in names if "label_smoothing" in loss_parameters(n)]
    if takers:
        kwargs["label_smoothing"] = c.label_smoothing
        if "exo_pair" in takers and not 0 < c.label_smoothing < 1:
            refuse.append(f"label_smoothing={c.label_smoothing}: exo_pair needs 0 < label_smoothing < 1, e.g. 1e-3")
    elif c.label_smoothing:
        refuse.append(
            f"label_smoothing={c.label_smoothing}: no loss of {types} uses it (TRL ignores it there); set it to 0, "
            "or use TrainConfig(loss='cdpo', loss_kwargs={'label_smoothing': ...}) for conservative DPO"
        )
    weights = c.loss_weights
    return {
        "loss": names[0] if len(names) == 1 else tuple(names),
        "loss_weights": None if weights is None else tuple(float(w) for w in weights),
        "loss_kwargs": kwargs,
        "reduction": min(reductions),  # "mean" or "sum"; two of them were refused above
    }


def _steps(c, processes: int, refuse: list[str]) -> dict[str, Any]:
    out = {
        "batch_size": c.per_device_train_batch_size * c.gradient_accumulation_steps * processes,
        "grad_accum_steps": c.gradient_accumulation_steps,
    }
    if c.max_steps is not None and c.max_steps > 0:  # TRL: max_steps overrides the epochs
        out["max_steps"], out["epochs"] = c.max_steps, c.max_steps  # an epoch has >= 1 step: max_steps decides
    elif float(c.num_train_epochs).is_integer() and c.num_train_epochs >= 1:
        out["epochs"] = int(c.num_train_epochs)
    else:
        refuse.append(f"num_train_epochs={c.num_train_epochs}: dpolab trains whole epochs; round it or set max_steps")
    w = c.warmup_steps  # transformers: a number of steps, or a fraction of them in [0, 1)
    out["warmup_steps"] = int(w) if float(w).is_integer() else float(w)
    if w > 1 and not float(w).is_integer():
        refuse.append(f"warmup_steps={w}: give a whole number of steps or a fraction in [0, 1)")
    return out


def _files(c, refuse: list[str]) -> dict[str, Any]:
    strategy = _value(c.save_strategy)
    out = {"output_dir": c.output_dir, "save_steps": None}
    if strategy == "steps":
        if isinstance(c.save_steps, float) and c.save_steps < 1:
            refuse.append(f"save_steps={c.save_steps}: give a number of steps, not a fraction")
        else:
            out["save_steps"] = int(c.save_steps)
    elif strategy != "no":
        refuse.append(f"save_strategy={strategy!r}: dpolab saves every save_steps steps and at the end; use 'steps'")
    if c.save_total_limit is not None:
        out["save_total_limit"] = c.save_total_limit
    return out


def _evaluation(c, refuse: list[str]) -> dict[str, Any]:
    """eval_strategy, eval_steps, eval_on_start: TRL's "no" leaves dpolab's default (evaluate each epoch, when train
    is given eval_data: TRL would evaluate only when asked, by trainer.evaluate())."""
    strategy = _value(c.eval_strategy)
    out: dict[str, Any] = {"eval_on_start": bool(c.eval_on_start)}
    if strategy == "steps":
        steps = c.eval_steps
        out["eval_strategy"] = "steps"
        out["eval_steps"] = int(steps) if float(steps).is_integer() else float(steps)
        if steps > 1 and not float(steps).is_integer():
            refuse.append(f"eval_steps={steps}: give a whole number of steps or a fraction in (0, 1)")
    elif strategy == "epoch":
        out["eval_strategy"] = "epoch"
    return out


def config_from_trl(cls, c, *, processes: int | None = None, **overrides):
    """``cls`` (TrainConfig) from DPOConfig ``c``; ``processes`` (default: ``c.world_size``) multiplies the
    per-device batch; ``overrides`` set TrainConfig fields last. Raises ValueError listing every refused field."""
    refuse: list[str] = []
    fields = {f.name: f for f in dataclasses.fields(c)}
    for name, field in fields.items():
        if name in _CONVERTED or name in NO_EFFECT:
            continue
        default, value = _default(field), getattr(c, name)
        if not _is_default(value, default) and not (name == "tf32" and value is False):  # TF32 off: torch's default
            advice = _ADVICE.get(name, "dpolab has no equivalent")
            refuse.append(f"{name}={_value(value)!r}: {advice}; leave it at its default ({_value(default)!r})")
    if _value(c.optim) not in _ADAMW:
        refuse.append(f"optim={_value(c.optim)!r}: dpolab's optimiser is torch's AdamW: use one of {', '.join(_ADAMW)}")
    if c.bf16 and c.fp16:
        refuse.append("bf16 and fp16 are both set: choose bf16")
    kwargs = {
        **_objective(c, refuse),
        **_steps(c, processes or c.world_size, refuse),
        **_files(c, refuse),
        **_evaluation(c, refuse),
        "beta": c.beta,
        "learning_rate": c.learning_rate,
        "lr_scheduler_type": _value(c.lr_scheduler_type),
        "lr_scheduler_kwargs": dict(c.lr_scheduler_kwargs or {}),
        "weight_decay": c.weight_decay,
        "adam_betas": (c.adam_beta1, c.adam_beta2),
        "adam_epsilon": c.adam_epsilon,
        "max_grad_norm": c.max_grad_norm if c.max_grad_norm and c.max_grad_norm > 0 else None,
        "max_length": c.max_length,
        "truncation_mode": c.truncation_mode,
        "pad_to_multiple_of": c.pad_to_multiple_of if isinstance(c.pad_to_multiple_of, int) else None,
        "seed": c.seed,
        "disable_dropout": c.disable_dropout,
        "precision": "bf16" if c.bf16 else "fp32",
        "device": "cpu" if c.use_cpu else "auto",
        "progress": not c.disable_tqdm,
    }
    if refuse:
        raise ValueError("TrainConfig.from_trl: DPOConfig fields dpolab cannot honour:\n" + "\n".join(refuse))
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"TrainConfig.from_trl: unknown TrainConfig fields {unknown}")
    merged = {**kwargs, **overrides}
    if merged["output_dir"] is None and "save_steps" not in overrides:  # no folder given: nothing to save
        merged["save_steps"] = None
    return cls(**merged)
