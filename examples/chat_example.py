"""Build the README's "Base vs chat models" example offline: a base A, its chat finetune, chats.

    python examples/chat_example.py           # writes examples/work-chat/
    xprobe run examples/chat.toml             # tokenizes the chats, activations of A and B

A ("a_base"): the demo's trained GPT-2 (``pipeline/demo/data/model_a``) with a tokenizer that
holds the ChatML tokens ``<|im_start|>`` and ``<|im_end|>`` but no chat template, as Qwen2.5's
base models do. B ("b_instruct"): the demo's finetune of A, shipped the way chat models are: its
eos is ``<|im_end|>``, it has a pad token, a ChatML template and two more tokens
(``<tool_call>``, ``</tool_call>``), its embedding resized to hold them. "b_other": the same
weights with a tokenizer whose ids 300 and 301 are swapped (a model of another vocabulary).
The conversations ask what a standard-library function does; the answer is its docstring.
"""

from __future__ import annotations

import ast
import json
import random
import shutil
import sysconfig
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DATA = Path(__file__).parent.parent / "pipeline" / "demo" / "data"
ROOT = Path(__file__).parent / "work-chat"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversations(n: int) -> list[list[dict[str, str]]]:
    """What does ``module.function`` do? -- its docstring's first paragraph."""
    rng = random.Random(0)
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if not doc or node.name.startswith("_") or path.stem.startswith("_"):
                continue
            chat = [{"role": "system", "content": "You are a Python expert."}]
            chat = chat if rng.random() < 0.3 else []
            chat.append({"role": "user", "content": f"What does {path.stem}.{node.name} do?"})
            chat.append({"role": "assistant", "content": doc.split("\n\n")[0]})
            out.append(chat)
            if len(out) == n:
                return out
    return out


def save(model_dir: Path, tok, out: Path, extra_rows: int) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + extra_rows, mean_resizing=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def main() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(DATA / "model_a")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    save(DATA / "model_a", tok, ROOT / "a_base", 2)

    tok.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]}
    )
    tok.eos_token, tok.pad_token, tok.chat_template = "<|im_end|>", "<|endoftext|>", CHATML
    save(DATA / "b_finetune", tok, ROOT / "b_instruct", 4)

    other = ROOT / "b_other"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(ROOT / "b_instruct", other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[300]], vocab[by_id[301]] = 301, 300
    (other / "tokenizer.json").write_text(json.dumps(spec))

    with (ROOT / "chats.jsonl").open("w") as f:
        for chat in conversations(2000):
            f.write(json.dumps({"messages": chat}) + "\n")
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
