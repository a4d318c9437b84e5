"""The ``dpolab`` command. ``dpolab train --help`` lists every option; defaults are the seed article's.

    dpolab train --model tiny --loss dpop --output-dir runs/tiny-dpop          # the tiny Penn world, seconds
    dpolab train --model gpt2 --loss dpo --output-dir runs/gpt2-dpo             # the article's run
    dpolab train --data rankings.jsonl --loss plackett_luce --output-dir runs/pl   # listwise DPO on rankings
    dpolab train --model FOLDER --data pairs.jsonl --eval-data eval.jsonl --lora-r 16 --merge   # LoRA, evaluation
    torchrun --nproc_per_node 2 -m dpolab.cli train --model gpt2 ...            # several GPUs (DDP)

Subcommands live in ``COMMANDS``; each registers its parser and its function. Errors end in one line and an exit
status (2: bad input, 1: the run failed; ``dpolab.errors``); ``--debug`` or ``DPOLAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import InputError, run_command
from .files import atomic_directory, atomic_write_text, portable_text, save_pretrained_atomically

__all__ = ["main", "build_parser", "train_config", "save_model_folder"]


def _steps(text: str) -> int | float:
    """A number of steps, or a fraction of them in (0, 1) (TRL's eval_steps)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps or a fraction in (0, 1), got {text!r}") from None
    return int(value) if value.is_integer() else value


def _loss_param(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, float(value)
    except ValueError:
        return key, value  # e.g. f_divergence=js_divergence


def _add_train(commands) -> None:
    from .losses import LISTWISE_LOSSES, LOSSES, PAIR_EXPANSIONS
    from .train import TrainConfig

    d = TrainConfig()
    p = commands.add_parser(
        "train",
        help="fine-tune a causal LM on preference pairs (DPO, DPOP, SFT, ...)",
        description="Fine-tune a causal LM on preference pairs with one loss of dpolab.losses. "
        "Defaults: the seed article's hyperparameters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny (the tiny Penn world), gpt2, smollm2-135m, auto, "
        "a local folder or a hub id (resolved by dpolab.models.load_model)",
    )
    p.add_argument(
        "--data",
        default="penn",
        help="penn (the shipped Penn set's train split), a .json/.jsonl file "
        "of prompt/chosen/rejected rows (or prompt/completions rankings, best first or with scores), or a Hugging "
        "Face dataset name",
    )
    p.add_argument("--split", default="train", help="the split to train on when --data holds several")
    p.add_argument(
        "--unique-prompts",
        action="store_true",
        help="refuse data with several pairs per prompt (prompts equal up to whitespace); by default they are fine",
    )
    p.add_argument(
        "--loss",
        default=d.loss,
        choices=sorted(LOSSES | LISTWISE_LOSSES),
        help="the preference loss; plackett_luce is listwise: it trains on rankings of K completions (pairs are "
        "rankings of 2)",
    )
    p.add_argument(
        "--listwise-pairs",
        default=None,
        choices=PAIR_EXPANSIONS,
        help="rankings with a pairwise loss: train on each ranking's adjacent (K-1) or all (K(K-1)/2) pairs",
    )
    p.add_argument("--beta", type=float, default=d.beta, help="beta: KL strength, scales the implicit rewards")
    p.add_argument("--dpop-lambda", type=float, default=5.0, help="DPOP's lambda (used with --loss dpop)")
    p.add_argument(
        "--loss-param",
        type=_loss_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another parameter of the loss, e.g. label_smoothing=0.1 or kl_coef=0.1 (repeatable)",
    )
    p.add_argument(
        "--reduction",
        default=d.reduction,
        choices=["sum", "mean"],
        help="sum (log pi(y|x)) or per-token mean of the completion log-probs",
    )
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (AdamW)")
    p.add_argument(
        "--min-lr", type=float, default=d.min_learning_rate, help="learning rate at the end of the cosine decay"
    )
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="clip the gradient norm (0: no clipping)"
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training pairs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per optimizer step (all processes)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum_steps, help="micro-batches per optimizer step")
    p.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help="max tokens of each sequence prompt + completion, as TRL's max_length (0: no limit but the model's "
        "context)",
    )
    p.add_argument(
        "--truncation-mode",
        default=d.truncation_mode,
        choices=["keep_start", "keep_end"],
        help="which tokens of a sequence longer than --max-length are kept: the first or the last (TRL's)",
    )
    p.add_argument("--max-prompt-length", type=int, default=None, help="max prompt tokens (the prompt's start is cut)")
    p.add_argument(
        "--keep-dropout", action="store_true", help="train with the model's dropout (TRL's disable_dropout=False)"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer's activations in the backward: less memory, more time, the same numbers "
        "(TRL's gradient_checkpointing)",
    )
    lora = p.add_argument_group(
        "LoRA (peft; TRL's ModelConfig flags and defaults)",
        "any of these trains a LoRA adapter instead of every weight; the reference is the base model",
    )
    lora.add_argument("--use-peft", action="store_true", help="train a LoRA adapter (implied by the flags below)")
    lora.add_argument("--lora-r", type=int, default=None, help="the adapter's rank r (default 16)")
    lora.add_argument(
        "--lora-alpha", type=int, default=None, help="alpha: the update is scaled by alpha/r (default 32)"
    )
    lora.add_argument(
        "--lora-dropout",
        type=float,
        default=None,
        help="dropout on the adapter's input (default 0.05; 0 while training unless --keep-dropout, as in TRL)",
    )
    lora.add_argument(
        "--lora-target",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="names of the modules to adapt (e.g. q_proj v_proj), or all-linear; default: peft's choice for the "
        "architecture",
    )
    lora.add_argument(
        "--lora-modules-to-save",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="modules trained whole and saved with the adapter (e.g. lm_head)",
    )
    lora.add_argument("--use-rslora", action="store_true", help="scale the update by alpha/sqrt(r) (rank-stabilised)")
    lora.add_argument("--use-dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    lora.add_argument(
        "--merge",
        action="store_true",
        help="save the adapter merged into the base weights: model/ is a plain transformers model (without: the "
        "adapter's files, loaded by dpolab.models.load_model or peft)",
    )
    evaluation = p.add_argument_group("evaluation during training (TRL's eval_ metrics)")
    evaluation.add_argument(
        "--eval-data",
        default=None,
        help="preference pairs to evaluate on, in --data's format: penn (the Penn test split), a .json/.jsonl file "
        "or a Hugging Face dataset name",
    )
    evaluation.add_argument("--eval-split", default="test", help="the split of --eval-data when it holds several")
    evaluation.add_argument(
        "--eval-strategy",
        default=d.eval_strategy,
        choices=["steps", "epoch"],
        help="evaluate every --eval-steps steps, or at each epoch's end (default: steps if --eval-steps, else epoch)",
    )
    evaluation.add_argument(
        "--eval-steps", type=_steps, default=None, help="evaluate every this many steps (or this fraction of them)"
    )
    evaluation.add_argument("--eval-on-start", action="store_true", help="evaluate before the first step too")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data order and the RNGs")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda", "mps"], help="where to train")
    p.add_argument(
        "--precision",
        default=d.precision,
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on a CUDA device that supports it, else fp32; bf16 on a CPU: slow unless it has "
        "native bf16 (AVX512-BF16, AMX)",
    )
    p.add_argument(
        "--no-speedups",
        action="store_true",
        help="train with every speed-up off (TrainConfig.speedups = Speedups.none()): padded batches, the chunked LM "
        "head, the model's own modules, torch's default AdamW; the same numbers to float rounding, slower",
    )
    p.add_argument(
        "--output-dir",
        default="runs/train",
        help="checkpoints, history.json/.csv, config.json, model/; a new or empty folder, or an earlier run's",
    )
    p.add_argument("--save-steps", type=int, default=None, help="checkpoint every this many steps (and at the end)")
    p.add_argument(
        "--save-total-limit",
        type=int,
        default=2,
        help="keep this many most recent checkpoints (2: one to fall back on if the newest is damaged)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --output-dir")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --output-dir that holds other files (they stay) or an earlier run (started over)",
    )
    p.add_argument(
        "--ref-cache-dir", default=None, help="cache of reference log-probs (default: $DPOLAB_CACHE/ref-logps)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--report-to",
        default=d.report_to,
        choices=["none", "tensorboard"],
        help="tensorboard: each step's metrics as TensorBoard events in OUTPUT_DIR/runs (pip install "
        "'dpolab[tensorboard]')",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DPOLAB_DEBUG=1)")
    p.set_defaults(func=_train)


