"""The README's quickstart, run as it is written: a tiny Llama with a chat template, built here and saved as
``my-model/``, trained with LoRA on conversational pairs with a held-out eval file, from Python and from the command
line, then generating from the saved adapter with the chat template."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO

pytest.importorskip("peft", reason="peft is the [peft] extra that `make test` installs")
pytestmark = pytest.mark.usefixtures("single_thread")

# A chat template of the simplest kind: each message as <|role|>, its content and EOS; the generation prompt opens the
# assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def quickstart_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block between the README's QUICKSTART markers."""
    text = (REPO / "README.md").read_text()
    section = text.split("<!-- BEGIN QUICKSTART -->", 1)[1].split("<!-- END QUICKSTART -->", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, flags=re.S)


def conversational(rows) -> list[dict]:
    """Penn pairs as chats: the user asks for the sentence's end, the assistant gives one."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Finish this: {row['prompt']}"}],
            "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
            "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
        }
        for row in rows
    ]


def build_my_model(folder: Path, chats: list[dict]) -> None:
    """A tiny Llama (2 layers, 64 wide) and a byte-level BPE trained on the rendered chats, with CHAT_TEMPLATE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpolab.tiny import train_tokenizer

    texts = [
        "".join(f"<|{m['role']}|>\n{m['content']}<|endoftext|>\n" for m in row["prompt"] + row[key])
        for row in chats
        for key in ("chosen", "rejected")
    ]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_readme_quickstart_runs_offline(penn, tmp_path, monkeypatch, capsys):
    from dpolab.cli import main
    from dpolab.data import tokenize_preferences

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))  # the reference log-probs' cache, here
    chats = conversational(penn["train"].select(range(24)))
    build_my_model(tmp_path / "my-model", chats)
    for name, part in (("pairs.jsonl", chats[:16]), ("eval.jsonl", chats[16:])):
        Path(name).write_text("".join(json.dumps(row) + "\n" for row in part))
    blocks = quickstart_blocks()
    assert [language for language, _ in blocks] == ["python", "bash", "python"]
    namespace: dict = {}
    for language, code in blocks:
        if language == "python":
            exec(compile(code, "README.md quickstart", "exec"), namespace)
            continue
        for command in code.replace("\\\n", " ").strip().splitlines():
            words = shlex.split(command)
            assert words[0] == "dpolab" and main(words[1:]) == 0, capsys.readouterr().err[-2000:]

    result = namespace["result"]  # Python: LoRA with an eval split
    assert [row["step"] for row in result.eval_history] == [2, 4, 6]
    assert result.eval_history[-1]["eval_loss"] < result.eval_history[0]["eval_loss"] + 1e-3
    assert (tmp_path / "runs/quickstart/merged/config.json").is_file()
    cli = json.loads((tmp_path / "runs/quickstart-cli/history.json").read_text())  # the command line: the same rows
    assert [row["step"] for row in cli if "eval_loss" in row] == [2, 4, 6]
    assert (tmp_path / "runs/quickstart-cli/model/adapter_config.json").is_file()

    out, tokenizer = namespace["out"], namespace["tokenizer"]  # generation from the saved adapter
    question = [{"role": "user", "content": "Where should I study?"}]
    answers = [[{"role": "assistant", "content": text}] for text in ("Penn.", "No.")]
    pair = {"prompt": question, "chosen": answers[0], "rejected": answers[1]}
    assert out.prompt_ids[0] == tokenize_preferences([pair], tokenizer)[0]["prompt_ids"]  # the training prompt's
    assert tokenizer.decode(out.prompt_ids[0]).endswith("<|assistant|>\n")  # the assistant's turn, opened
    assert len(out.completion_ids[0]) >= 1
    written = json.loads((tmp_path / "runs/quickstart-cli/model/adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(tmp_path / "my-model")  # absolute: it loads from anywhere
