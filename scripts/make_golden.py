#!/usr/bin/env python3
"""Generate golden reference outputs (HF transformers + PEFT) for the `multilora` Rust tests.

Run from the repo root:   python3 scripts/make_golden.py [case ...]   (no case: all of them)
Needs:                    pip install torch transformers peft safetensors
Writes (and wipes first): crates/engine/tests/golden/<case>/{model/, adapters/<name>/, golden.json}
                          for each case written

Everything is seeded and runs in float32 on CPU with eager attention, so re-running with the same
library versions reproduces the same files.

Config key format note (written with transformers 5.24.0, peft 0.21.2, torch 2.15.0):
  transformers 5.x writes RoPE settings as a nested `rope_parameters` object, e.g.
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
    "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 64, "rope_theta": 500000.0,
                        "rope_type": "llama3"}
  and NO top-level `rope_theta` / `rope_scaling` keys. The dtype key is `dtype` (not `torch_dtype`).
  Older (4.x) checkpoints in the wild use top-level `rope_theta` + `rope_scaling` (with `rope_type`
  or the legacy `type` key), so a loader should accept both forms.

golden.json format:
  {"versions": {...}, "num_steps": 24,
   "requests": [{"prompt_token_ids": [...], "lora": "<adapter folder name>" | null,
                 "greedy_token_ids": [24 ids], "first_logits": [vocab], "last_logits": [vocab]}]}
  first_logits = logits at the last prompt position (they produce greedy token #1);
  last_logits  = logits of the final step (they produce greedy token #24).
  Each step is a full forward pass (no KV cache) over prompt + tokens generated so far; EOS ignored.
"""
import json
import math
import os
import re
import shutil
import sys
import warnings

import peft
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "crates", "engine", "tests", "golden")
NUM_STEPS = 24
VOCAB = 384
# Retry a prompt (new random ids) if any greedy step has a top-1/top-2 logit gap below this, so
# that tiny f32 differences in another implementation cannot flip an argmax.
MIN_ARGMAX_GAP = 2e-3
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN4 = ["q_proj", "k_proj", "v_proj", "o_proj"]

VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
TF_MAJOR = int(transformers.__version__.split(".")[0])

transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)  # fewer sources of summation-order nondeterminism
torch.use_deterministic_algorithms(True)


def rope_kwargs(theta, scaling=None):
    """RoPE settings in whichever form this transformers version expects."""
    if TF_MAJOR >= 5:
        rp = {"rope_type": "default", "rope_theta": float(theta)}
        if scaling:
            rp = dict(scaling, rope_theta=float(theta))
        return {"rope_parameters": rp}
    kw = {"rope_theta": float(theta)}
    if scaling:
        kw["rope_scaling"] = dict(scaling)
    return kw


def common_kwargs(**over):
    kw = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    kw.update(over)
    return kw