def _load_data(name: str, split: str, unique_prompts: bool = False, option: str = "--data"):
    """The rows of ``option`` (--data, --eval-data) ``name``, its ``split`` where it holds several."""
    from datasets import DatasetDict

    from .data import load_penn, load_preference_data

    try:
        data = load_penn() if name == "penn" else load_preference_data(name, unique_prompts=unique_prompts)
    except (OSError, ValueError) as err:  # missing, unreadable or invalid file; hub unreachable (ConnectionError)
        raise InputError(f"{option} {name}: {err}") from err
    if isinstance(data, DatasetDict):
        if split not in data:
            flag = "--split" if option == "--data" else "--eval-split"
            raise InputError(f"{option} {name} has splits {sorted(data)}, not {split!r}: pass {flag} with one of them")
        data = data[split]
    return data


def _load_model(name: str):
    from .models import ModelNotAvailableError, load_model

    try:
        return load_model(name)
    except ModelNotAvailableError as err:
        raise InputError(f"--model {name}: {err}") from err


def lora_config(args: argparse.Namespace) -> dict | None:
    """The LoRA config of ``dpolab train``'s LoRA flags as TRL's ``get_peft_config(ModelConfig)`` builds it (task
    CAUSAL_LM, bias none, TRL's defaults r 16, alpha 32, dropout 0.05), as a dict; None when no flag asks for it."""
    given = [args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target, args.lora_modules_to_save]
    if not (args.use_peft or args.use_rslora or args.use_dora or any(v is not None for v in given)):
        return None
    target = args.lora_target
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 16 if args.lora_r is None else args.lora_r,
        "lora_alpha": 32 if args.lora_alpha is None else args.lora_alpha,
        "lora_dropout": 0.05 if args.lora_dropout is None else args.lora_dropout,
        "target_modules": target[0] if target == ["all-linear"] else target,  # peft's keyword is a string
        "modules_to_save": args.lora_modules_to_save,
        "bias": "none",
        "use_rslora": args.use_rslora,
        "use_dora": args.use_dora,
    }


