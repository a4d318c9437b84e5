"""What the benchmark measures, each in a process of its own: ``python -m dpolab.bench.workers KIND SPEC OUT``.

Every worker builds the same inputs from the spec: a GPT-2 of the spec's size with random weights (policy: seed 0,
reference: seed 1, so the first step's loss is not the trivial log 2), GPT-2's tokenizer, and the first
``steps x batch_size`` Penn training pairs in dpolab's step order. A training worker times each optimizer step from
its start to its end (collation, forward, backward, clipping, AdamW and logging included; ``lockstep.Gate``: in
lockstep, from the coordinator's "go") and reports its peak resident memory (``ru_maxrss``: the process's high-water
mark, model building included; on CUDA also the peak of ``torch.cuda.max_memory_allocated``). It writes one JSON
file; nothing else leaves the process. Every worker runs on the spec's ``device`` in its ``precision`` ("fp32" or
"bf16", resolved by the coordinator through ``dpolab.device``): dpolab and TRL alike.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["WORKERS", "random_gpt2", "timed_rows"]


def random_gpt2(spec: dict, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**spec["model"]))


def timed_rows(spec: dict):
    """The Penn pairs of the timed steps, in the order dpolab.train visits them (epoch 0 of seed 0)."""
    from ..data import load_penn
    from ..train.examples import epoch_order

    n = spec["batch_size"] * (spec["warmup_steps"] + spec["timed_steps"])
    rows = load_penn()["train"].select(range(n))
    return rows, epoch_order(0, 0, n)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device(spec: dict) -> torch.device:
    return torch.device(spec.get("device", "cpu"))


def _memory(spec: dict) -> dict:
    """Peak resident memory; on CUDA also the peak of the device memory torch allocated."""
    out = {"peak_rss_bytes": _peak_rss_bytes()}
    if _device(spec).type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return out


def _weights_digest(model) -> str:
    from ..train.reference import weights_hash

    return weights_hash(model)[:16]


def _gate(spec: dict):
    from .lockstep import Gate

    return Gate(*spec.get("gate", (None, None)))


def _timings(gate, spec: dict) -> dict:
    return {"step_seconds": gate.step_seconds(spec["warmup_steps"]), "step_intervals": gate.intervals()}


# dpolab.train with one speed-up switched off or changed: variant -> its Speedups fields (dpolab.train.Speedups)
ABLATIONS = {
    "padded": {"packing": False},
    "chunked-head": {"lm_head": "chunked"},
    "compiled-head": {"lm_head": "compiled"},
    "python-gelu": {"fuse_activations": False},
    "foreach-adamw": {"fused_optimizer": False},
    "dense-embedding-grad": {"inplace_tied_embedding_grad": False},
    "saved-layer-norms": {"recompute_layer_norms": False},
    "mkl-products": {"onednn_products": False},
}


def train_dpolab(spec: dict) -> dict:
    """dpolab.train on the spec's pairs; ``spec["variant"]``: one speed-up off (``ABLATIONS``), or "bf16" autocast."""
    from ..models import gpt2_tokenizer
    from ..train import Speedups, TrainConfig, train

    variant = spec.get("variant", "dpolab")
    tokenizer = gpt2_tokenizer()
    rows, _ = timed_rows(spec)
    policy = random_gpt2(spec, seed=0)
    digest = _weights_digest(policy)
    steps = spec["warmup_steps"] + spec["timed_steps"]
    config = TrainConfig(
        loss="dpo",
        beta=spec["beta"],
        learning_rate=spec["lr"],
        min_learning_rate=spec["lr"],
        batch_size=spec["batch_size"],
        epochs=1,
        max_steps=steps,
        seed=0,
        use_ref_cache=False,
        progress=False,
        speedups=Speedups(**ABLATIONS.get(variant, {})),
        device=spec.get("device", "cpu"),
        precision="bf16" if variant == "bf16" else spec.get("precision", "fp32"),
    )
    gate, losses = _gate(spec), []

    def on_step(row):
        losses.append(row["loss"])
        gate.step_done()

    # the reference is built inside the call and dropped by train() once its log-probs are computed
    train(policy, tokenizer, rows, config, ref_model=random_gpt2(spec, seed=1), on_step=on_step)
    return {**_timings(gate, spec), "losses": losses, **_memory(spec), "initial_weights": digest}


