"""Exact log-probs on any causal LM (dpolab.lm_head): every path dpolab takes equals the model's own forward logits.

A matrix of tiny random models (two layers, 32 wide, the word tokenizer's vocabulary): GPT-2, Llama, Qwen2, Mistral,
GPT-NeoX, Gemma-2 with a final-logit soft-cap of 0.5, Cohere (logit scale) and Granite (logits scaling). Their LM
heads are scaled up so that the logits are large and the soft-cap and scales change the log-probs by many nats.
dpolab's padded and packed log-probs, through the fused head and the chunked one, equal
``sequence_logps_from_logits(model(...).logits)`` in value and in gradient with respect to every parameter; one
training step equals TRL's DPOTrainer step. Models dpolab cannot take the lean way (an unknown post-head transform,
ALiBi positions, a sliding window shorter than a sequence) fall back by themselves, say so once, and stay exact.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import transformers
from helpers import word_tokenizer

from dpolab.data.collate import PreferenceCollator, tokenize_preferences
from dpolab.data.packing import PackedPreferenceCollator, unpack
from dpolab.lm_head import LogitTransform, lean_head, logit_transform
from dpolab.logprobs import concatenated_logps, linear_log_softmax, packed_logps, sequence_logps_from_logits
from dpolab.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("single_thread")

TOKENIZER = word_tokenizer()
V = len(TOKENIZER)
IDS = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
DECODER = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    **IDS,
}
ARCHITECTURES = {  # name -> (config, the post-head transform transformers' forward applies)
    "gpt2": (
        transformers.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **IDS,
        ),
        LogitTransform(),
    ),
    "llama": (transformers.LlamaConfig(**DECODER), LogitTransform()),
    "qwen2": (transformers.Qwen2Config(**DECODER), LogitTransform()),
    "mistral": (transformers.MistralConfig(**DECODER, sliding_window=64), LogitTransform()),
    "gpt_neox": (
        transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **IDS
        ),
        LogitTransform(),
    ),
    "gemma2": (
        transformers.Gemma2Config(**DECODER, head_dim=8, final_logit_softcapping=0.5, sliding_window=64),
        LogitTransform(softcap=0.5),
    ),
    "cohere": (transformers.CohereConfig(**DECODER, logit_scale=0.25), LogitTransform(scale=0.25)),
    "granite": (transformers.GraniteConfig(**DECODER, logits_scaling=4.0), LogitTransform(scale=0.25)),
}
ROWS = [  # (prompt, chosen, rejected): the word tokenizer splits on spaces, so " " + chosen tokenizes as chosen
    ("the sun was bright", "and we walk to the penn campus", "and we walk to the park"),
    ("my dog and my cat", "were at the university library today", "were at home today"),
    ("after the lecture we", "had tea at the penn museum", "had coffee"),
    ("the train was late so", "we walk to campus with students of penn", "we walk home in the rain"),
]


def tiny(name: str, seed: int = 0, head_scale: float = 20.0, cls=None) -> torch.nn.Module:
    """A random tiny model of architecture ``name`` in eval mode, its LM head scaled so its logits are large."""
    config, _ = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = (cls or transformers.AutoModelForCausalLM.from_config)(copy.deepcopy(config)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model


@pytest.fixture(scope="module")
def examples():
    rows = {"prompt": [r[0] for r in ROWS], "chosen": [r[1] for r in ROWS], "rejected": [r[2] for r in ROWS]}
    return tokenize_preferences([dict(zip(rows, values)) for values in zip(*rows.values())], TOKENIZER)


def own_logps(model, examples) -> torch.Tensor:
    """(2B,) chosen then rejected log-probs from the model's own full forward logits, on the padded batch."""
    batch = PreferenceCollator(pad_token_id=1)(examples)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps_from_logits(logits, batch["input_ids"], batch["completion_mask"])


def value_and_grads(model, logps_fn) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """logps_fn()'s values and the gradients of a weighted sum of them with respect to every parameter."""
    model.zero_grad(set_to_none=True)
    values = logps_fn()
    (values * torch.linspace(-1.0, 2.0, values.shape[0])).sum().backward()
    return values.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=2e-5)
    for mine, reference in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5 * (1 + reference.abs().max().item()))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_path_equals_the_models_own_logits(name, examples, caplog):
    """Padded, packed (the fused head), packed (the head in recomputed chunks): values and parameter gradients of the
    model's own forward. For the soft-capped and scaled models, the head without its transform is many nats off."""
    model = tiny(name, seed=sorted(ARCHITECTURES).index(name))
    padded = {k: v for k, v in PreferenceCollator(pad_token_id=1)(examples).items() if k != "index"}
    packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
    assert packed["input_ids"].shape[0] < 4  # several pairs share a row: the segment mask matters
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        theirs = value_and_grads(model, lambda: own_logps(model, examples))
        for logps in (
            lambda: torch.cat(concatenated_logps(model, padded)),
            lambda: torch.cat(packed_logps(model, packed)),
            lambda: torch.cat(packed_logps(model, packed, chunk_size=5, lm_head="chunked")),
        ):
            assert_same(value_and_grads(model, logps), theirs)
    assert [r.message for r in caplog.records if r.name == "dpolab"] == []  # the lean head, packed: no fallback
    expected = ARCHITECTURES[name][1]
    assert lean_head(model, padded["input_ids"]).transform == expected == logit_transform(model.config)
    if not expected.identity:  # the transform matters: without it the log-probs are far off
        head = model.get_output_embeddings()
        with torch.no_grad():
            hidden = model.base_model(input_ids=padded["input_ids"]).last_hidden_state
            plain = sequence_logps_from_logits(head(hidden), padded["input_ids"], padded["completion_mask"])
        assert (plain - theirs[0]).abs().max() > 3.0


