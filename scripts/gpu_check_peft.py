#!/usr/bin/env python3
"""Greedy tokens of multilora's CUDA backend against transformers+PEFT on the same GPU, for a
mixed-adapter batch. Run on the GPU machine (it has torch, transformers, peft):

    python3 scripts/gpu_check_peft.py make  WORK      # model + 4 adapters + requests.json + HF tokens
    ./peft_check WORK/requests.json WORK/ours.json    # multilora, one mixed batch on CUDA
    python3 scripts/gpu_check_peft.py compare WORK

(`bench/gpu.sh` does all three.) The model is a small random Llama (bf16 weights, 4 layers,
hidden 1024) with a sharp lm_head so greedy choices are not near-ties. HF runs each request
alone, twice: in float32 over the same bf16 weights (the reference our f32 accumulation aims at)
and in bf16 (what a PEFT user would run). The batch mixes three adapters and a base-model row.
"""
import json
import os
import sys

import torch


def make(work):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    os.makedirs(work, exist_ok=True)
    cfg = transformers.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.25)
    mdir = os.path.join(work, "model")
    model.save_pretrained(mdir, safe_serialization=True)
    adapters = []
    for i, targets in enumerate([["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"],
                                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]):
        torch.manual_seed(100 + i)
        base = transformers.LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32)
        lc = LoraConfig(r=[8, 16, 16][i], lora_alpha=16, target_modules=targets, lora_dropout=0.0)
        pm = get_peft_model(base, lc)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        adir = os.path.join(work, f"adapter-{i}")
        pm.save_pretrained(adir)
        adapters.append(adir)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for k, ad in enumerate([adapters[0], adapters[1], None, adapters[2], adapters[1], adapters[0]]):
        n = [5, 40, 17, 100, 64, 9][k]
        ids = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
        reqs.append({"prompt_token_ids": ids, "adapter": ad, "max_tokens": 24})
    json.dump({"model": mdir, "requests": reqs}, open(os.path.join(work, "requests.json"), "w"))
    for dtype, name in [(torch.float32, "hf_f32"), (torch.bfloat16, "hf_bf16")]:
        out, scores = [], []
        for r in reqs:
            toks, sc = hf_generate(mdir, r, dtype)
            out.append(toks)
            scores.append(sc)
        json.dump(out, open(os.path.join(work, f"{name}.json"), "w"))
        if name == "hf_f32":
            torch.save(scores, os.path.join(work, "hf_f32_scores.pt"))
    print("made", work)


_cache = {}


def hf_generate(mdir, r, dtype):
    import transformers
    from peft import PeftModel

    key = (r["adapter"], dtype)
    if key not in _cache:
        m = transformers.LlamaForCausalLM.from_pretrained(mdir, dtype=dtype).cuda().eval()
        if r["adapter"]:
            m = PeftModel.from_pretrained(m, r["adapter"]).cuda().eval()
        _cache.clear()
        _cache[key] = m
    m = _cache[key]
    ids = torch.tensor([r["prompt_token_ids"]], device="cuda")
    with torch.no_grad():
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=r["max_tokens"],
                         min_new_tokens=r["max_tokens"], do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    scores = torch.stack([s[0].float().cpu() for s in out.scores])  # [steps, vocab]
    return out.sequences[0, ids.shape[1]:].tolist(), scores


def compare(work):
    ours = json.load(open(os.path.join(work, "ours.json")))
    ok = True
    for name in ["hf_f32", "hf_bf16"]:
        ref = json.load(open(os.path.join(work, f"{name}.json")))
        prefix = []
        for a, b in zip(ours, ref):
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            prefix.append(n)
        total = sum(len(b) for b in ref)
        print(f"multilora (cuda, mixed batch) vs {name}: matching greedy prefix per request {prefix} "
              f"of {len(ref[0])}; exact rows {sum(p == len(b) for p, b in zip(prefix, ref))}/{len(ref)}; "
              f"tokens in matching prefixes {sum(prefix)}/{total}")
        if name == "hf_f32":
            # Where greedy paths part, HF's own logits must call it a near-tie: the gap between
            # its token and ours under 5% of that step's logit spread (std).
            scores = torch.load(os.path.join(work, "hf_f32_scores.pt"))
            for i, (a, b) in enumerate(zip(ours, ref)):
                k = prefix[i]
                if k == len(b):
                    continue
                sc = scores[i][k]
                gap = float(sc[b[k]] - sc[a[k]])
                rel = gap / float(sc[torch.isfinite(sc)].std())  # EOS is -inf before min_new_tokens
                near = rel < 0.05
                ok &= near
                print(f"  request {i}: parts at step {k}: HF f32 prefers {b[k]} over ours {a[k]} by "
                      f"{gap:.4f} ({rel:.4f} of the logit std) -> {'near-tie' if near else 'REAL DIFFERENCE'}")
    print("PEFT CHECK", "PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    cmd, work = sys.argv[1], sys.argv[2]
    if cmd == "make":
        make(work)
    else:
        sys.exit(0 if compare(work) else 1)
