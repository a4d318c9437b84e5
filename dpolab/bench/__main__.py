"""``python -m dpolab.bench`` (``make bench``): dpolab's trainer against TRL's DPOTrainer, side by side.

    ceiling          the fp32 matmul ceiling of this machine, now                      (flops.py)
    repeat R times:  TRL DPOTrainer and dpolab.train in lockstep, each in its own process (lockstep.py, workers.py)
                     same random GPT-2, same pairs in the same order, same hyperparameters
                     assert: the same initial weights, the same loss at steps 1 and 2
    once each:       in lockstep with dpolab.train as shipped: TRL with precompute_ref_log_probs; the ablations (one
                     optimisation off each); bf16 autocast
    then:            generation; reference log-probs; the ceiling again
    print            the table, then speedup_vs_trl, peak_rss_ratio_vs_trl, fraction_of_limit
    write            <out>/bench.json and <out>/bench.md (the table the README links to)

Lockstep: the two processes take turns, one optimizer step each, so that neighbouring steps meet the same machine
(it is shared and noisy). Step times are medians of the timed steps within a run; a ratio is taken within each run,
then its median over the R runs; every other figure is the median over the runs. ``--quick`` runs a 4-layer,
256-wide GPT-2 with GPT-2's vocabulary, one repeat, no ablations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..device import cpu_has_native_bf16
from .against import export_ref
from .lockstep import run_lockstep, worker_argv, worker_env

__all__ = ["main", "spec_for"]

GPT2_124M = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
QUICK_MODEL = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 256, "n_layer": 4, "n_head": 4}
ABLATIONS = {  # variant (workers.ABLATIONS) -> what it switches off
    "padded": "shared-prefix packing: the padded 2B-row batch, each prompt computed twice",
    "chunked-head": "the fused LM head (the chunked one instead): F.linear and a log-softmax in chunks, each "
    "recomputed in the backward",
    "compiled-head": "the fused LM head (torch.compile of the chunked one instead): on CUDA only",
    "python-gelu": "the fused GELU: transformers' seven-operation gelu_new, apart from the projection after it",
    "foreach-adamw": "fused AdamW: torch's default foreach AdamW",
    "dense-embedding-grad": "the tied embedding's in-place gradient: autograd's dense lookup gradient, summed",
    "saved-layer-norms": "the recomputed layer norms: each norm's output kept for the linear after it",
    "mkl-products": "oneDNN's products: torch's own mm/addmm (MKL's sgemm on x86) in dpolab's autograd functions "
    "(torch.backends.mkldnn.enabled = False)",
}
# the first two steps' losses of dpolab and TRL must agree to this relative tolerance, by precision (bf16 autocast:
# products rounded to 8 bits of mantissa, in different kernels on each side; on a CPU, a 1-layer GPT-2 in bf16 agreed
# to 1e-4, GPT-2 124M on a GPU is not measured yet)
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2}


def spec_for(args: argparse.Namespace) -> dict:
    """What every worker builds and runs: the model, the pairs, the hyperparameters, the device and the precision
    (--precision resolved on --device by ``dpolab.device``: dpolab and TRL run in the same one)."""
    import torch

    from ..device import check_device, resolve_precision

    check_device(args.device)
    return {
        "device": args.device,
        "precision": resolve_precision(args.precision, torch.device(args.device)),
        "model": QUICK_MODEL if args.quick else GPT2_124M,
        "batch_size": 16,
        "beta": 0.1,
        "lr": 1e-5,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "threads": args.threads,
        "generation_prompts": 125,
        "generation_tokens": 30,
        "reference_pairs": 128 if args.quick else 256,
        "ceiling_tokens": 768,
    }


def run_worker(kind: str, spec: dict, timeout: float) -> dict:
    """One worker in a fresh interpreter; its stderr is shown if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        start = time.perf_counter()
        proc = subprocess.run(
            worker_argv(kind, spec_path, out_path), env=worker_env(), capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"bench worker {kind} ({spec.get('variant', kind)}) failed with status "
                f"{proc.returncode}:\n{proc.stderr[-4000:]}"
            )
        result = json.loads(out_path.read_text())
        result["wall_seconds"] = time.perf_counter() - start
        return result