def test_the_compiled_head_equals_the_models_own_logits(examples, monkeypatch):
    """lm_head="compiled" (torch.compile of the chunked head, ``dpolab.logprobs.chunked_token_logps``): the model's
    own log-probs and parameter gradients. Compiled here by torch.compile's "aot_eager" backend (dynamo's graph and
    AOTAutograd's backward, without inductor's C++ build, which takes minutes on a small CPU; the gpu tests compile
    with the default backend)."""
    import dpolab.logprobs

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    dpolab.logprobs._compiled_chunk_token_logps.cache_clear()
    try:
        model = tiny("gpt2")
        packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
        theirs = value_and_grads(model, lambda: own_logps(model, examples))
        ours = value_and_grads(model, lambda: torch.cat(packed_logps(model, packed, chunk_size=5, lm_head="compiled")))
        assert_same(ours, theirs)
    finally:
        dpolab.logprobs._compiled_chunk_token_logps.cache_clear()  # the next caller compiles with the real backend


@pytest.mark.parametrize("softcap", [None, 0.7])
@pytest.mark.parametrize("chunk_size", [13, 4], ids=["one-token-block", "four-token-blocks"])
def test_fused_head_with_a_transform_equals_autograd(softcap, chunk_size):
    """linear_log_softmax(T(.)) against the naive log_softmax(T(h W^T + b)) through autograd, with a bias, several
    vocabulary chunks and token blocks: the cap's derivative s (1 - (z'/c)^2) in the backward."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight = (3 * torch.randn(50, 8, generator=g)).requires_grad_()
    bias = torch.randn(50, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (13,), generator=g)
    transform = LogitTransform(scale=0.3, softcap=softcap)
    weights = torch.randn(13, generator=g)
    naive = torch.log_softmax(transform(torch.nn.functional.linear(hidden, weight, bias)), -1)
    naive = naive.gather(-1, labels[:, None])[:, 0]
    expected = torch.autograd.grad((naive * weights).sum(), (hidden, weight, bias))
    fused = linear_log_softmax(
        hidden,
        weight,
        bias,
        labels,
        chunk_size=chunk_size,
        vocab_chunk=16,
        transform=transform,
    )
    got = torch.autograd.grad((fused * weights).sum(), (hidden, weight, bias))
    torch.testing.assert_close(fused, naive.detach(), rtol=1e-5, atol=1e-5)
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def dpolab_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpolab"]


class SquaredLogits(transformers.LlamaForCausalLM):
    """A causal LM with a post-head transform dpolab does not know (logits -> 2 z + z^2 / 10), as a user's own
    subclass might have."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 2 * out.logits + out.logits.square() / 10
        return out


def test_an_unknown_post_head_transform_falls_back_to_the_models_logits_and_says_so_once(examples, caplog):
    model = tiny("llama", cls=SquaredLogits)
    padded = {k: v for k, v in PreferenceCollator(pad_token_id=1)(examples).items() if k != "index"}
    packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        theirs = value_and_grads(model, lambda: own_logps(model, examples))
        assert_same(value_and_grads(model, lambda: torch.cat(concatenated_logps(model, padded))), theirs)
        assert_same(value_and_grads(model, lambda: torch.cat(packed_logps(model, packed))), theirs)
        concatenated_logps(model, padded)
    (message,) = dpolab_warnings(caplog)
    assert "SquaredLogits" in message and "model's own forward logits" in message
    assert lean_head(model, padded["input_ids"]) is None