def train_config(args: argparse.Namespace):
    """The TrainConfig of parsed ``dpolab train`` arguments."""
    from .train import Speedups, TrainConfig

    loss_kwargs = dict(args.loss_param)
    if args.loss == "dpop":
        loss_kwargs.setdefault("dpop_lambda", args.dpop_lambda)
    return TrainConfig(
        loss=args.loss,
        listwise_pairs=args.listwise_pairs,
        beta=args.beta,
        loss_kwargs=loss_kwargs,
        reduction=args.reduction,
        learning_rate=args.lr,
        min_learning_rate=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum_steps=args.grad_accum,
        max_length=args.max_length or None,
        truncation_mode=args.truncation_mode,
        max_prompt_length=args.max_prompt_length,
        disable_dropout=not args.keep_dropout,
        gradient_checkpointing=args.gradient_checkpointing,
        speedups=Speedups.none() if args.no_speedups else Speedups(),
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        output_dir=args.output_dir,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        resume=args.resume,
        overwrite=args.overwrite,
        ref_cache_dir=args.ref_cache_dir,
        progress=not args.no_progress,
        report_to=args.report_to,
        peft_config=lora_config(args),
        eval_strategy=args.eval_strategy,
        eval_steps=args.eval_steps,
        eval_on_start=args.eval_on_start,
    )