def load_model(cls, model_dir):
    m = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def build_base(case_dir, cls, config, seed, norm_std=0.1, qk_norm_std=0.2, bias_std=0.1,
               save_dtype=torch.float32, max_shard_size=None):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
                p.copy_(1.0 + qk_norm_std * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1.0 + norm_std * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(bias_std * torch.randn_like(p))
    model_dir = os.path.join(case_dir, "model")
    model = model.to(save_dtype)
    kw = {"safe_serialization": True}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    try:
        model.save_pretrained(model_dir, **kw)
    except TypeError:  # newer transformers dropped the (always-on) safe_serialization flag
        kw.pop("safe_serialization")
        model.save_pretrained(model_dir, **kw)
    return model_dir


def make_adapter(case_dir, cls, model_dir, name, lcfg, seed):
    base = load_model(cls, model_dir)
    pm = get_peft_model(base, lcfg)  # adapter name "default" -> saved directly into the folder
    gen = torch.Generator().manual_seed(seed)
    # Aim for an effective delta (scale * B@A) with entries of std ~0.15 (base weights: std 0.1).
    r, alpha = lcfg.r, lcfg.lora_alpha
    scale = alpha / (math.sqrt(r) if lcfg.use_rslora else r)
    std = min(0.3, max(0.05, math.sqrt(0.15 / (scale * math.sqrt(r)))))
    n = 0
    with torch.no_grad():
        for pname, p in sorted(pm.named_parameters()):
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                n += 1
    assert n > 0
    out = os.path.join(case_dir, "adapters", name)
    pm.save_pretrained(out, safe_serialization=True)
    # Keep the folder minimal and location-independent.
    readme = os.path.join(out, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cfg_path = os.path.join(out, "adapter_config.json")
    with open(cfg_path) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = "../../model"
    if isinstance(acfg.get("target_modules"), list):  # PEFT stores a set: order is hash-random
        acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(cfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return out


def load_all_adapters(cls, model_dir, adapter_dirs):
    """One PeftModel holding every adapter of the case, loaded from the saved folders."""
    base = load_model(cls, model_dir)
    names = list(adapter_dirs)
    pm = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for nm in names[1:]:
        pm.load_adapter(adapter_dirs[nm], adapter_name=nm)
    pm.eval()
    # Verify the loaded LoRA weights are exactly the saved tensors.
    params = dict(pm.named_parameters())
    for nm, d in adapter_dirs.items():
        saved = safetensors.torch.load_file(os.path.join(d, "adapter_model.safetensors"))
        for k, v in saved.items():
            pk = re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{nm}.weight", k)
            assert pk in params, (nm, k, pk)
            assert torch.equal(params[pk].detach(), v), (nm, k)
    return pm


def pattern_lookup(pattern, key, default):
    # PEFT: a pattern key matches a module name if the name ends with ".<key>" (or equals it).
    for pk, val in pattern.items():
        if re.match(rf"(.*\.)?({pk})$", key):
            return val
    return default


def manual_merge_check(cls, model_dir, adapter_dir, pm, name, prompt):
    """Independently merge W += scale * B @ A using OUR reading of adapter_config.json, and check
    the logits equal PEFT's unmerged forward. This pins down the scaling semantics the Rust side
    must implement (alpha/r, alpha/sqrt(r) for rslora, rank_pattern / alpha_pattern)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        c = json.load(f)
    saved = safetensors.torch.load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    merged = load_model(cls, model_dir)
    sd = merged.state_dict()
    scales = {}
    for k in saved:
        if not k.endswith("lora_A.weight"):
            continue
        mod = k[len("base_model.model."):-len(".lora_A.weight")]
        A = saved[k]
        B = saved[k.replace("lora_A", "lora_B")]
        r = pattern_lookup(c.get("rank_pattern") or {}, mod, c["r"])
        alpha = pattern_lookup(c.get("alpha_pattern") or {}, mod, c["lora_alpha"])
        assert A.shape[0] == r and B.shape[1] == r, (mod, A.shape, B.shape, r)
        scale = alpha / (math.sqrt(r) if c.get("use_rslora") else r)
        scales[mod.split(".")[-1]] = scale
        sd[mod + ".weight"] += scale * (B @ A)
    merged.load_state_dict(sd)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = merged(input_ids=ids).logits[0]
        pm.set_adapter(name)
        got = pm(input_ids=ids).logits[0]
    err = (ref - got).abs().max().item()
    assert err < 1e-4, (name, err)
    return scales, err


def merge_check_all(cls, model_dir, adapter_dirs, pm):
    for nm, adir in adapter_dirs.items():
        scales, err = manual_merge_check(cls, model_dir, adir, pm, nm, list(range(3, 20)))
        print(f"  merge-check {nm}: scales={scales} max_abs_err={err:.2e}")


def greedy(model, prompt):
    ids = list(prompt)
    toks, first, last, min_gap = [], None, None, float("inf")
    with torch.no_grad():
        for step in range(NUM_STEPS):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            min_gap = min(min_gap, (top2[0] - top2[1]).item())
            t = int(torch.argmax(logits).item())
            if step == 0:
                first = logits.clone()
            last = logits.clone()
            toks.append(t)
            ids.append(t)
    return toks, first, last, min_gap


def run_request(pm_or_model, lora, prompt):
    if isinstance(pm_or_model, PeftModel):
        if lora is None:
            with pm_or_model.disable_adapter():
                return greedy(pm_or_model, prompt)
        pm_or_model.set_adapter(lora)
    return greedy(pm_or_model, prompt)


def r7(t):
    return [float(f"{x:.7g}") for x in t.tolist()]


def make_requests(model, specs, seed):
    """specs: list of (prompt_len, lora). Prompts are random ids in [3, VOCAB)."""
    gen = torch.Generator().manual_seed(seed)
    out, summary = [], []
    for plen, lora in specs:
        for attempt in range(50):
            prompt = torch.randint(3, VOCAB, (plen,), generator=gen).tolist()
            toks, first, last, gap = run_request(model, lora, prompt)
            if gap >= MIN_ARGMAX_GAP:
                break
        else:
            raise RuntimeError("could not find a prompt with a safe argmax gap")
        out.append({
            "prompt_token_ids": prompt,
            "lora": lora,
            "greedy_token_ids": toks,
            "first_logits": r7(first),
            "last_logits": r7(last),
        })
        summary.append((plen, lora, toks, gap, attempt, first.std().item()))
    return out, summary


def write_golden(case_dir, requests):
    with open(os.path.join(case_dir, "golden.json"), "w") as f:
        json.dump({"versions": VERSIONS, "num_steps": NUM_STEPS, "requests": requests}, f,
                  separators=(",", ":"))
        f.write("\n")


def print_summary(case, summary):
    print(f"== {case}")
    for plen, lora, toks, gap, attempt, std in summary:
        print(f"  plen={plen:3d} lora={str(lora):14s} distinct={len(set(toks)):2d} "
              f"min_gap={gap:.4f} retries={attempt} logit_std={std:.3f} toks={toks}")
        assert len(set(toks)) >= 5, "degenerate greedy output"


def lora_cfg(**kw):
    return LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", **kw)


# ----------------------------------------------------------------------------------------------
def case_llama():
    case = "llama"
    d = os.path.join(GOLDEN, case)
    cfg = LlamaConfig(**common_kwargs(**rope_kwargs(10000.0)))
    model_dir = build_base(d, LlamaForCausalLM, cfg, seed=1001)
    lcfgs = {
        "a_r8_all": lora_cfg(r=8, lora_alpha=16, target_modules=list(ALL7)),
        "b_r4_qv_regex": lora_cfg(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj)$"),
        "c_r16_rslora": lora_cfg(r=16, lora_alpha=32, use_rslora=True, target_modules=list(ATTN4)),
        "d_pattern": lora_cfg(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 32}),
    }
    adirs = {}
    for i, (nm, lc) in enumerate(lcfgs.items()):
        adirs[nm] = make_adapter(d, LlamaForCausalLM, model_dir, nm, lc, seed=2001 + i)

    # d_pattern: down_proj must have rank 8, others rank 4.
    t = safetensors.torch.load_file(os.path.join(adirs["d_pattern"], "adapter_model.safetensors"))
    for k, v in t.items():
        want = 8 if "down_proj" in k else 4
        assert (v.shape[0] if "lora_A" in k else v.shape[1]) == want, (k, v.shape)
    # b_r4_qv_regex: only q_proj / v_proj.
    t = safetensors.torch.load_file(os.path.join(adirs["b_r4_qv_regex"], "adapter_model.safetensors"))
    assert all(("q_proj" in k or "v_proj" in k) for k in t) and len(t) == 2 * 2 * 2

    pm = load_all_adapters(LlamaForCausalLM, model_dir, adirs)
    merge_check_all(LlamaForCausalLM, model_dir, adirs, pm)

    specs = [(7, "a_r8_all"), (12, None), (5, "b_r4_qv_regex"), (23, "c_r16_rslora"),
             (16, "d_pattern"), (9, "a_r8_all"), (19, None)]
    reqs, summary = make_requests(pm, specs, seed=3001)
    write_golden(d, reqs)
    print_summary(case, summary)

    # Sanity: every adapter changes the greedy tokens vs. base on its own request's prompt.
    print("  adapter-vs-base greedy check:")
    for r in reqs:
        if r["lora"] is None:
            continue
        base_toks, _, _, _ = run_request(pm, None, r["prompt_token_ids"])
        ndiff = sum(a != b for a, b in zip(base_toks, r["greedy_token_ids"]))
        print(f"    {r['lora']:14s} differs from base in {ndiff}/24 tokens; "
              f"first-logits max|diff|="
              f"{(torch.tensor(r['first_logits']) - run_request(pm, None, r['prompt_token_ids'])[1]).abs().max():.3f}")
        assert ndiff > 0, f"adapter {r['lora']} is a no-op on its request"


def case_llama3_tied():
    case = "llama3_tied"
    d = os.path.join(GOLDEN, case)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    # Tied embeddings make a random model copy its input token; a larger init range avoids that.
    cfg = LlamaConfig(**common_kwargs(tie_word_embeddings=True, initializer_range=0.2,
                                      **rope_kwargs(500000.0, scaling)))
    model_dir = build_base(d, LlamaForCausalLM, cfg, seed=1002)
    m = load_model(LlamaForCausalLM, model_dir)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    reqs, summary = make_requests(m, [(11, None), (90, None)], seed=3002)
    write_golden(d, reqs)
    print_summary(case, summary)
    # Show the scaling matters: same model with default RoPE gives different logits at 90+ tokens.
    cfg2 = LlamaConfig(**common_kwargs(tie_word_embeddings=True, initializer_range=0.2,
                                       **rope_kwargs(500000.0)))
    m2 = LlamaForCausalLM(cfg2).eval()
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        ids = torch.tensor([reqs[1]["prompt_token_ids"]])
        diff = (m(input_ids=ids).logits - m2(input_ids=ids).logits).abs().max().item()
    print(f"  llama3 rope scaling vs default rope: max|logit diff| on 90-token prompt = {diff:.3f}")
    assert diff > 1e-3


def case_qwen2():
    case = "qwen2_bf16_sharded"
    d = os.path.join(GOLDEN, case)
    cfg = Qwen2Config(**common_kwargs(**rope_kwargs(10000.0)))
    model_dir = build_base(d, Qwen2ForCausalLM, cfg, seed=1003, save_dtype=torch.bfloat16,
                           max_shard_size="100KB")
    assert os.path.exists(os.path.join(model_dir, "model.safetensors.index.json"))
    adirs = {"q_r8": make_adapter(d, Qwen2ForCausalLM, model_dir, "q_r8",
                                  lora_cfg(r=8, lora_alpha=16, target_modules=list(ATTN4)), seed=2101)}
    t = safetensors.torch.load_file(os.path.join(adirs["q_r8"], "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in t.values())
    pm = load_all_adapters(Qwen2ForCausalLM, model_dir, adirs)
    # Loaded weights are bf16 values widened to f32.
    assert pm.get_base_model().model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert pm.get_base_model().model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    merge_check_all(Qwen2ForCausalLM, model_dir, adirs, pm)
    reqs, summary = make_requests(pm, [(8, None), (14, "q_r8"), (21, "q_r8")], seed=3003)
    write_golden(d, reqs)
    print_summary(case, summary)


def case_qwen3():
    case = "qwen3"
    d = os.path.join(GOLDEN, case)
    cfg = Qwen3Config(**common_kwargs(head_dim=16, **rope_kwargs(10000.0)))
    model_dir = build_base(d, Qwen3ForCausalLM, cfg, seed=1004)
    adirs = {"all_r8": make_adapter(d, Qwen3ForCausalLM, model_dir, "all_r8",
                                    lora_cfg(r=8, lora_alpha=16, target_modules=list(ALL7)), seed=2201)}
    pm = load_all_adapters(Qwen3ForCausalLM, model_dir, adirs)
    merge_check_all(Qwen3ForCausalLM, model_dir, adirs, pm)
    reqs, summary = make_requests(pm, [(6, None), (17, None), (13, "all_r8")], seed=3004)
    write_golden(d, reqs)
    print_summary(case, summary)


def case_mistral():
    case = "mistral"
    d = os.path.join(GOLDEN, case)
    cfg = MistralConfig(**common_kwargs(sliding_window=None, **rope_kwargs(10000.0)))
    model_dir = build_base(d, MistralForCausalLM, cfg, seed=1005)
    m = load_model(MistralForCausalLM, model_dir)
    reqs, summary = make_requests(m, [(10, None), (22, None)], seed=3005)
    write_golden(d, reqs)
    print_summary(case, summary)


def case_gqa(case, cls, seed, model_kw, adapters, specs):
    """A shape nobody tuned for: GQA ratio, head size and hidden size chosen apart, prompts of
    2k+ tokens (across any chunk and KV-block size), adapters up to rank 64."""
    d = os.path.join(GOLDEN, case)
    kw = dict(max_position_embeddings=4096, **rope_kwargs(10000.0))
    kw.update(model_kw)
    cfg = cls.config_class(**common_kwargs(**kw))
    model_dir = build_base(d, cls, cfg, seed=seed)
    adirs = {nm: make_adapter(d, cls, model_dir, nm, lc, seed=seed + 1000 + i)
             for i, (nm, lc) in enumerate(adapters.items())}
    pm = load_all_adapters(cls, model_dir, adirs)
    merge_check_all(cls, model_dir, adirs, pm)
    reqs, summary = make_requests(pm, specs, seed=seed + 2000)
    write_golden(d, reqs)
    print_summary(case, summary)


def case_gqa1_long():
    # Llama, 4 heads of 4 KV heads (no grouping), head size 24 (not a power of two) with hidden
    # size 80 (head_dim * heads != hidden_size).
    case_gqa("gqa1_long", LlamaForCausalLM, 1101,
             dict(hidden_size=80, num_attention_heads=4, num_key_value_heads=4, head_dim=24),
             {"r8_all": lora_cfg(r=8, lora_alpha=16, target_modules=list(ALL7))},
             [(2100, "r8_all"), (9, None), (613, "r8_all")])


def case_gqa4_bias():
    # Qwen2 (q/k/v bias), 8 heads over 2 KV heads, head size 16, hidden size 112; rank 64 on
    # q,k,v,o beside rank 16 on all seven.
    case_gqa("gqa4_bias", Qwen2ForCausalLM, 1102,
             dict(hidden_size=112, num_attention_heads=8, num_key_value_heads=2, head_dim=16),
             {"r64_qkvo": lora_cfg(r=64, lora_alpha=64, target_modules=list(ATTN4)),
              "r16_all": lora_cfg(r=16, lora_alpha=32, target_modules=list(ALL7))},
             [(2050, "r64_qkvo"), (300, "r16_all"), (17, None)])


def case_gqa7_long():
    # Qwen2, 14 heads over 2 KV heads (group 7), head size 8, hidden size 112; rsLoRA rank 32.
    case_gqa("gqa7_long", Qwen2ForCausalLM, 1103,
             dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2),
             {"r32_all": lora_cfg(r=32, lora_alpha=32, use_rslora=True, target_modules=list(ALL7))},
             [(2300, "r32_all"), (40, None)])


def case_gqa8_qknorm():
    # Qwen3 (q/k norm), 8 heads over 1 KV head, head size 16, hidden size 72; rank 64 on all
    # seven.
    case_gqa("gqa8_qknorm", Qwen3ForCausalLM, 1104,
             dict(hidden_size=72, num_attention_heads=8, num_key_value_heads=1, head_dim=16),
             {"r64_all": lora_cfg(r=64, lora_alpha=128, target_modules=list(ALL7))},
             [(1100, "r64_all"), (2100, None), (5, "r64_all")])


CASES = {
    "llama": case_llama,
    "llama3_tied": case_llama3_tied,
    "qwen2_bf16_sharded": case_qwen2,
    "qwen3": case_qwen3,
    "mistral": case_mistral,
    "gqa1_long": case_gqa1_long,
    "gqa4_bias": case_gqa4_bias,
    "gqa7_long": case_gqa7_long,
    "gqa8_qknorm": case_gqa8_qknorm,
}


def main():
    """Writes every case anew, or only the cases named on the command line; each case's folder
    is wiped first (the other scripts' fixtures beside them are left alone)."""
    print("versions:", VERSIONS)
    names = sys.argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; the cases are {list(CASES)}")
    os.makedirs(GOLDEN, exist_ok=True)
    for n in names:
        d = os.path.join(GOLDEN, n)
        if os.path.exists(d):
            shutil.rmtree(d)
        CASES[n]()
    total = 0
    for dp, _, fs in os.walk(GOLDEN):
        total += sum(os.path.getsize(os.path.join(dp, f)) for f in fs)
    print(f"total size of {os.path.relpath(GOLDEN, ROOT)}: {total / 1e6:.2f} MB")
    assert total < 10_000_000, "the fixtures live in git: keep them small"


if __name__ == "__main__":
    main()