@pytest.mark.parametrize(
    "config, why",
    [
        (transformers.MistralConfig(**DECODER, sliding_window=6), "sliding attention window (6 tokens)"),
        (transformers.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, **IDS), "other log-probs"),  # ALiBi
        (transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, **IDS), "fails on a packed"),
    ],
    ids=["mistral-window", "mpt-alibi", "bloom"],
)
def test_a_packed_layout_the_model_cannot_take_is_scored_padded(config, why, examples, caplog):
    """A sliding window shorter than a sequence (which a 4D mask does not apply), ALiBi's positions (which ignore
    position_ids: packed, the rejected continuation would sit too far from its prompt), a forward that takes no
    4D mask: packed_logps unpacks the batch and scores it padded, values and gradients exact, said once."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        theirs = value_and_grads(model, lambda: own_logps(model, examples))
        assert_same(value_and_grads(model, lambda: torch.cat(packed_logps(model, packed))), theirs)
        packed_logps(model, packed)
    (message,) = dpolab_warnings(caplog)
    assert type(model).__name__ in message and why in message and "padded layout" in message


def test_unpack_gives_back_the_collators_pairs(examples):
    packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
    assert unpack(packed) == [
        {k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "index")} for ex in examples
    ]


def test_the_probe_changes_no_state_and_decides_alike_under_autocast_and_no_grad(examples):
    """The first call comes under bf16 autocast and no_grad, with the model in train mode (dropout 0.1) but one block
    in eval mode: the probe draws no random number, leaves every module's mode as it was, and still finds the
    soft-cap (it runs in the weights' fp32, autocast off)."""
    config = copy.deepcopy(ARCHITECTURES["gemma2"][0])
    config.attention_dropout = 0.1
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).train()
    model.model.layers[0].eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
    modes = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        head = lean_head(model, packed["input_ids"])
        from dpolab.logprobs import _packing_problem

        assert _packing_problem(model, packed) is None
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert head.transform == LogitTransform(softcap=0.5)


def test_a_model_without_logits_is_one_clear_line(examples):
    body = transformers.LlamaModel(transformers.LlamaConfig(**DECODER))
    batch = {k: v for k, v in PreferenceCollator(pad_token_id=1)(examples).items() if k != "index"}
    with pytest.raises(TypeError, match=r"^LlamaModel\(input_ids=\.\.\.\) gives no logits .*AutoModelForCausalLM"):
        concatenated_logps(body, batch)


# --- PEFT -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["q_proj", "lm_head"]])
def test_a_peft_model_gets_its_own_log_probs(targets, examples, caplog):
    """LoRA adapters in the body: the lean head through the wrapped model (no fallback); an adapter on the LM head
    itself: the fallback. Both equal the PEFT model's own logits, values and the adapters' gradients; with the
    adapter disabled, the base model's."""
    peft = pytest.importorskip("peft", reason="peft is the [peft] extra that `make test` installs")
    base = tiny("llama")
    expected_base = own_logps(base, examples).detach()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), lora).eval()
    padded = {k: v for k, v in PreferenceCollator(pad_token_id=1)(examples).items() if k != "index"}
    packed = PackedPreferenceCollator(1, row_tokens=40)(examples)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def adapter_grads(logps_fn):
        values = logps_fn()
        grads = torch.autograd.grad((values * torch.linspace(-1.0, 2.0, values.shape[0])).sum(), trainable)
        return values.detach(), list(grads)

    with caplog.at_level(logging.WARNING, logger="dpolab"):
        theirs = adapter_grads(lambda: own_logps(model, examples))
        assert (theirs[0] - expected_base).abs().max() > 1.0  # the adapters change the log-probs
        assert_same(adapter_grads(lambda: torch.cat(concatenated_logps(model, padded))), theirs)
        assert_same(adapter_grads(lambda: torch.cat(packed_logps(model, packed))), theirs)
        with model.disable_adapter(), torch.no_grad():
            torch.testing.assert_close(torch.cat(packed_logps(model, packed)), expected_base, rtol=1e-5, atol=2e-5)
    warnings = dpolab_warnings(caplog)
    if "lm_head" in targets:
        assert len(warnings) == 1 and "not a floating-point torch.nn.Linear" in warnings[0]
    else:
        assert warnings == []


# --- one training step against TRL ------------------------------------------------------------------------------


@pytest.mark.trl
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_one_training_step_equals_trls(name, tmp_path):
    """dpolab.train's first step and TRL's DPOTrainer's on the same weights, reference and pairs: the loss and the
    policy's log-probs TRL logs, both given the same rows in TRL's standard format (the space in the completion)."""
    pytest.importorskip("trl", reason="trl is part of the [trl] extra that `make test` installs")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = tiny(name, seed=1, head_scale=5.0)
    reference = tiny(name, seed=2, head_scale=5.0)
    rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in ROWS]
    data = Dataset.from_list(rows)
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.5,
        learning_rate=1e-3,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=len(rows),
        max_steps=1,
        logging_steps=1,
        max_length=64,
        use_cpu=True,
        save_strategy="no",
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=data,
        processing_class=TOKENIZER,
    )
    trainer.train()
    theirs = trainer.state.log_history[0]
    config = TrainConfig(
        beta=0.5, learning_rate=1e-3, batch_size=len(rows), max_steps=1, progress=False, use_ref_cache=False
    )
    ours = train(policy, TOKENIZER, rows, config, ref_model=reference).history[0]
    assert abs(theirs["loss"] - math.log(2)) > 1e-2  # two different models: not the trivial log 2
    for key in ("loss", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), key
