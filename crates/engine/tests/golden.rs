//! The engine against transformers + PEFT. `scripts/make_golden.py` built tiny models of each
//! supported architecture and PEFT adapters, and recorded greedy tokens and logits per request
//! (each run alone in PyTorch); `scripts/make_golden_bf16.py` did the same for a bf16 checkpoint,
//! run by transformers both in f32 and in bf16. Here the requests run as one mixed batch.

mod common;

use std::collections::HashMap;

use common::{add_requests, case_config, case_dir, load, lora_requests, max_diff, Golden, GQA_CASES};
use multilora_engine::{Device, EngineConfig, LLMEngine, LoraRequest};

fn engine(case: &str, max_loras: usize, max_cpu_loras: usize) -> LLMEngine {
    engine_in(case, max_loras, max_cpu_loras, "auto")
}

/// An engine with `dtype` (vLLM's `dtype`: what the CPU keeps weights in).
fn engine_in(case: &str, max_loras: usize, max_cpu_loras: usize, dtype: &str) -> LLMEngine {
    engine_tp(case, max_loras, max_cpu_loras, dtype, 1)
}

/// An engine split over `tensor_parallel_size` ranks.
fn engine_tp(
    case: &str,
    max_loras: usize,
    max_cpu_loras: usize,
    dtype: &str,
    tensor_parallel_size: usize,
) -> LLMEngine {
    let mut cfg = case_config(case);
    cfg.tensor_parallel_size = tensor_parallel_size;
    cfg.dtype = dtype.into();
    cfg.max_loras = max_loras;
    cfg.max_cpu_loras = Some(max_cpu_loras);
    LLMEngine::new(cfg).expect("engine loads")
}

struct Run {
    tokens: Vec<Vec<u32>>,
    first_logits: Vec<Vec<f32>>,
    last_logits: Vec<Vec<f32>>,
}

/// Runs `requests` (indices into the golden list) together, greedy, EOS ignored.
fn run(
    engine: &mut LLMEngine,
    golden: &Golden,
    loras: &HashMap<String, LoraRequest>,
    requests: &[usize],
) -> Run {
    add_requests(engine, golden, loras, requests);
    let mut out = Run {
        tokens: vec![Vec::new(); requests.len()],
        first_logits: vec![Vec::new(); requests.len()],
        last_logits: vec![Vec::new(); requests.len()],
    };
    let mut step = 0;
    while engine.has_unfinished_requests() {
        let outputs = engine.step().unwrap();
        step += 1;
        assert!(
            step <= (golden.num_steps + 1) * requests.len(),
            "requests did not finish"
        );
        for o in outputs {
            let k = requests
                .iter()
                .position(|&i| i.to_string() == *o.request_id)
                .unwrap();
            let logits = engine.last_logits(&o.request_id).unwrap().to_vec();
            if o.num_output_tokens == 1 {
                out.first_logits[k] = logits.clone();
            }
            if o.is_finished() {
                out.last_logits[k] = logits;
                out.tokens[k] = o.output_token_ids;
            }
        }
    }
    out
}

fn check_against_golden(case: &str, max_loras: usize, max_cpu_loras: usize) -> LLMEngine {
    check_in(case, max_loras, max_cpu_loras, "auto")
}

fn check_in(case: &str, max_loras: usize, max_cpu_loras: usize, dtype: &str) -> LLMEngine {
    let golden = load(case);
    let loras = lora_requests(case);
    let mut engine = engine_in(case, max_loras, max_cpu_loras, dtype);
    let all: Vec<usize> = (0..golden.requests.len()).collect();
    let got = run(&mut engine, &golden, &loras, &all);
    for (k, r) in golden.requests.iter().enumerate() {
        let what = format!("{case} request {k} (adapter {:?})", r.lora);
        assert_eq!(got.tokens[k], r.greedy_token_ids, "{what}: greedy tokens differ");
        let d1 = max_diff(&got.first_logits[k], &r.first_logits);
        let d2 = max_diff(&got.last_logits[k], &r.last_logits);
        assert!(
            d1 < 1e-4 && d2 < 1e-4,
            "{what}: logits differ by {d1} (first) / {d2} (last)"
        );
    }
    engine
}

#[test]
fn llama_mixed_adapters_match_peft() {
    check_against_golden("llama", 4, 4);
}

#[test]
fn llama3_rope_scaling_and_tied_embeddings_match() {
    check_against_golden("llama3_tied", 1, 1);
}

/// A bf16 checkpoint keeps its weights in bf16 (`dtype: auto`); the goldens are f32 arithmetic
/// on those values.
#[test]
fn qwen2_bf16_sharded_with_bias_matches() {
    let engine = check_against_golden("qwen2_bf16_sharded", 1, 1);
    assert_eq!(engine.resolved().dtype, "bfloat16");
}

