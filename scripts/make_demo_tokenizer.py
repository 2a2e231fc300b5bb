#!/usr/bin/env python3
"""Train the small byte-level BPE tokenizer used by the `multilora` demo model.

Run from the repo root:  python3 scripts/make_demo_tokenizer.py

Writes:
  crates/engine/src/demo/tokenizer.json         (HF `tokenizers` format)
  crates/engine/src/demo/tokenizer_config.json  (bos/eos + a simple chat_template)

Corpus: scripts/demo_corpus.txt (plain English prose written for this project).
Special tokens get ids 0,1,2: <|begin_of_text|>, <|end_of_text|>, <|pad|>.
Training is deterministic for a fixed corpus.
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "scripts", "demo_corpus.txt")
OUT_DIR = os.path.join(ROOT, "crates", "engine", "src", "demo")

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]

# Simple Llama-3-like template with plain-text role headers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] | trim }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)

    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([CORPUS], trainer)

    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))

    samples = [
        "Hello, world! How are you today?",
        "select customer_id, count(*) from orders group by customer_id;",
        "The quick brown fox jumps over the lazy dog.\nNew line\ttab  two spaces",
        "Ünïcödé → 東京 🚀 and emoji",
        "<|begin_of_text|>user: What is 2+2?\nassistant: 4<|end_of_text|>",
    ]
    for s in samples:
        enc = tok.encode(s)
        dec = tok.decode(enc.ids, skip_special_tokens=False)
        assert dec == s, (s, dec)
        print(f"{len(enc.ids):3d} tokens  round-trip OK: {s!r}")

    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "tokenizer.json")
    tok.save(path)
    print("vocab size:", tok.get_vocab_size(), " tokenizer.json bytes:", os.path.getsize(path))
    assert os.path.getsize(path) < 300_000

    # Re-load and re-check the saved file.
    tok2 = Tokenizer.from_file(path)
    for s in samples:
        assert tok2.decode(tok2.encode(s).ids, skip_special_tokens=False) == s

    cfg = {
        "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1],
        "pad_token": SPECIAL[2],
        "add_bos_token": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(OUT_DIR, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Validate the chat template renders with jinja2 (if available).
    try:
        import jinja2

        env = jinja2.Environment()
        out = env.from_string(CHAT_TEMPLATE).render(
            bos_token=SPECIAL[0],
            messages=[
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hi there "},
            ],
            add_generation_prompt=True,
        )
        print("chat template render:", repr(out))
    except ImportError:
        print("jinja2 not installed; skipped chat template check")


if __name__ == "__main__":
    main()
