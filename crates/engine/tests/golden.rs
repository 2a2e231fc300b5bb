//! The engine against transformers + PEFT. `scripts/make_golden.py` built tiny models of each
//! supported architecture and PEFT adapters, and recorded greedy tokens and logits per request
//! (each run alone in PyTorch). Here the requests run as one mixed batch.

mod common;

use std::collections::HashMap;

use common::{add_requests, case_dir, load, lora_requests, max_diff, Golden};
use multilora_engine::{EngineConfig, LLMEngine, LoraRequest};

fn engine(case: &str, max_loras: usize, max_cpu_loras: usize) -> LLMEngine {
    let mut cfg = EngineConfig::new(case_dir(case).join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = max_loras;
    cfg.max_cpu_loras = Some(max_cpu_loras);
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(256);
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
    let golden = load(case);
    let loras = lora_requests(case);
    let mut engine = engine(case, max_loras, max_cpu_loras);
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

#[test]
fn qwen2_bf16_sharded_with_bias_matches() {
    check_against_golden("qwen2_bf16_sharded", 1, 1);
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
