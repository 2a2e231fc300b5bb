#!/usr/bin/env python3
"""Reference log-probabilities (HF transformers + PEFT) for the `multilora` logprobs tests.

Reads what already exists, writes only new files (the fixtures of make_golden.py stay as they are):

1. For every case of crates/engine/tests/golden/<case>/ (model/, adapters/, golden.json written by
   make_golden.py): each golden request's prompt followed by its greedy continuation, run once
   through the model with the request's adapter (or none), and the log-softmax of every
   position kept for the token that follows it. Writes <case>/logprobs.json:
     {"versions": {...}, "requests": [{"token_ids": [...], "prompt_len": P, "lora": name | null,
                                       "logprobs": [null, lp(t1 | t0), lp(t2 | t0 t1), ...]}]}

2. With --demo DIR (the demo model and adapters as `multilora demo --dir DIR` writes them, seed
   0, which the server tests use): lm-evaluation-harness's loglikelihood of a few
   context/continuation pairs, with and without the adapter demo-r8-000: context and
   continuation tokenized apart (the context with BOS), the sum of the continuation tokens'
   log-probabilities, and whether each was the argmax. Writes
   crates/engine/tests/golden/demo_loglikelihood.json.

Run from the repo root:  python3 scripts/make_golden_logprobs.py [--demo DIR]
Needs:                   pip install torch transformers peft safetensors
Written with torch 2.15.0, transformers 5.25.0, peft 0.21.2 (float32, CPU, eager attention).
"""
import argparse
import json
import os

import peft
import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "crates", "engine", "tests", "golden")
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def load(model_dir, adapter_dir=None):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        m = PeftModel.from_pretrained(m, adapter_dir)
    return m.eval()


def position_logprobs(model, ids):
    """[None, lp(ids[1] | ids[:1]), ...]: each token's log-probability given the ones before it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lsm = torch.log_softmax(logits, dim=-1)
    return [None] + [lsm[i - 1, ids[i]].item() for i in range(1, len(ids))], lsm


def golden_cases():
    for case in sorted(os.listdir(GOLDEN)):
        case_dir = os.path.join(GOLDEN, case)
        golden_path = os.path.join(case_dir, "golden.json")
        if not os.path.isfile(golden_path):
            continue
        with open(golden_path) as f:
            golden = json.load(f)
        models = {}
        out = []
        for r in golden["requests"]:
            lora = r["lora"]
            if lora not in models:
                adapter = None if lora is None else os.path.join(case_dir, "adapters", lora)
                models[lora] = load(os.path.join(case_dir, "model"), adapter)
            ids = r["prompt_token_ids"] + r["greedy_token_ids"]
            lps, _ = position_logprobs(models[lora], ids)
            out.append({"token_ids": ids, "prompt_len": len(r["prompt_token_ids"]), "lora": lora, "logprobs": lps})
        path = os.path.join(case_dir, "logprobs.json")
        with open(path, "w") as f:
            json.dump({"versions": VERSIONS, "requests": out}, f)
            f.write("\n")
        print(f"wrote {path} ({len(out)} requests)")


PAIRS = [
    ("The capital of France is", " Paris"),
    ("Question: how do I count rows in SQL?\nAnswer:", " SELECT COUNT(*) FROM table;"),
    ("Once upon a time", " there was a tiny model with random weights."),
]


def demo(demo_dir):
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(demo_dir, "model", "tokenizer.json"))
    out = []
    for lora in [None, "demo-r8-000"]:
        adapter = None if lora is None else os.path.join(demo_dir, "adapters", lora)
        model = load(os.path.join(demo_dir, "model"), adapter)
        for context, continuation in PAIRS:
            ctx = tok(context, add_special_tokens=True)["input_ids"]
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            lps, lsm = position_logprobs(model, ctx + cont)
            n = len(ctx)
            greedy = all(lsm[i - 1].argmax().item() == (ctx + cont)[i] for i in range(n, n + len(cont)))
            out.append({
                "lora": lora, "context": context, "continuation": continuation,
                "context_ids": ctx, "continuation_ids": cont,
                "continuation_logprobs": lps[n:], "loglikelihood": sum(lps[n:]), "is_greedy": greedy,
            })
    path = os.path.join(GOLDEN, "demo_loglikelihood.json")
    with open(path, "w") as f:
        json.dump({"versions": VERSIONS, "pairs": out}, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({len(out)} pairs)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", help="a demo folder written by `multilora demo --dir DIR` (seed 0)")
    args = ap.parse_args()
    golden_cases()
    if args.demo:
        demo(args.demo)


if __name__ == "__main__":
    main()