def _token_stats(spec: dict) -> dict:
    """Token counts of the timed pairs: per pair P, C, R, the minimal FLOPs, and the padded layout's padding."""
    from ..data.collate import PreferenceCollator, tokenize_preferences
    from ..models import gpt2_tokenizer
    from .flops import pair_flops
    from .workers import random_gpt2, timed_rows

    tokenizer = gpt2_tokenizer()
    rows, order = timed_rows(spec)
    examples = tokenize_preferences(rows, tokenizer)
    model = random_gpt2(spec, seed=0)
    lengths = [(len(e["prompt_ids"]), len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    flops = [pair_flops(model, *t) for t in lengths]
    b = spec["batch_size"]
    steps = [order[i * b : (i + 1) * b] for i in range(len(order) // b)]
    padded = [PreferenceCollator(tokenizer.pad_token_id)([examples[j] for j in s])["attention_mask"] for s in steps]
    return {
        "pairs": len(examples),
        "prompt_tokens": _range([t[0] for t in lengths]),
        "chosen_tokens": _range([t[1] for t in lengths]),
        "rejected_tokens": _range([t[2] for t in lengths]),
        "tokens_per_pair": statistics.mean(2 * p + c + r for p, c, r in lengths),  # both sequences, no padding
        "minimal_flops_per_pair": statistics.mean(flops),
        "padded_layout_padding_share": float(sum(1 - m.float().mean() for m in padded) / len(padded)),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _range(values: list[int]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(result: dict, stats: dict, ceiling: float, batch_size: int) -> dict:
    step = statistics.median(result["step_seconds"])
    pairs = batch_size / step
    return {
        "seconds_per_step": step,
        "pairs_per_s": pairs,
        "tokens_per_s": pairs * stats["tokens_per_pair"],
        "peak_rss_bytes": result["peak_rss_bytes"],
        "useful_flops_per_s": pairs * stats["minimal_flops_per_pair"],
        "share_of_ceiling": pairs * stats["minimal_flops_per_pair"] / ceiling,
        "losses": result["losses"][:3],
    } | ({"peak_gpu_bytes": result["peak_gpu_bytes"]} if "peak_gpu_bytes" in result else {})


def check_same_start(trl: dict, ours: dict, precision: str = "fp32") -> None:
    """Same initial weights and the same loss at the first two steps (the second after one identical AdamW step), to
    ``LOSS_RTOL[precision]``."""
    if trl["initial_weights"] != ours["initial_weights"]:
        raise AssertionError(
            f"initial weights differ: TRL {trl['initial_weights']} vs dpolab {ours['initial_weights']}"
        )
    rtol = LOSS_RTOL[precision]
    for i in range(2):
        a, b = trl["losses"][i], ours["losses"][i]
        if abs(a - b) > rtol * abs(a):
            raise AssertionError(f"step {i + 1}: TRL's loss {a!r} and dpolab's {b!r} differ by more than {rtol:g}")


def table(rows: list[tuple[str, dict]], ceiling: float) -> str:
    head = (
        f"| run | s/step | s/step ÷ dpolab's, same run | pairs/s | tokens/s | peak RSS | useful GFLOP/s | share of "
        f"ceiling ({ceiling / 1e9:.0f} GFLOP/s) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [
        f"| {name} | {r['seconds_per_step']:.2f} | {r.get('vs_dpolab', 1):.2f} | {r['pairs_per_s']:.2f} | "
        f"{r['tokens_per_s']:,.0f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['useful_flops_per_s'] / 1e9:.0f} | "
        f"{r['share_of_ceiling']:.0%} |"
        for name, r in rows
    ]
    return "\n".join([head, *lines])


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpolab.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a 4-layer, 256-wide GPT-2; 1 repeat, no ablations")
    p.add_argument("--repeats", type=int, default=None, help="TRL/dpolab pairs of runs [default: 3; 1 with --quick]")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker [default: torch's]")
    p.add_argument("--no-ablations", action="store_true", help="skip the one-optimisation-off runs")
    p.add_argument(
        "--ablations",
        default=None,
        metavar="A,B",
        help=f"only these ablation rows (and no TRL precompute or noise-floor row), of {', '.join(ABLATIONS)}",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every worker runs (make DEVICE=)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="dpolab's and TRL's precision, the same for both (dpolab.device: auto is bf16 on a CUDA device with bf16, "
        "else fp32)",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="REF",
        help="also run dpolab as it was at git ref REF beside dpolab now, in lockstep, once per repeat (against.py)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for bench.json and bench.md [default: results/bench; runs/bench-quick with --quick]",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per worker")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DPOLAB_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 done, 1 a worker failed, 2 bad flags; ``dpolab.errors``)."""
    from ..errors import run_command

    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(lambda: _bench(args), prog=parser.prog, debug=args.debug)


def _bench(args: argparse.Namespace) -> int:
    if args.warmup < 2 or args.steps < 1:
        raise ValueError("--warmup must be >= 2 (the step-2 loss check) and --steps >= 1")
    unknown = sorted(set((args.ablations or "").split(",")) - set(ABLATIONS) - {""})
    if unknown:
        raise ValueError(f"--ablations {args.ablations}: unknown rows {unknown}; the rows are {', '.join(ABLATIONS)}")
    out = Path(args.out or ("runs/bench-quick" if args.quick else "results/bench"))
    spec = spec_for(args)
    stats = _token_stats(spec)
    repeats = args.repeats or (1 if args.quick else 3)
    say(
        f"GPT-2 {stats['parameters'] / 1e6:.1f}M, random weights; {spec['batch_size']} Penn pairs per step, "
        f"prompt {stats['prompt_tokens']}, chosen {stats['chosen_tokens']}, rejected {stats['rejected_tokens']} tokens; "
        f"{repeats} repeat(s) of {args.warmup} + {args.steps} steps"
    )
    ceilings = [run_worker("ceiling", spec, args.timeout)]
    say(
        f"matmul ceiling {ceilings[0]['flops_per_s'] / 1e9:.0f} GFLOP/s at {ceilings[0]['shape']} ({ceilings[0]['library']})"
    )
    with tempfile.TemporaryDirectory() as tmp:
        against = export_ref(args.against, Path(tmp)) if args.against else None
        runs = _training_runs(args, spec, repeats, against)
    generation = run_worker("generation", spec, args.timeout)
    reference = run_worker("reference", spec, args.timeout)
    ceilings.append(run_worker("ceiling", spec, args.timeout))  # the machine's best, before and after
    result = _result(spec, stats, ceilings, runs, generation, reference, args.against, against)
    text, lines = _report(result)
    print(text, *lines, *[f"{k}={result[k]:.3f}" for k in _HEADLINE if k in result], sep="\n")
    from ..files import atomic_write_text

    atomic_write_text(out / "bench.json", json.dumps(result, indent=1))
    atomic_write_text(out / "bench.md", _markdown(result, text, lines))
    say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def _training_runs(args: argparse.Namespace, spec: dict, repeats: int, against: tuple[str, Path] | None) -> dict:
    """Every lockstep run: {"trl": [TRL's results], "dpolab": [dpolab's beside them], "against": [(dpolab at the ref,
    dpolab now)], "extra": {variant: (its result, dpolab's in the same run)}}."""
    steps = args.warmup + args.steps

    def paired(variant: str, kind: str = "dpolab", **extra_spec) -> tuple[dict, dict]:
        """One run of ``variant`` in lockstep with dpolab as shipped: (the variant's result, dpolab's)."""
        jobs = [(kind, {**spec, "variant": variant, **extra_spec}), ("dpolab", {**spec, "variant": "dpolab"})]
        other, ours = run_lockstep(jobs, steps, args.timeout)
        say(
            f"{variant}{' at ' + args.against if extra_spec else ''}: {statistics.median(other['step_seconds']):.2f} "
            f"s/step, peak {other['peak_rss_bytes'] / 2**30:.2f} GiB; dpolab in the same run "
            f"{statistics.median(ours['step_seconds']):.2f} s/step, peak {ours['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
        return other, ours

    runs = {"trl": [], "dpolab": [], "against": [], "extra": {}}
    for _ in range(repeats):
        trl, ours = paired("trl", kind="trl")
        check_same_start(trl, ours, spec["precision"])
        runs["trl"].append(trl)
        runs["dpolab"].append(ours)
        if against is not None:
            runs["against"].append(paired("dpolab", source=str(against[1])))
            check_same_start(*runs["against"][-1], spec["precision"])
    if args.ablations:  # a chosen few, quick flag or not
        for variant in args.ablations.split(","):
            runs["extra"][variant] = paired(variant)
    elif not (args.quick or args.no_ablations):
        runs["extra"]["trl-precompute"] = paired("trl-precompute", kind="trl")
        check_same_start(*runs["extra"]["trl-precompute"], spec["precision"])
        runs["extra"]["same"] = paired("dpolab")  # dpolab beside itself: how far one run's two sides land by chance
        for variant in ABLATIONS:
            if variant != "compiled-head" or spec["device"] == "cuda":  # inductor's CPU build: minutes per shape
                runs["extra"][variant] = paired(variant)
    cpu_fp32 = spec["device"] == "cpu" and spec["precision"] == "fp32"
    if not args.quick and cpu_fp32 and cpu_has_native_bf16():  # mixed precision, apart from the fp32 comparison
        runs["extra"]["bf16"] = paired("bf16")
    return runs


_HEADLINE = (
    "speedup_vs_trl",
    "peak_rss_ratio_vs_trl",
    "fraction_of_limit",
    "speed_ratio_vs_against",
    "peak_rss_ratio_vs_against",
)


def _within_runs(pairs: list[tuple[dict, dict]], key: str, ratio) -> float:
    """The median over the runs of ``ratio(a[key], b[key])``, each taken within one lockstep run."""
    return statistics.median(ratio(a[key], b[key]) for a, b in pairs)


def _result(spec, stats, ceilings, runs, generation, reference, ref, against) -> dict:
    """Everything measured, summarised: per-run summaries, medians, the ratios within runs (module docstring)."""
    best = max(ceilings, key=lambda c: c["flops_per_s"])
    ceiling = best["flops_per_s"]

    def summary(result: dict) -> dict:
        return summarize(result, stats, ceiling, spec["batch_size"])

    per_run = {k: [summary(x) for x in runs[k]] for k in ("trl", "dpolab")}
    median = {
        k: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "losses"} | {"losses": v[0]["losses"]}
        for k, v in per_run.items()
    }
    ours_vs_trl = list(zip(per_run["dpolab"], per_run["trl"]))
    out = {
        "spec": spec,
        "tokens": stats,
        "ceilings": ceilings,
        "ceiling_flops_per_s": ceiling,
        "ceiling_library": best["library"],
        "ceiling_shape": best["shape"],
        "runs": {k: runs[k] for k in ("trl", "dpolab")},
        "per_run": per_run,
        "median": median,
        "paired_runs": runs["extra"],
        "versus": {
            v: summary(x) | {"vs_dpolab": summary(x)["seconds_per_step"] / summary(ours)["seconds_per_step"]}
            for v, (x, ours) in runs["extra"].items()
        },
        "generation": generation,
        "reference": reference,
        # the ratios are taken within each lockstep run, then their median over the runs
        "speedup_vs_trl": _within_runs(ours_vs_trl, "pairs_per_s", lambda o, t: o / t),
        "peak_rss_ratio_vs_trl": _within_runs(ours_vs_trl, "peak_rss_bytes", lambda o, t: o / t),
        "fraction_of_limit": median["dpolab"]["share_of_ceiling"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if against is not None:
        pairs = [(summary(then), summary(now)) for then, now in runs["against"]]
        median_then = {m: statistics.median(p[0][m] for p in pairs) for m in pairs[0][0] if m != "losses"}
        out["against"] = {"ref": ref, "commit": against[0], "runs": runs["against"], "per_run": pairs}
        out["against"]["median"] = median_then | {
            "vs_dpolab": _within_runs(pairs, "seconds_per_step", lambda then, now: then / now)
        }
        # > 1: dpolab now takes less time per step than at the ref; rss < 1: now holds less memory
        out["speed_ratio_vs_against"] = out["against"]["median"]["vs_dpolab"]
        out["peak_rss_ratio_vs_against"] = _within_runs(pairs, "peak_rss_bytes", lambda then, now: now / then)
    return out


def _report(result: dict) -> tuple[str, list[str]]:
    """The table and the lines under it."""
    median, versus, ceiling = result["median"], result["versus"], result["ceiling_flops_per_s"]
    rows = [
        ("TRL DPOTrainer", median["trl"] | {"vs_dpolab": result["speedup_vs_trl"]}),
        ("dpolab.train", median["dpolab"]),
    ]
    if "trl-precompute" in versus:
        rows.insert(1, ("TRL DPOTrainer, precompute_ref_log_probs", versus["trl-precompute"]))
    if "against" in result:
        a = result["against"]
        rows.append((f"dpolab at {a['ref']} ({a['commit'][:10]}), beside dpolab now", a["median"]))
    if "same" in versus:
        rows.append(("dpolab as shipped, beside itself (the noise floor of one run)", versus["same"]))
    rows += [(f"dpolab without {ABLATIONS[v].split(':')[0]}", versus[v]) for v in ABLATIONS if v in versus]
    generation, spec = result["generation"], result["spec"]
    lines = [
        f"generation: {generation['prompts']} prompts x {spec['generation_tokens']} new tokens in "
        f"{generation['seconds']:.1f} s ({generation['new_tokens'] / generation['seconds']:,.0f} new tokens/s, "
        "batched, KV cache)",
        "reference log-probs: "
        + ", ".join(f"{k} {v['pairs'] / v['seconds']:.1f} pairs/s" for k, v in result["reference"]["layouts"].items()),
    ]
    if "against" in result:
        a = result["against"]
        lines.append(
            f"dpolab at {a['ref']} ({a['commit'][:10]}, exported with git archive, run from its own tree): "
            f"{len(a['runs'])} runs, each in lockstep beside dpolab now, the same first two losses (asserted); "
            "speed_ratio_vs_against is the median over the runs of its s/step over dpolab now's (above 1: now is "
            "faster), peak_rss_ratio_vs_against of now's peak RSS over its"
        )
    if "peak_gpu_bytes" in median["dpolab"]:  # on CUDA: torch.cuda.max_memory_allocated, each worker's peak
        lines.insert(
            0,
            f"peak GPU memory allocated ({spec['device']}, {spec['precision']}): TRL "
            f"{median['trl']['peak_gpu_bytes'] / 2**30:.2f} GiB, dpolab {median['dpolab']['peak_gpu_bytes'] / 2**30:.2f} "
            "GiB",
        )
    bf16 = versus.get("bf16")
    if bf16 is not None:
        lines.insert(
            0,
            f"bf16 autocast (not part of the fp32 comparison): {bf16['seconds_per_step']:.2f} s/step, "
            f"{bf16['pairs_per_s']:.2f} pairs/s, {1 / bf16['vs_dpolab']:.2f}x dpolab's fp32 in the same run, "
            f"peak RSS {bf16['peak_rss_bytes'] / 2**30:.2f} GiB",
        )
    return table(rows, ceiling), lines


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl")}


def _markdown(result: dict, text: str, lines: list[str]) -> str:
    s, t = result["spec"], result["tokens"]
    return "\n".join(
        [
            "# `make bench`: dpolab.train against TRL's DPOTrainer",
            "",
            f"Measured {result['finished_at']} on {result['machine']['cpus']} CPU cores ({result['machine']['platform']}), "
            f"torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
            f"trl {result['versions']['trl']}; fp32 on both sides.",
            "",
            f"GPT-2 ({t['parameters'] / 1e6:.1f}M parameters, random weights; the reference another random GPT-2), "
            f"{s['batch_size']} Penn pairs per step: prompt {t['prompt_tokens']['min']}-{t['prompt_tokens']['max']}, "
            f"chosen {t['chosen_tokens']['min']}-{t['chosen_tokens']['max']}, rejected {t['rejected_tokens']['min']}-"
            f"{t['rejected_tokens']['max']} tokens (EOS included); the padded layout is "
            f"{t['padded_layout_padding_share']:.0%} padding. Each run is two processes in lockstep (``dpolab/bench/"
            f"lockstep.py``): they take turns, one optimizer step each, so that neighbouring steps meet the same machine. "
            f"Medians of {s['timed_steps']} timed steps after {s['warmup_steps']} warm-up steps; TRL against dpolab: "
            f"{len(result['runs']['trl'])} runs, each ratio taken within a run, then the median over the runs (every "
            "other figure of those two rows is the median over the runs); every other row: one run beside dpolab as "
            "shipped, and its time divided by dpolab's in that run (dpolab beside itself shows how far such a one-run "
            "ratio strays from 1 by chance).",
            "",
            f"Both: DPO (sigmoid) loss at beta {s['beta']}, AdamW at a constant lr {s['lr']:g}, gradient clipping at 1.0, "
            "the same pairs in the same order, the same loss at steps 1 and 2 (asserted). TRL's DPOTrainer runs with its "
            "defaults except `bf16=False` (fp32 like ours), `gradient_checkpointing=False` (its default recomputes "
            "activations: slower here), an explicit `ref_model` and a sequential sampler; it runs the reference model in "
            "every step unless `precompute_ref_log_probs` (its own row). dpolab.train runs with its defaults: shared-prefix "
            "packing, the fused LM head, the fused GELU folded into the MLP's projection, the tied "
            "embedding's gradient added in place, the layer norms' outputs recomputed in the backward, the products of "
            "its autograd functions through oneDNN, fused AdamW, reference log-probs precomputed (before the timed "
            "steps).",
            "",
            text,
            "",
            *[f"- {line}" for line in lines if line],
            f"- minimal work per pair {t['minimal_flops_per_pair'] / 1e9:.1f} GFLOP (``dpolab/bench/flops.py``); "
            f"the ceiling is the fastest fp32 product of this run ({result['ceiling_library']} at "
            f"{result['ceiling_shape']}; `torch.mm` and oneDNN timed at the model's shapes, before and after the runs).",
            "",
            "```",
            *[f"{k}={result[k]:.3f}" for k in _HEADLINE if k in result],
            "```",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
