//! When KV blocks run out, requests wait or are preempted and recomputed — never lost — and
//! the greedy result does not change, also when prompts (and recomputations) are chunked.

use std::collections::HashMap;
use std::path::Path;

use multilora_engine::{EngineConfig, LLMEngine, Prompt, SamplingParams};

fn run(num_blocks: Option<usize>, max_num_batched_tokens: Option<usize>) -> (HashMap<String, Vec<u32>>, u32) {
    let mut cfg = EngineConfig::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama/model"));
    cfg.max_model_len = Some(64);
    cfg.block_size = 4;
    cfg.num_gpu_blocks_override = num_blocks;
    cfg.max_num_batched_tokens = max_num_batched_tokens;
    cfg.max_num_seqs = max_num_batched_tokens.unwrap_or(8).min(8);
    let mut engine = LLMEngine::new(cfg).unwrap();
    for i in 0..8u32 {
        let prompt: Vec<u32> = (0..10 + i).map(|t| 3 + (t * 7 + i * 13) % 300).collect();
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(20)
        };
        engine
            .add_request(&format!("r{i}"), Prompt::TokenIds(prompt), params, None)
            .unwrap();
    }
    let mut out = HashMap::new();
    let mut preemptions = 0;
    let mut steps = 0;
    while engine.has_unfinished_requests() {
        for o in engine.step().unwrap() {
            if o.is_finished() {
                preemptions += o.metrics.num_preemptions;
                assert_eq!(o.output_token_ids.len(), 20);
                out.insert(o.request_id.to_string(), o.output_token_ids);
            }
        }
        steps += 1;
        assert!(steps < 2000, "no progress");
    }
    (out, preemptions)
}

#[test]
fn preempted_requests_recompute_to_the_same_tokens() {
    let (roomy, p0) = run(None, None);
    // 16 blocks of 4 tokens: one 64-token sequence fits, eight ~35-token ones do not.
    let (tight, p1) = run(Some(16), None);
    assert_eq!(p0, 0);
    assert!(p1 > 0, "the tight cache should force preemption");
    assert_eq!(roomy.len(), 8);
    assert_eq!(roomy, tight);
    // 6 tokens a step: prompts and recomputations are chunked, partial prefills preempted.
    let (chunked, p2) = run(Some(16), Some(6));
    assert!(p2 > 0, "the tight cache should force preemption");
    assert_eq!(roomy, chunked);
}
