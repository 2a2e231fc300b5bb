#!/usr/bin/env python3
"""The CPU backend against transformers, side by side, for BENCHMARKS.md ("CPU backend against
transformers"): same model shape (random weights), same prompt length, same number of threads.

Ours: `target/release/examples/cpu_steps MODEL_DIR B P D DTYPE R` (the bare forward: B prompts of
P tokens prefilled in one step, median of R = --prefill-runs; then D decode steps of the batch,
median step; with --dtype bf16 its weights are kept in bf16, activations f32). Theirs:
transformers `LlamaForCausalLM` in f32 (or --dtype bf16: weights and activations bf16), eager
attention, one forward over the B prompts with `logits_to_keep=1` (median of R), then D
single-token forwards with the KV cache, median step. Each is warmed up first. Runs alternate
ours/theirs per batch size, --runs times; the table gives medians over runs and the ratio
theirs/ours (> 1: ours faster). The matmul rate is torch's own f32 matmul on the prefill's linear
shapes (x[B*P, in] @ W[in, out] for each projection, in --dtype), in the same run, and our
prefill's rate counts the same linear FLOPs over our whole prefill time.

usage: target/peer-venv/bin/python bench/cpu_peer.py [--model-dir bench/cpu-33m] [--batches 1,8,32]
       [--prompt 33] [--decode 16] [--runs 5] [--prefill-runs 3] [--threads 2] [--dtype f32|bf16]
       [--before OTHER_CPU_STEPS] [--out OUT.jsonl]
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import transformers

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", default="bench/cpu-33m")
ap.add_argument("--batches", default="1,8,32")
ap.add_argument("--prompt", type=int, default=33)
ap.add_argument("--decode", type=int, default=16)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--prefill-runs", type=int, default=3, help="prefills timed per run and side (median)")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
ap.add_argument("--ours", default="target/release/examples/cpu_steps")
ap.add_argument("--before", default=None, help="a second cpu_steps binary (e.g. built from main), run alternately too")
ap.add_argument("--out", default=None)
args = ap.parse_args()

torch.set_num_threads(args.threads)
torch.manual_seed(0)
dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
cfg = transformers.AutoConfig.from_pretrained(args.model_dir)
model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager", torch_dtype=dtype)
model.eval()
batches = [int(b) for b in args.batches.split(",")]
P, D = args.prompt, args.decode
h, inter = cfg.hidden_size, cfg.intermediate_size
hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
# (in, out) of each projection of a layer
LINEARS = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def linear_flops(tokens):
    return 2 * tokens * cfg.num_hidden_layers * sum(i * o for i, o in LINEARS)


def theirs(b):
    ids = torch.randint(3, cfg.vocab_size, (b, P))
    with torch.no_grad():
        def prefill():
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            return (time.perf_counter() - t) * 1e3, out

        prefill()  # warm-up
        timed = [prefill() for _ in range(args.prefill_runs)]
        ms, out = statistics.median(t for t, _ in timed), timed[-1][1]
        past, tok, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
        for _ in range(D):
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            steps.append((time.perf_counter() - t) * 1e3)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return ms, statistics.median(steps)


OUR_DTYPE = {"f32": "float32", "bf16": "bfloat16"}[args.dtype]


def ours(b, binary=None):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    cmd = [binary or args.ours, args.model_dir, str(b), str(P), str(D), OUR_DTYPE, str(args.prefill_runs)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r.get("dtype", "float32") == OUR_DTYPE, f"{cmd[0]} ran {r.get('dtype', 'float32')}, not {OUR_DTYPE}"
    return r["prefill_ms"], r["decode_ms"]


def matmul_ms(b):
    """torch's own matmul over one layer's projections at B*P rows, times the layers; median of 5."""
    m = b * P
    ws = [(torch.randn(m, i, dtype=dtype), torch.randn(i, o, dtype=dtype)) for i, o in LINEARS]
    times = []
    for _ in range(6):
        t = time.perf_counter()
        for x, w in ws:
            torch.matmul(x, w)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[1:]) * cfg.num_hidden_layers


rows = {b: {"ours_prefill": [], "ours_decode": [], "hf_prefill": [], "hf_decode": [], "mm": [],
            "before_prefill": [], "before_decode": []} for b in batches}
sink = open(args.out, "w") if args.out else None
for run in range(args.runs):
    for b in batches:
        op, od = ours(b)
        tp, td = theirs(b)
        mm = matmul_ms(b)
        bp, bd = ours(b, args.before) if args.before else (None, None)
        r = rows[b]
        for k, v in [("ours_prefill", op), ("ours_decode", od), ("hf_prefill", tp), ("hf_decode", td), ("mm", mm),
                     ("before_prefill", bp), ("before_decode", bd)]:
            if v is not None:
                r[k].append(v)
        line = {"run": run, "batch": b, "ours_prefill_ms": op, "ours_decode_ms": od, "hf_prefill_ms": tp,
                "hf_decode_ms": td, "torch_matmul_ms": mm, "before_prefill_ms": bp, "before_decode_ms": bd}
        print(json.dumps(line), flush=True)
        if sink:
            sink.write(json.dumps(line) + "\n")

med = statistics.median
print(f"\nmodel {args.model_dir}, {args.dtype}, prompt {P}, {D} decode steps, {args.threads} threads, "
      f"medians of {args.runs} runs (ratio = median of per-run theirs/ours; > 1: ours faster); torch {torch.__version__}, "
      f"transformers {transformers.__version__}\n")
print("| | " + " | ".join(f"batch {b}" for b in batches) + " |")
print("|---" * (len(batches) + 1) + "|")


def cell(b, o, t):
    r = rows[b]
    ratio = med([x / y for x, y in zip(r[t], r[o])])
    return f"{med(r[o]):.1f} / {med(r[t]):.1f} ms ({ratio:.2f}×)"


if args.before:
    print("| decode step, before / transformers | " + " | ".join(cell(b, "before_decode", "hf_decode") for b in batches) + " |")
print("| decode step, multilora / transformers | " + " | ".join(cell(b, "ours_decode", "hf_decode") for b in batches) + " |")
if args.before:
    print("| prefill, before / transformers | " + " | ".join(cell(b, "before_prefill", "hf_prefill") for b in batches) + " |")
print("| prefill, multilora / transformers | " + " | ".join(cell(b, "ours_prefill", "hf_prefill") for b in batches) + " |")


def rate(b):
    r = rows[b]
    gf = linear_flops(b * P) / 1e6
    ours_rate = med([gf / x for x in r["ours_prefill"]])
    mm_rate = med([gf / x for x in r["mm"]])
    return f"{ours_rate:.0f} / {mm_rate:.0f} GFLOP/s ({ours_rate / mm_rate:.0%})"


print("| prefill linear FLOPs / our prefill time, against torch's matmul on the same shapes | "
      + " | ".join(rate(b) for b in batches) + " |")