def train_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the same pairs, in the same order (sequential sampler), same hyperparameters."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ..models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    rows, order = timed_rows(spec)
    rows = rows.select(order.tolist())
    data = Dataset.from_dict({key: list(rows[key]) for key in ("prompt", "chosen", "rejected")})
    policy = random_gpt2(spec, seed=0)
    digest = _weights_digest(policy)
    reference = random_gpt2(spec, seed=1).eval()
    gate = _gate(spec)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            gate.step_done()

    with tempfile.TemporaryDirectory() as work:
        args = DPOConfig(
            output_dir=work,
            beta=spec["beta"],
            learning_rate=spec["lr"],
            lr_scheduler_type="constant",
            per_device_train_batch_size=spec["batch_size"],
            max_steps=spec["warmup_steps"] + spec["timed_steps"],
            train_sampling_strategy="sequential",
            seed=0,
            bf16=spec.get("precision", "fp32") == "bf16",  # the same precision as dpolab's side
            use_cpu=_device(spec).type == "cpu",
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            gradient_checkpointing=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            max_length=spec["model"].get("n_positions", 1024),
            precompute_ref_log_probs=spec.get("variant") == "trl-precompute",
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        del reference
        trainer.train()
        log = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    return {
        **_timings(gate, spec),
        "losses": [float(e["loss"]) for e in log],
        **_memory(spec),
        "initial_weights": digest,
    }


def ceiling(spec: dict) -> dict:
    """The matmul ceiling: on a CPU fp32, on the model's own product shapes and a large square one; on CUDA, in the
    run's precision, a large square product timed with CUDA events."""
    from .flops import cuda_matmul_ceiling, matmul_ceiling

    if _device(spec).type == "cuda":
        dtype = torch.bfloat16 if spec.get("precision") == "bf16" else torch.float32
        return cuda_matmul_ceiling(_device(spec), dtype)

    tokens, width, vocab = spec["ceiling_tokens"], spec["model"]["n_embd"], spec["model"]["vocab_size"]
    shapes = [
        (tokens, width, 3 * width),
        (tokens, width, 4 * width),
        (tokens, 4 * width, width),
        (tokens, width, min(vocab, 8192)),
        (2048, 2048, 2048),
    ]
    return matmul_ceiling(shapes)


def generation(spec: dict) -> dict:
    """dpolab.eval.generate on the first test prompts: batched, KV cache, top-k 30, temperature 1."""
    from ..data import load_penn
    from ..eval import SamplingConfig, generate
    from ..models import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    prompts = list(load_penn()["test"]["prompt"])[: spec["generation_prompts"]]
    model = random_gpt2(spec, seed=0).eval().to(_device(spec))
    config = SamplingConfig(max_new_tokens=spec["generation_tokens"])
    generate(model, tokenizer, prompts[:8], config, seed=1)  # warm-up
    start = time.perf_counter()
    out = generate(model, tokenizer, prompts, config, seed=0)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "prompts": len(prompts),
        "new_tokens": sum(map(len, out.completion_ids)),
        **_memory(spec),
    }


def reference(spec: dict) -> dict:
    """dpolab's reference log-prob precomputation over ``reference_pairs`` pairs, packed and padded."""
    from ..data import load_penn
    from ..data.collate import tokenize_preferences
    from ..models import gpt2_tokenizer
    from ..train import reference as ref

    tokenizer = gpt2_tokenizer()
    rows = load_penn()["train"].select(range(spec["reference_pairs"]))
    examples = tokenize_preferences(rows, tokenizer)
    model = random_gpt2(spec, seed=1).eval().to(_device(spec))
    out = {}
    for layout in ("packed", "padded"):
        start = time.perf_counter()
        chosen, _ = ref.precompute_reference_logps(
            model,
            examples,
            tokenizer,
            batch_size=2 * spec["batch_size"],
            device=_device(spec),
            autocast_dtype=torch.bfloat16 if spec.get("precision") == "bf16" else None,
            use_cache=False,
            packing=layout == "packed",
        )
        out[layout] = {
            "seconds": time.perf_counter() - start,
            "pairs": len(examples),
            "chosen_sum": float(chosen.sum()),
        }
    return {"layouts": out}


WORKERS = {
    "dpolab": train_dpolab,
    "trl": train_trl,
    "ceiling": ceiling,
    "generation": generation,
    "reference": reference,
}


def main(argv: list[str]) -> int:
    kind, spec_path, out_path = argv
    torch.set_num_threads(json.loads(Path(spec_path).read_text()).get("threads") or torch.get_num_threads())
    result = WORKERS[kind](json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
