"""LoRA through peft (dpolab.train.adapters): only the adapter trains, the reference is the base model, the adapter
saves, reloads, resumes and merges into a plain transformers model, every speed-up stays exact, and bad input is one
line. Tiny random models (two layers, 32 wide) on the word tokenizer's vocabulary."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import transformers
from conftest import make_tiny_gpt2
from helpers import word_tokenizer

from dpolab.data.collate import PreferenceCollator, tokenize_preferences
from dpolab.logprobs import sequence_logps_from_logits
from dpolab.train import METRICS, TrainConfig, train
from dpolab.train.adapters import merge_adapter, peft_config_dict, peft_config_object

peft = pytest.importorskip("peft", reason="peft is the [peft] extra that `make test` installs")
pytestmark = pytest.mark.usefixtures("single_thread")

TOKENIZER = word_tokenizer()
ROWS = [
    {"prompt": p, "chosen": " " + c, "rejected": " " + r}
    for p, c, r in [
        ("the sun was bright", "and we walk to the penn campus", "and we walk to the park"),
        ("my dog and my cat", "were at the university library today", "were at home today"),
        ("after the lecture we", "had tea at the penn museum", "had coffee"),
        ("the train was late so", "we walk to campus with students of penn", "we walk home in the rain"),
    ]
]
EXAMPLES = tokenize_preferences(ROWS, TOKENIZER)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def config(**kw) -> TrainConfig:
    base = dict(
        progress=False,
        use_ref_cache=False,
        batch_size=4,
        epochs=20,
        learning_rate=1e-2,
        min_learning_rate=1e-2,
        max_steps=4,
    )
    return TrainConfig(**{**base, **kw})


@torch.no_grad()
def own_logps(model) -> torch.Tensor:
    """(2B,) chosen then rejected log-probs of EXAMPLES from the model's own forward logits (eval mode)."""
    was_training = model.training
    model.eval()
    batch = PreferenceCollator(pad_token_id=1)(EXAMPLES)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    return sequence_logps_from_logits(logits, batch["input_ids"], batch["completion_mask"])


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_only_the_adapter_trains_against_the_base_model(tmp_path, targets):
    """A random (non-zero) initial adapter, so the adapted policy differs from the base model from the start: the
    loss falls, every base weight stays bit-identical, the cached reference log-probs are the base model's own, and the
    first step's log-probs are the adapted model's own and its rewards beta (log pi_adapted - log pi_base); with the
    LM head adapted too, dpolab's lean head falls back to the model's logits, as exact."""
    base = tiny_llama()
    expected_reference = own_logps(base)
    before = weights(base)
    lora = peft.LoraConfig(**{**LORA, "target_modules": targets}, init_lora_weights=False)
    torch.manual_seed(7)  # the adapter's random initialisation (nothing else draws before it)
    result = train(base, TOKENIZER, ROWS, config(peft_config=lora, use_ref_cache=True, ref_cache_dir=str(tmp_path)))
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.05
    assert isinstance(result.model, peft.PeftModel) and result.model.get_base_model() is base
    with result.model.disable_adapter():
        after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    (cached,) = tmp_path.glob("*/logps.safetensors")
    from safetensors.torch import load_file

    reference = load_file(str(cached))["logps"].flatten()
    torch.testing.assert_close(reference, expected_reference, rtol=1e-5, atol=1e-5)
    first = result.history[0]  # metrics of step 1 are taken before its update: the initial adapter's
    fresh = tiny_llama()
    torch.manual_seed(7)
    adapted = own_logps(peft.get_peft_model(fresh, lora))
    assert (adapted - expected_reference).abs().max() > 0.1
    beta, half = TrainConfig().beta, len(ROWS)
    assert first["logps/chosen"] == pytest.approx(adapted[:half].mean().item(), rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(adapted[half:].mean().item(), rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(beta * (adapted - reference)[:half].mean().item(), abs=1e-4)


def test_a_peft_model_given_trains_its_adapter_against_itself():
    """TRL 1.16 copies a given PeftModel's adapter as its frozen reference: the first step's rewards are zero (policy
    and reference agree), and only that adapter changes."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA, init_lora_weights=False))
    start, base = adapter(model), {k: v for k, v in weights(model).items() if "lora_" not in k}
    result = train(model, TOKENIZER, ROWS, config())
    assert result.model is model
    first = result.history[0]  # to float rounding: the reference was scored in other batches than step 1's
    assert (first["rewards/chosen"], first["rewards/margins"]) == pytest.approx((0.0, 0.0), abs=1e-5)
    assert result.history[-1]["rewards/margins"] > 0.05
    assert all(not torch.equal(v, start[k]) for k, v in adapter(model).items())
    assert all(torch.equal(v, base[k]) for k, v in weights(model).items() if "lora_" not in k)


def test_the_adapter_saves_reloads_and_merges(tmp_path):
    """The adapter written by dpolab train's save_model_folder reloads with peft and with dpolab.models.load_model (the
    base model found from adapter_config.json); merged, it is a plain transformers model with the adapted model's
    log-probs, which also survives save_pretrained and a reload."""
    from dpolab.cli import save_model_folder
    from dpolab.models import load_model

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    TOKENIZER.save_pretrained(base_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    result = train(base, TOKENIZER, ROWS, config(peft_config=peft.LoraConfig(**LORA)))
    adapted = own_logps(result.model)
    assert (adapted - own_logps(transformers.AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 0.01
    folder = save_model_folder(tmp_path / "run", result.model, TOKENIZER)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), folder)
    torch.testing.assert_close(own_logps(reloaded), adapted, rtol=0, atol=1e-6)
    loaded, tokenizer, _ = load_model(str(folder))
    assert isinstance(loaded, peft.PeftModel) and len(tokenizer) == len(TOKENIZER)
    torch.testing.assert_close(own_logps(loaded), adapted, rtol=0, atol=1e-6)
    merged = merge_adapter(result.model)
    assert type(merged) is transformers.LlamaForCausalLM
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(own_logps(merged), adapted, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(own_logps(again), adapted, rtol=1e-5, atol=1e-5)


def test_a_peft_run_resumes_bit_identically(tmp_path):
    """Stopped after step 3 of 6 (checkpoints every 2 steps: the adapter alone, peft's files), resumed on a fresh base
    model: the same history and adapter as one uninterrupted run."""
    lora = peft.LoraConfig(**LORA)
    whole = train(tiny_llama(), TOKENIZER, ROWS, config(peft_config=lora, max_steps=6))

    def stop(row):
        if row["step"] == 3:
            raise RuntimeError("stopped")

    settings = config(peft_config=lora, max_steps=6, output_dir=str(tmp_path), save_steps=2, save_total_limit=3)
    base = tiny_llama()
    untouched = {"classes": [type(m) for m in base.modules()], "grad": [p.requires_grad for p in base.parameters()]}
    with pytest.raises(RuntimeError, match="stopped"):
        train(base, TOKENIZER, ROWS, settings, on_step=stop)
    assert {"classes": [type(m) for m in base.modules()], "grad": [p.requires_grad for p in base.parameters()]} == (
        untouched
    )  # the adapter is taken out again when train raises
    files = sorted(p.name for p in (tmp_path / "checkpoint-00000002").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "trainer_state.pt"]
    saved = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-00000002")
    assert saved.peft_config["default"].r == 4
    resumed = train(tiny_llama(), TOKENIZER, ROWS, TrainConfig(**{**settings.to_dict(), "resume": True}))
    assert resumed.resumed_from_step == 2
    assert resumed.history == whole.history
    mine, theirs = adapter(resumed.model), adapter(whole.model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_gpt2_speedups_stay_exact_with_an_adapter(small_tokenizer, penn, targets):
    """GPT-2's speed-ups match plain modules by exact type: with LoRA on the attention only, the MLP's GELU is still
    folded into its projection and the layer norm before c_fc recomputed; with LoRA on every projection, only the
    GELU module is swapped. Either way three steps equal those with every speed-up off, and gradient checkpointing
    changes nothing either; afterwards every module has its class back."""
    from dpolab.train import Speedups
    from dpolab.train.speedups import GELUProjection, NormThenConv1D

    rows = penn["train"].select(range(8))
    runs, seen = [], []
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True)
    off = {"speedups": Speedups(fuse_activations=False, inplace_tied_embedding_grad=False, recompute_layer_norms=False)}
    for settings in ({}, off, {"gradient_checkpointing": True}):
        model = make_tiny_gpt2(small_tokenizer)
        classes = [(name, type(m)) for name, m in model.named_modules()]
        mlp = model.transformer.h[0].mlp

        def look(row, mlp=mlp):
            seen.append({type(m) for m in mlp.modules()})

        result = train(model, small_tokenizer, rows, config(peft_config=lora, max_steps=3, **settings), on_step=look)
        runs.append((result.history, adapter(result.model)))
        base_classes = [(name.removeprefix("base_model.model."), type(m)) for name, m in result.model.named_modules()]
        assert [c for c in base_classes if c in classes] == [c for c in classes if c in base_classes]
        assert not any(t in (GELUProjection, NormThenConv1D) for _, t in base_classes)
    fused = GELUProjection in seen[0] and NormThenConv1D in seen[0]
    assert fused == (targets == ["c_attn"])
    (h0, a0), *others = runs
    for history, weights_ in others:
        for r0, r1 in zip(h0, history, strict=True):
            scale = 1 + abs(r0["logps/chosen"]) + abs(r0["logps/rejected"])  # rewards: differences of such sums
            for key in METRICS:
                assert r1[key] == pytest.approx(r0[key], rel=1e-5, abs=1e-6 * scale), key
        for name in a0:
            torch.testing.assert_close(weights_[name], a0[name], rtol=1e-4, atol=1e-5)  # AdamW: ~lr per step


def test_peft_config_is_kept_as_json_and_rebuilds():
    """TrainConfig keeps the type, task, rank, alpha, dropout, targets and the other non-default fields, as JSON; the
    config rebuilt from them equals the one given (peft's own to_dict), and a TrainConfig rebuilt from its to_dict
    equals it."""
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj", "q_proj"], use_rslora=True)
    c = TrainConfig(peft_config=lora)
    assert c.peft_config == {
        "peft_type": "LORA",
        "task_type": None,
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
    }
    assert TrainConfig(**json.loads(json.dumps(c.to_dict()))) == c
    assert peft_config_object(c.peft_config).to_dict() == lora.to_dict()
    assert peft_config_dict(c.peft_config) == c.peft_config


def test_bad_peft_input_is_one_clear_line(monkeypatch):
    model = tiny_llama()
    with pytest.raises(ValueError) as caught:
        train(model, TOKENIZER, ROWS, config(peft_config=peft.LoraConfig(target_modules=["q_prj"])))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("peft_config: target_modules ['q_prj'] match no module of ")
    assert "its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    assert [type(m) for m in model.modules()] == [type(m) for m in tiny_llama().modules()]
    wrapped = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**LORA))
    with pytest.raises(ValueError, match=r"^peft_config: the model already is a PeftModel .*merge it first"):
        train(wrapped, TOKENIZER, ROWS, config(peft_config=peft.LoraConfig(**LORA)))
    with pytest.raises(ValueError, match=r"^peft_config: PROMPT_TUNING adds virtual tokens, not weights"):
        train(tiny_llama(), TOKENIZER, ROWS, config(peft_config=peft.PromptTuningConfig(num_virtual_tokens=4)))
    with pytest.raises(ValueError, match=r"^peft_config must be a peft config .*or its dict with a 'peft_type'"):
        TrainConfig(peft_config={"r": 8})
    inference = copy.deepcopy(wrapped)  # as a PeftModel loaded for inference: nothing trains
    for p in inference.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^no parameter of PeftModel requires a gradient"):
        train(inference, TOKENIZER, ROWS, config())
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"^peft_config needs the peft package.*pip install 'dpolab\[peft\]'"):
        TrainConfig(peft_config={"peft_type": "LORA"})


@pytest.mark.trl
def test_cli_lora_flags_give_trls_lora_config():
    """dpolab train's LoRA flags build the LoraConfig TRL's get_peft_config builds from the same ModelConfig flags."""
    pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
    from trl import ModelConfig
    from trl.trainer.utils import get_peft_config

    from dpolab.cli import build_parser, train_config

    cases = [
        (["--use-peft"], {"use_peft": True}),
        (
            ["--lora-r", "8", "--lora-alpha", "16", "--lora-target", "q_proj", "v_proj", "--lora-dropout", "0.1"],
            {
                "use_peft": True,
                "lora_r": 8,
                "lora_alpha": 16,
                "lora_target_modules": ["q_proj", "v_proj"],
                "lora_dropout": 0.1,
            },
        ),
        (
            ["--lora-target", "all-linear", "--use-dora", "--use-rslora", "--lora-modules-to-save", "lm_head"],
            {
                "use_peft": True,
                "lora_target_modules": ["all-linear"],
                "use_dora": True,
                "use_rslora": True,
                "lora_modules_to_save": ["lm_head"],
            },
        ),
    ]
    for flags, trl_flags in cases:
        ours = train_config(build_parser().parse_args(["train", *flags])).peft_config
        assert ours == TrainConfig(peft_config=get_peft_config(ModelConfig(**trl_flags))).peft_config, flags
    assert train_config(build_parser().parse_args(["train"])).peft_config is None


def test_cli_trains_lora_and_merges(tmp_path, capsys):
    """dpolab train --lora-r ... writes the adapter as model/, which --model trains further; with --merge, a plain
    model; --merge without LoRA, LoRA flags on an adapter folder and targets that match nothing are one line each."""
    from dpolab.cli import main

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    TOKENIZER.save_pretrained(base_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    common = ["train", "--model", str(base_dir), "--data", str(data), "--max-steps", "2", "--batch-size", "4"]
    common += ["--no-progress", "--ref-cache-dir", str(tmp_path / "cache")]
    lora = ["--lora-r", "4", "--lora-target", "q_proj", "v_proj"]
    assert main([*common, *lora, "--output-dir", str(tmp_path / "adapter")]) == 0
    written = json.loads((tmp_path / "adapter" / "model" / "adapter_config.json").read_text())
    assert (written["r"], written["task_type"], written["peft_type"]) == (4, "CAUSAL_LM", "LORA")
    assert written["base_model_name_or_path"] == str(base_dir)  # under /tmp: written as it is (files.portable_text)
    adapter_dir = tmp_path / "adapter" / "model"  # an adapter folder as --model: its adapter trains further
    more = ["--max-steps", "1", "--output-dir", str(tmp_path / "more")]
    assert main([*common[:2], str(adapter_dir), *common[3:], *more]) == 0
    assert json.loads((tmp_path / "more" / "model" / "adapter_config.json").read_text())["r"] == 4
    assert main([*common[:2], str(adapter_dir), *common[3:], *lora, *more, "--overwrite"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"dpolab train: error: --model {adapter_dir} holds a PEFT adapter, which is trained further as it is: leave "
            "out the LoRA flags, or pass its merged model (dpolab train ... --merge) to train a new adapter"
        )
    )
    assert main([*common, *lora, "--merge", "--output-dir", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "model")
    assert type(merged) is transformers.LlamaForCausalLM
    capsys.readouterr()
    assert main([*common, "--merge", "--output-dir", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dpolab train: error: --merge folds a LoRA adapter into the model, and --model {base_dir} trains none: pass "
        "--lora-r (or --use-peft), or leave out --merge"
    )
    assert main([*common, "--lora-target", "attn", "--output-dir", str(tmp_path / "none")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dpolab train: error: peft_config: target_modules ['attn'] match no module of ")
    assert last.endswith("target some of them (--lora-target q_proj v_proj) or 'all-linear'")
