"""A tiny decoder and a synthetic instruction set, to try the decoder workflow offline (and to test it).

``python -m hlora.toy DIR`` (or :func:`write_toy_decoder`) writes ``DIR/model`` (a randomly initialised
Llama-architecture model with a word-level tokenizer over the data), ``DIR/train.jsonl`` and ``DIR/dev.jsonl``
(Dolly-style rows with a ``category``). A real run uses a pretrained decoder instead.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "old": "new", "light": "dark",
    "happy": "sad", "early": "late", "open": "closed", "full": "empty", "hard": "soft", "rich": "poor",
}
CAPITALS = {
    "france": "paris", "italy": "rome", "spain": "madrid", "germany": "berlin", "japan": "tokyo",
    "egypt": "cairo", "peru": "lima", "kenya": "nairobi", "canada": "ottawa", "norway": "oslo",
}
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def synthetic_instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of three small tasks (categories): opposites, capitals, counting on by three."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.choice(["opposite", "capital", "count"])
        if kind == "opposite":
            word = rng.choice(list(OPPOSITES))
            row = {"instruction": "Give the opposite of the word.", "context": word, "response": OPPOSITES[word]}
        elif kind == "capital":
            country = rng.choice(list(CAPITALS))
            row = {"instruction": f"What is the capital of {country}?", "context": "",
                   "response": f"the capital of {country} is {CAPITALS[country]}."}
        else:
            i = rng.randrange(len(NUMBERS) - 3)
            row = {"instruction": "Count on by three from the number.", "context": NUMBERS[i],
                   "response": " ".join(NUMBERS[i + 1 : i + 4])}
        rows.append({**row, "category": kind})
    return rows


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer over the words and punctuation of ``texts`` (and the prompt template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hlora.data.instruct import format_prompt

    seen = " ".join(texts + [format_prompt("x", "y")])
    words = sorted(set(re.findall(r"\w+|[^\w\s]", seen)))
    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def tiny_llama(path: str | Path, texts: list[str], hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised Llama-architecture causal LM and a word tokenizer over ``texts``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = word_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # at the default 0.02, tied embeddings bound every logit near 0: nothing can be learnt
        model.model.embed_tokens.weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def row_texts(rows: list[dict[str, str]]) -> list[str]:
    return [v for r in rows for v in r.values()]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_toy_decoder(folder: str | Path, train: int = 600, dev: int = 60, seed: int = 0) -> Path:
    """The tiny model and a train/dev split of the synthetic set under ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = synthetic_instructions(train, seed), synthetic_instructions(dev, seed + 1)
    tiny_llama(folder / "model", row_texts(rows[0] + rows[1]), seed=seed)
    write_jsonl(folder / "train.jsonl", rows[0])
    write_jsonl(folder / "dev.jsonl", rows[1])
    return folder


def main() -> None:  # pragma: no cover - a thin entry point
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m hlora.toy DIR")
    folder = write_toy_decoder(sys.argv[1])
    print(f"wrote {folder}/model, {folder}/train.jsonl, {folder}/dev.jsonl")


if __name__ == "__main__":  # pragma: no cover
    main()
