#!/usr/bin/env python3
"""The peer for BENCHMARKS.md: HF transformers (eager, bf16) + PEFT on the same shapes as
`gpu_bench`: Llama-2-7B config with random weights on the GPU, 32 rank-16 adapters on
q,k,v,o, prompt 128 random tokens, 32 output tokens. Mixed-adapter batches use PEFT's
`adapter_names` (one adapter per row). Decode step = (time of 32 new tokens - time of 1) / 31,
each timed with CUDA synchronisation; prefill = time of 1 new token.

usage: python3 bench/hf_peer.py OUT.jsonl [batch sizes, default 1,8,32]
"""
import json
import sys
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model

out_path = sys.argv[1]
batch_sizes = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1,8,32").split(",")]
cfg = transformers.AutoConfig.from_pretrained("bench/llama-2-7b")
torch.manual_seed(0)
t0 = time.time()
with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.eval()
lc = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
model = get_peft_model(model, lc, adapter_name="a0")
for i in range(1, 32):
    model.add_adapter(f"a{i}", lc)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)
model = model.to(torch.bfloat16)
model.eval()
print(f"peer model + 32 adapters ready in {time.time() - t0:.1f}s", flush=True)


def gen(ids, names, n):
    kw = {} if names is None else {"adapter_names": names}
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        if names is None:
            with model.disable_adapter():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
        else:
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


with open(out_path, "w") as f:
    for b in batch_sizes:
        ids = torch.randint(3, cfg.vocab_size, (b, 128), device="cuda")
        for series in ["no-lora", "identical", "distinct"]:
            names = None if series == "no-lora" else (["a0"] * b if series == "identical" else [f"a{i}" for i in range(b)])
            gen(ids, names, 2)  # warm-up
            t1 = gen(ids, names, 1)
            t32 = gen(ids, names, 32)
            dec = (t32 - t1) / 31
            rec = {"peer": "hf-transformers+peft", "series": series, "batch_size": b, "prefill_ms": t1,
                   "decode_ms": dec, "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
            print(f"peer {series:>10} batch {b:>3}: prefill {t1:9.2f} ms  decode step {dec:8.2f} ms", flush=True)
            f.write(json.dumps(rec) + "\n")
