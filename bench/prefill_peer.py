#!/usr/bin/env python3
"""Prefill peer and floor for BENCHMARKS.md, on the GPU machine.

  peer OUT.jsonl SHAPE_DIR... : HF transformers (bf16, SDPA, random weights built on the GPU),
      one forward over B prompts of P random tokens with logits_to_keep=1, median of 3 after a
      warm-up, for each (B, P) in CASES; and the bf16 matmul rate (8192^3, best of 20), from which
      each case's compute floor = its FLOPs / that rate.
  table PEER.jsonl OURS.jsonl... : joins gpu_bench's prefill times with the peer's and the floor.

FLOPs of a prefill: 2 x (q/k/v, o, gate/up, down weights) x tokens, plus lm_head for one row a
prompt, plus causal attention 4 x head_dim x heads x layers x P(P+1)/2 a prompt (q.k and p.v).
"""
import json
import statistics
import sys
import time

CASES = [(1, 128), (32, 128), (4, 2048), (1, 4096), (1, 32768)]


def flops(cfg, b, p):
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or h // nh
    per_token = layers * (h * (nh + 2 * nkv) * hd + nh * hd * h + 3 * h * i)
    attn = 4 * hd * nh * layers * p * (p + 1) // 2
    return b * (2 * per_token * p + attn + 2 * h * cfg["vocab_size"])


def matmul_rate(torch):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(23):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 8192**3 / best


def peer(out_path, shapes):
    import torch
    import transformers

    rate = matmul_rate(torch)
    print(f"bf16 matmul 8192^3: {rate / 1e12:.0f} TFLOP/s", flush=True)
    with open(out_path, "w") as f:
        for shape in shapes:
            cfg_d = json.load(open(f"{shape}/config.json"))
            cfg = transformers.AutoConfig.from_pretrained(shape)
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = transformers.AutoModelForCausalLM.from_config(
                    cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
                )
            model.eval()
            for b, p in CASES:
                if p > cfg_d["max_position_embeddings"] and p > 8192:
                    continue
                ids = torch.randint(3, cfg.vocab_size, (b, p), device="cuda")
                times = []
                with torch.no_grad():
                    for _ in range(4):
                        torch.cuda.synchronize()
                        t = time.perf_counter()
                        model(input_ids=ids, logits_to_keep=1)
                        torch.cuda.synchronize()
                        times.append((time.perf_counter() - t) * 1e3)
                ms = statistics.median(times[1:])
                floor_ms = flops(cfg_d, b, p) / rate * 1e3
                rec = {"shape": shape, "batch": b, "prompt_len": p, "peer_ms": ms, "floor_ms": floor_ms,
                       "tflops_rate": rate / 1e12, "runs_ms": times}
                print(json.dumps(rec), flush=True)
                f.write(json.dumps(rec) + "\n")
            del model
            torch.cuda.empty_cache()


def table(peer_path, ours_paths):
    peer = {}
    for line in open(peer_path):
        r = json.loads(line)
        peer[(r["shape"].rstrip("/").split("/")[-1], r["batch"], r["prompt_len"])] = r
    print(f"{'shape':>12} {'BxP':>9} {'series':>9} {'targets':>7} {'rank':>4} {'ours_ms':>9} "
          f"{'peer_ms':>9} {'floor_ms':>9} {'x_floor':>7} {'peer/ours':>9}")
    for path in ours_paths:
        for line in open(path):
            r = json.loads(line)
            shape = str(r["model"]).rstrip("/").split("/")[-1]
            key = (shape, r["batch_size"], r["prompt_len"])
            p = peer.get(key, {})
            floor = p.get("floor_ms", float("nan"))
            pm = p.get("peer_ms", float("nan"))
            print(f"{shape:>12} {r['batch_size']:>3}x{r['prompt_len']:<5} {r['series']:>9} {r['targets']:>7} "
                  f"{r['rank']:>4} {r['prefill_ms']:9.2f} {pm:9.2f} {floor:9.2f} "
                  f"{r['prefill_ms'] / floor:7.2f} {pm / r['prefill_ms']:9.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "peer":
        peer(sys.argv[2], sys.argv[3:])
    else:
        table(sys.argv[2], sys.argv[3:])