/// `dtype: auto` keeps a bf16 checkpoint's weights in bf16 and computes in f32: the logits are
/// transformers' f32 run on the same (bf16-valued) weights, to the f32 goldens' 1e-4. The same
/// checkpoint widened to float32, or narrowed to float16 (bf16 values of this range are exact
/// in f16), gives the same.
#[test]
fn llama_bf16_checkpoint_in_each_dtype_matches_f32_arithmetic() {
    for (dtype, resolved) in [
        ("auto", "bfloat16"),
        ("bfloat16", "bfloat16"),
        ("float32", "float32"),
        ("float16", "float16"),
        ("half", "float16"),
    ] {
        let engine = check_in("llama_bf16", 2, 2, dtype);
        assert_eq!(engine.resolved().dtype, resolved, "dtype {dtype}");
    }
}

/// One bf16 ulp (the spacing of bf16 values) at `x`: bf16 keeps 8 significant bits.
fn bf16_ulp(x: f32) -> f32 {
    2f32.powi(x.abs().log2().floor() as i32 - 7)
}

/// Against transformers running the bf16 checkpoint in bf16. transformers rounds every
/// activation to bf16 as it is made (the residual stream, each projection's output, attention,
/// the norms, the logits themselves: some 25 roundings, each of relative error up to 2^-8, between
/// the embedding and a logit of this 2-layer model), where we keep f32; so the two differ by a
/// few bf16 ulps at the logits' scale. The bound asserted is 8 ulps at the request's largest
/// |logit| (0.125 for logits within ±4); the fixture's own bf16-vs-f32 gap, which our f32
/// arithmetic reproduces, is checked against the same bound (it measured 0.028–0.054). The
/// greedy tokens must be transformers-bf16's exactly (the fixture kept prompts where its bf16
/// and f32 runs agree).
#[test]
fn llama_bf16_matches_transformers_in_bf16() {
    let case = "llama_bf16";
    let golden = load(case);
    let loras = lora_requests(case);
    let mut engine = engine(case, 2, 2);
    assert_eq!(engine.resolved().dtype, "bfloat16");
    let all: Vec<usize> = (0..golden.requests.len()).collect();
    let got = run(&mut engine, &golden, &loras, &all);
    assert!(golden.requests.iter().any(|r| r.lora.is_some()));
    for (k, r) in golden.requests.iter().enumerate() {
        let what = format!("{case} request {k} (adapter {:?})", r.lora);
        assert_eq!(
            got.tokens[k], r.bf16_greedy_token_ids,
            "{what}: greedy tokens differ"
        );
        let tol = 8.0 * bf16_ulp(r.bf16_max_abs_logit);
        assert!(
            r.bf16_max_diff_to_f32 < tol,
            "{what}: the fixture's bf16 run is {} from its f32 run, over {tol}",
            r.bf16_max_diff_to_f32
        );
        let d1 = max_diff(&got.first_logits[k], &r.bf16_first_logits);
        let d2 = max_diff(&got.last_logits[k], &r.bf16_last_logits);
        assert!(
            d1 < tol && d2 < tol,
            "{what}: logits differ from transformers-bf16 by {d1} (first) / {d2} (last), over {tol}"
        );
    }
}

/// Tensor parallelism with the ranks run in turn on the CPU: every fixture with its adapters
/// (on all seven projections, rsLoRA, per-layer patterns; q/k/v bias; q/k norm; tied
/// embeddings), split over 2 ranks and over 4 (then each of the 2 KV heads is replicated on 2
/// ranks), gives the unsharded engine's greedy tokens and its logits within 1e-4 in f32 — and
/// so transformers + PEFT's, checked here too.
#[test]
fn tensor_parallel_ranks_match_the_unsharded_engine_and_peft() {
    for case in ["llama", "llama3_tied", "qwen2_bf16_sharded", "qwen3", "mistral"] {
        let golden = load(case);
        let loras = lora_requests(case);
        let all: Vec<usize> = (0..golden.requests.len()).collect();
        let whole = run(&mut engine_tp(case, 4, 4, "float32", 1), &golden, &loras, &all);
        for tp in [2, 4] {
            let mut engine = engine_tp(case, 4, 4, "float32", tp);
            let got = run(&mut engine, &golden, &loras, &all);
            for (k, r) in golden.requests.iter().enumerate() {
                let what = format!(
                    "{case}, tensor_parallel_size {tp}, request {k} (adapter {:?})",
                    r.lora
                );
                assert_eq!(
                    got.tokens[k], whole.tokens[k],
                    "{what}: tokens differ from one rank's"
                );
                assert_eq!(
                    got.tokens[k], r.greedy_token_ids,
                    "{what}: tokens differ from PEFT's"
                );
                let to_whole = max_diff(&got.first_logits[k], &whole.first_logits[k])
                    .max(max_diff(&got.last_logits[k], &whole.last_logits[k]));
                let to_peft = max_diff(&got.first_logits[k], &r.first_logits)
                    .max(max_diff(&got.last_logits[k], &r.last_logits));
                assert!(
                    to_whole < 1e-4 && to_peft < 1e-4,
                    "{what}: logits differ by {to_whole} from one rank's, {to_peft} from PEFT's"
                );
            }
        }
    }
}