def save_model_folder(output_dir: str | Path, model, tokenizer, info=None) -> Path:
    """Write the trained model and its tokenizer to ``output_dir/model`` as one folder, filled under a temporary
    name and renamed when complete: a process killed at any instant leaves the earlier ``model/`` or the new one,
    never a mix (``dpolab.files.atomic_directory``). ``info`` (a ModelInfo) goes to ``model_info.json`` first. A PEFT
    model is saved as its adapter (``dpolab.train.adapters.save_adapter``) beside the tokenizer."""
    output_dir = Path(output_dir)
    if info is not None:
        atomic_write_text(output_dir / "model_info.json", portable_text(json.dumps(info.to_dict(), indent=1)))
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported; nothing heavy imported before
    if peft is None or not isinstance(model, peft.PeftModel):
        return save_pretrained_atomically(output_dir / "model", model, tokenizer)
    from .train.adapters import save_adapter

    with atomic_directory(output_dir / "model") as tmp:
        save_adapter(model, tmp)
        tokenizer.save_pretrained(tmp)
    return output_dir / "model"


def _check_lora_flags(args: argparse.Namespace, config) -> None:
    """--merge needs an adapter; a --model folder that holds one (it continues training) takes no new one."""
    adapter_folder = (Path(args.model).expanduser() / "adapter_config.json").is_file()
    if args.merge and config.peft_config is None and not adapter_folder:
        raise InputError(
            f"--merge folds a LoRA adapter into the model, and --model {args.model} trains none: pass --lora-r (or "
            "--use-peft), or leave out --merge"
        )
    if adapter_folder and config.peft_config is not None:
        raise InputError(
            f"--model {args.model} holds a PEFT adapter, which is trained further as it is: leave out the LoRA flags, "
            "or pass its merged model (dpolab train ... --merge) to train a new adapter"
        )


def _train(args: argparse.Namespace) -> None:
    from .data import count_prompts, is_listwise_data
    from .device import check_device
    from .train import train
    from .train.adapters import merge_adapter
    from .train.examples import check_eval_data
    from .train.listwise import training_rows
    from .train.output import check_output_dir

    config = train_config(args)
    check_device(config.device)  # every check that can refuse the run, before the data and the model load
    check_output_dir(config)
    _check_lora_flags(args, config)
    data = _load_data(args.data, args.split, args.unique_prompts)
    training_rows(data, config)  # rankings and the loss agree, before the model loads
    eval_data = None if args.eval_data is None else _load_data(args.eval_data, args.eval_split, option="--eval-data")
    check_eval_data(config, data, eval_data, names=(f"--data {args.data}", f"--eval-data {args.eval_data}"))
    if eval_data is not None:
        training_rows(eval_data, config, f"--eval-data {args.eval_data}")
    model, tokenizer, info = _load_model(args.model)
    rank0, world_size = int(os.environ.get("RANK", "0")) == 0, int(os.environ.get("WORLD_SIZE", "1"))
    if rank0:
        print(
            f"dpolab train: {info.name} ({info.n_params / 1e6:.1f}M parameters{', FALLBACK' if info.fallback else ''}), "
            f"{len(data)} {'rankings' if is_listwise_data(data) else 'pairs'} over {count_prompts(data)} prompts, "
            f"loss {config.loss}, "
            f"on {world_size} process{'es' * (world_size > 1)}, "
            f"output {config.output_dir}",
            flush=True,
        )
    result = train(model, tokenizer, data, config, eval_data=eval_data)
    if rank0:
        if result.resumed_from_step:
            print(f"resumed from step {result.resumed_from_step}", flush=True)
        trained = merge_adapter(result.model) if args.merge else result.model
        save_model_folder(args.output_dir, trained, tokenizer, info)
        for rows in (result.history, result.eval_history):
            last = rows[-1] if rows else None
            if last is not None:
                print(json.dumps({k: float(f"{v:.6g}") for k, v in last.items()}), flush=True)


COMMANDS = [_add_train]  # other subcommands append their parser-builders here


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpolab", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0 done, 1 the run failed, 2 bad input; ``dpolab.errors``)."""
    args = build_parser().parse_args(argv)  # a usage error exits 2 here, with argparse's message
    return run_command(lambda: args.func(args), prog=f"dpolab {args.command}", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
