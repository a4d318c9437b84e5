"""``python -m dpolab.experiments.penn`` (``make penn``): the command line. ``--help`` explains every flag.

Exit status: 0 done; 2 bad input (unknown method or model, missing data, bad settings); 1 the run failed after
starting (e.g. the judge endpoint is down; everything computed so far is kept, and a rerun resumes). Errors end in
one line (``dpolab.errors``); ``--debug`` or ``DPOLAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging

from .config import QUICK, Experiment, FrontierConfig, Hyper, RunConfig, TRLSettings
from .methods import METHODS

__all__ = ["main", "build_parser", "experiment_from_args"]

H, T, R = Hyper(), TRLSettings(), RunConfig()


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless X is None or False, or the help already says its default."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "[default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; known: {','.join(METHODS)}")
    return names


def _betas(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpolab.experiments.penn",
        description="The GPT-2 Penn experiment: TRL's DPOTrainer, DPO, DPOP, SFT, KL-SFT, IPO and ODPO on the Penn "
        "preference set, evaluated on every test prompt, judged pairwise, with an alignment-vs-KL frontier and "
        "a report beside the article's numbers. Reruns with the same settings resume.",
        formatter_class=_Help,
    )
    g = p.add_argument_group("what runs")
    g.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: --model tiny, --max-steps {QUICK['max_steps']}, 1 seed, betas 0.1,0.5 (explicit "
        "flags still win); every method and every test prompt",
    )
    g.add_argument(
        "--model",
        default=None,
        help="auto (GPT-2, else the offline stand-in, loudly), gpt2, smollm2-135m, "
        "tiny, a model folder or a hub id [default: auto; tiny with --quick]",
    )
    g.add_argument(
        "--methods",
        type=_methods,
        default=",".join(R.methods),
        metavar="M1,M2",
        help=f"comma-separated, from {','.join(METHODS)}",
    )
    g.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 for every method [default: 1]")
    g.add_argument(
        "--betas",
        type=_betas,
        default=None,
        metavar="B1,B2",
        help="betas of the alignment-vs-KL frontier for DPO/DPOP/IPO, or 'none' [default: 0.1,0.5,1.0; "
        "0.1,0.5 with --quick]",
    )
    g.add_argument(
        "--frontier-methods",
        type=_methods,
        default=",".join(FrontierConfig().methods),
        metavar="M1,M2",
        help="the methods whose frontier is swept over --betas (those also in --methods)",
    )
    g.add_argument(
        "--data",
        default=R.data,
        help="penn (the shipped set), a .json/.jsonl file, or a dataset with train (and test) splits",
    )
    g.add_argument("--test-data", default=None, help="test prompts (a file or dataset) when --data has no test split")
    g.add_argument(
        "--judge",
        default=R.judge,
        choices=["offline", "endpoint"],
        help="offline scoring judge, or an OpenAI-compatible endpoint from DPOLAB_JUDGE_BASE_URL, "
        "DPOLAB_JUDGE_MODEL (and DPOLAB_JUDGE_API_KEY)",
    )
    g.add_argument(
        "--output-dir",
        default=None,
        help="the run folder [default: runs/penn-<model loaded>[-quick], e.g. "
        "runs/penn-smollm2-135m when auto falls back]",
    )
    g.add_argument(
        "--work-dir",
        default=None,
        help="checkpoints and kept weights, outside the run folder [default: $DPOLAB_CACHE/penn-work/<run>]",
    )
    g.add_argument("--keep-weights", action="store_true", help="keep each trained policy in the work folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DPOLAB_DEBUG=1)")
    g.add_argument("--max-test-prompts", type=int, default=None, help=argparse.SUPPRESS)  # dev only: a quick look

    g = p.add_argument_group("dpolab methods (the article's settings)")
    g.add_argument("--lr", type=float, default=H.learning_rate, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=H.min_learning_rate, help="end of the cosine decay")
    g.add_argument("--epochs", type=int, default=H.epochs, help="passes over the training pairs")
    g.add_argument("--batch-size", type=int, default=H.batch_size, help="pairs per optimizer step")
    g.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help=f"cap on optimizer steps, TRL included [default: none; {QUICK['max_steps']} with --quick]",
    )
    g.add_argument("--beta", type=float, default=H.beta, help="beta of DPO, DPOP, ODPO (and IPO unless --ipo-beta)")
    g.add_argument("--dpop-lambda", type=float, default=H.dpop_lambda, help="DPOP's lambda")
    g.add_argument(
        "--kl-coef",
        type=float,
        default=H.kl_coef,
        help="KL-SFT's coefficient c (its chosen log-ratio settles at 1/(2c))",
    )
    g.add_argument("--ipo-beta", type=float, default=None, help="IPO's beta [default: --beta]")
    g.add_argument("--ipo-reduction", default=H.ipo_reduction, choices=["mean", "sum"], help="IPO's log-probs")
    g.add_argument("--odpo-alpha", type=float, default=H.odpo_alpha, help="ODPO's offset scale alpha")
    g.add_argument(
        "--precision",
        default=H.precision,
        choices=["auto", "fp32", "bf16"],
        help="every trainer, TRL's too: auto = bf16 autocast on a CUDA device that supports it, else fp32; bf16 on "
        "a CPU is slow unless it has native bf16 (AVX512-BF16, AMX)",
    )
    g.add_argument(
        "--save-steps",
        type=int,
        default=H.save_steps,
        help="checkpoint interval in steps, TRL included (an interrupted training resumes from the last)",
    )

    g = p.add_argument_group("TRL baseline (DPOConfig defaults, the article's lr and epochs)")
    g.add_argument("--trl-beta", type=float, default=T.beta, help="DPOConfig beta")
    g.add_argument("--trl-lr", type=float, default=T.learning_rate, help="learning rate")
    g.add_argument("--trl-epochs", type=int, default=T.epochs, help="epochs")
    g.add_argument("--trl-batch-size", type=int, default=T.batch_size, help="per-device train batch size")

    g = p.add_argument_group("generation (the article's)")
    g.add_argument("--max-new-tokens", type=int, default=30, help="tokens sampled per test prompt")
    g.add_argument("--top-k", type=int, default=30, help="top-k sampling")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    return p


def experiment_from_args(args: argparse.Namespace) -> Experiment:
    """Resolve the flags: an explicit flag wins over --quick, which wins over the default."""
    from ...eval import SamplingConfig

    quick = QUICK if args.quick else {}
    model = args.model or quick.get("model", R.model)
    max_steps = args.max_steps or quick.get("max_steps")
    betas = args.betas if args.betas is not None else quick.get("betas", FrontierConfig().betas)
    run = RunConfig(
        model=model,
        data=args.data,
        test_data=args.test_data,
        methods=args.methods,
        seeds=args.seeds or quick.get("seeds", R.seeds),
        judge=args.judge,
        output_dir=args.output_dir or "",
        work_dir=args.work_dir or "",
        quick=args.quick,
        keep_weights=args.keep_weights,
        max_test_prompts=args.max_test_prompts,
        progress=not args.no_progress,
    )
    hyper = Hyper(
        learning_rate=args.lr,
        min_learning_rate=args.min_lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps=max_steps,
        beta=args.beta,
        dpop_lambda=args.dpop_lambda,
        kl_coef=args.kl_coef,
        ipo_beta=args.ipo_beta,
        ipo_reduction=args.ipo_reduction,
        odpo_alpha=args.odpo_alpha,
        save_steps=args.save_steps,
        precision=args.precision,
    )
    trl = TRLSettings(
        beta=args.trl_beta,
        learning_rate=args.trl_lr,
        epochs=args.trl_epochs,
        batch_size=args.trl_batch_size,
        max_steps=max_steps,
        save_steps=args.save_steps,
    )
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, top_k=args.top_k, temperature=args.temperature)
    frontier = FrontierConfig(betas=betas, methods=args.frontier_methods)
    return Experiment(run=run, hyper=hyper, trl=trl, frontier=frontier, sampling=sampling)


def main(argv: list[str] | None = None) -> int:
    from ...errors import run_command
    from .pipeline import run

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), message already printed
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:  # a setting out of range (ValueError) exits 2, a judge that stays down 1 (dpolab.errors)
        run(experiment_from_args(args))

    return run_command(body, prog=parser.prog, debug=args.debug)