/// A split that does not divide the model is refused by name; so is the CUDA backend with
/// more than one rank.
#[test]
fn tensor_parallel_sizes_that_do_not_divide_are_refused() {
    for (tp, device, says) in [
        (3, Device::Cpu, "num_attention_heads (4) must be divisible by it"),
        (8, Device::Cpu, "num_attention_heads (4) must be divisible by it"),
        (2, Device::Cuda, "the CUDA backend runs on one GPU"),
    ] {
        let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
        cfg.tensor_parallel_size = tp;
        cfg.device = device;
        let err = LLMEngine::new(cfg).err().expect("refused").to_string();
        assert!(
            err.contains(&format!("tensor_parallel_size {tp}: {says}")),
            "{err}"
        );
    }
}

/// Shapes nobody tuned for, with prompts of 2,050 to 2,300 tokens beside short ones, each case
/// as one mixed batch (`common::GQA_CASES` says what each holds).
#[test]
fn untuned_shapes_and_long_prompts_match_peft() {
    for case in GQA_CASES {
        check_against_golden(case, 4, 4);
    }
}

#[test]
fn qwen3_qk_norm_matches() {
    check_against_golden("qwen3", 1, 1);
}

#[test]
fn mistral_matches() {
    check_against_golden("mistral", 1, 1);
}

/// One slot and a one-adapter host cache for four adapters: every step that changes adapter
/// reloads from disk and refills the slot; the results do not change.
#[test]
fn eviction_and_reload_change_nothing() {
    let engine = check_against_golden("llama", 1, 1);
    let stats = engine.lora_stats().unwrap();
    assert!(stats.cache_evictions >= 3, "{stats:?}");
    assert!(stats.slot_loads >= 4, "{stats:?}");
}

/// A batch mixing adapters and base rows equals, row by row, each request run alone.
#[test]
fn mixed_batch_equals_each_request_alone() {
    let golden = load("llama");
    let loras = lora_requests("llama");
    let mut e = engine("llama", 4, 4);
    let all: Vec<usize> = (0..golden.requests.len()).collect();
    let mixed = run(&mut e, &golden, &loras, &all);
    for i in all {
        let alone = run(&mut e, &golden, &loras, &[i]);
        assert_eq!(alone.tokens[0], mixed.tokens[i], "request {i}");
        let d = max_diff(&alone.last_logits[0], &mixed.last_logits[i]);
        assert!(d < 1e-5, "request {i}: alone vs mixed logits differ by {d}");
    }
}

/// `lora_target_modules` (vLLM's setting; here with vLLM's packed names) admits the adapters
/// that target only those projections — their requests still give PEFT's tokens and logits —
/// and refuses the others when they are added, naming what they target beyond it.
#[test]
fn lora_target_modules_admits_only_adapters_within_it() {
    let golden = load("llama");
    let loras = lora_requests("llama");
    let mut cfg = case_config("llama");
    cfg.lora_target_modules = Some(vec!["qkv_proj".into(), "o_proj".into()]);
    let mut engine = LLMEngine::new(cfg.clone()).expect("engine loads");
    for (name, outside) in [
        ("a_r8_all", "gate_proj, up_proj, down_proj"),
        ("d_pattern", "down_proj"),
    ] {
        let err = engine.add_lora(&loras[name]).unwrap_err().to_string();
        assert!(
            err.contains(name)
                && err.contains(&format!("targets {outside},"))
                && err.contains("lora_target_modules (q_proj, k_proj, v_proj, o_proj)"),
            "{err}"
        );
    }
    let within: Vec<usize> = (0..golden.requests.len())
        .filter(|&i| {
            golden.requests[i]
                .lora
                .as_deref()
                .is_none_or(|l| l == "b_r4_qv_regex" || l == "c_r16_rslora")
        })
        .collect();
    assert!(within.len() >= 3, "{within:?}");
    let got = run(&mut engine, &golden, &loras, &within);
    for (k, &i) in within.iter().enumerate() {
        let r = &golden.requests[i];
        assert_eq!(got.tokens[k], r.greedy_token_ids, "request {i} ({:?})", r.lora);
        let d = max_diff(&got.first_logits[k], &r.first_logits);
        assert!(d < 1e-4, "request {i} ({:?}): first logits differ by {d}", r.lora);
    }
    cfg.lora_target_modules = Some(vec!["q_proj".into(), "lm_head".into()]);
    let err = LLMEngine::new(cfg).err().expect("lm_head is refused").to_string();
    assert!(
        err.contains("lora_target_modules") && err.contains("\"lm_head\""),
        "{err}"
    );
}
