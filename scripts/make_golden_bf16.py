#!/usr/bin/env python3
"""Golden fixture for the CPU backend's 16-bit path: a bf16 checkpoint run by transformers in bf16.

Run from the repo root:   python3 scripts/make_golden_bf16.py
Needs:                    pip install torch transformers peft safetensors
Writes (and wipes first): crates/engine/tests/golden/llama_bf16/{model/, adapters/<name>/, golden.json}
Leaves every other case of scripts/make_golden.py alone (its helpers are imported from there).

The model is the golden Llama shape saved in bfloat16 (config `dtype: bfloat16`, so multilora's
`dtype: auto` keeps the weights in bf16), with one f32 PEFT adapter on all seven projections.
Each request is run twice in transformers + PEFT, one sequence alone, eager attention:

  f32 run  (golden.json `greedy_token_ids`, `first_logits`, `last_logits`): the bf16 weights
           widened to f32 and f32 arithmetic, which is exactly what multilora computes; the test
           holds it to the f32 goldens' 1e-4.
  bf16 run (`bf16_greedy_token_ids`, `bf16_first_logits`, `bf16_last_logits`): the model loaded
           with dtype=bfloat16, as transformers runs a bf16 checkpoint: every activation (residual
           stream, projection outputs, attention, logits) is rounded to bf16 as it is made.

A prompt is kept only when both runs pick the same 24 greedy tokens, every step's top-1/top-2 gap
in the f32 run is at least `MIN_ARGMAX_GAP` (as for the f32 goldens) and no step of the bf16 run
has a tie for the top logit (a tie is settled by index, not by the values), so multilora's greedy
tokens can be asserted equal to transformers-bf16's. (A wider bf16 gap cannot be asked for: the
logits of this random model are within ~3 of 0, where a bf16 step is 2^-6, and over 24 steps of
384 candidates some gap is always that small.) golden.json also records,
per request, the largest |bf16 run - f32 run| logit difference and the largest |logit| of the
bf16 run, from which the test's tolerance is argued (crates/engine/tests/golden.rs).
"""
import json
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from peft import PeftModel

import make_golden as g

CASE = "llama_bf16"


def bf16_model(model_dir, adapter_dir, name):
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="eager")
    base.eval()
    pm = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name)
    pm.eval()
    assert pm.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight.dtype == torch.bfloat16
    return pm


def main():
    d = os.path.join(g.GOLDEN, CASE)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg = LlamaConfig(**g.common_kwargs(**g.rope_kwargs(10000.0)))
    model_dir = g.build_base(d, LlamaForCausalLM, cfg, seed=1006, save_dtype=torch.bfloat16)
    with open(os.path.join(model_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16", saved
    name = "a_r8_all"
    adir = g.make_adapter(d, LlamaForCausalLM, model_dir, name,
                          g.lora_cfg(r=8, lora_alpha=16, target_modules=list(g.ALL7)), seed=2301)
    f32 = g.load_all_adapters(LlamaForCausalLM, model_dir, {name: adir})
    bf16 = bf16_model(model_dir, adir, name)

    gen = torch.Generator().manual_seed(3006)
    requests = []
    for plen, lora in [(9, name), (14, None), (21, name)]:
        for attempt in range(400):
            prompt = torch.randint(3, g.VOCAB, (plen,), generator=gen).tolist()
            toks, first, last, gap = g.run_request(f32, lora, prompt)
            btoks, bfirst, blast, bgap = g.run_request(bf16, lora, prompt)
            if toks == btoks and gap >= g.MIN_ARGMAX_GAP and bgap > 0:
                break
        else:
            raise RuntimeError("no prompt where the bf16 and f32 runs agree safely")
        diff = max((bfirst - first).abs().max().item(), (blast - last).abs().max().item())
        scale = max(bfirst.abs().max().item(), blast.abs().max().item())
        print(f"  plen={plen:3d} lora={str(lora):9s} retries={attempt} gap f32={gap:.3f} bf16={bgap:.3f} "
              f"max|bf16-f32|={diff:.4f} max|logit|={scale:.3f} toks={toks}")
        assert len(set(toks)) >= 5, "degenerate greedy output"
        requests.append({
            "prompt_token_ids": prompt,
            "lora": lora,
            "greedy_token_ids": toks,
            "first_logits": g.r7(first),
            "last_logits": g.r7(last),
            "bf16_greedy_token_ids": btoks,
            "bf16_first_logits": g.r7(bfirst),
            "bf16_last_logits": g.r7(blast),
            "bf16_max_diff_to_f32": diff,
            "bf16_max_abs_logit": scale,
        })
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump({"versions": g.VERSIONS, "num_steps": g.NUM_STEPS, "requests": requests}, f,
                  separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
