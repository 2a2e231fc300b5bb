//! Chunked prefill changes when tokens are computed, never what: with `max_num_batched_tokens`
//! small enough that prompts cross chunk and KV-block boundaries, every request gets the same
//! tokens and logits as prefilled in one step (greedy and seeded sampling, with adapters), and
//! running decodes keep producing a token every step while a long prompt is chunked.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use common::gpu::{have_gpu, logits_tolerance};
use common::{case_config, load, lora_requests, max_diff, GQA_CASES};
use multilora_engine::cuda::elem::Elem;
use multilora_engine::{EngineConfig, LLMEngine, Prompt, SamplingParams};

/// A golden case's engine with 4-token KV blocks; `None` prefills every prompt in one step.
fn engine(case: &str, max_num_batched_tokens: Option<usize>) -> LLMEngine {
    LLMEngine::new(config(case, max_num_batched_tokens)).expect("engine loads")
}

fn config(case: &str, max_num_batched_tokens: Option<usize>) -> EngineConfig {
    let mut cfg = case_config(case);
    cfg.block_size = 4;
    if let Some(n) = max_num_batched_tokens {
        cfg.max_num_batched_tokens = Some(n);
        cfg.max_num_seqs = n.min(8);
    }
    cfg
}

/// Per request: every output token and the logits it was drawn from.
type Outputs = Vec<Vec<(u32, Vec<f32>)>>;

/// Runs a case's golden requests together with `params` (the seed offset by the request's
/// index); checks that no step exceeds the budget and that only sequences that finished
/// their prompt produced output. Returns the outputs and how many steps chunked a prompt.
fn run(engine: &mut LLMEngine, case: &str, params: &SamplingParams) -> (Outputs, usize) {
    let golden = load(case);
    let loras = lora_requests(case);
    for (i, r) in golden.requests.iter().enumerate() {
        let params = SamplingParams {
            seed: params.seed.map(|s| s + i as u64),
            ..params.clone()
        };
        let lora = r.lora.as_ref().map(|name| &loras[name]);
        let prompt = Prompt::TokenIds(r.prompt_token_ids.clone());
        engine.add_request(&i.to_string(), prompt, params, lora).unwrap();
    }
    let budget = engine.resolved().max_num_batched_tokens;
    let mut out: Outputs = vec![Vec::new(); golden.requests.len()];
    let (mut num_steps, mut num_chunked_steps) = (0, 0);
    while engine.has_unfinished_requests() {
        num_steps += 1;
        assert!(num_steps < 2000, "requests did not finish");
        let outputs = engine.step().unwrap();
        let stats = engine.last_step_stats();
        assert!(
            stats.num_prefill_tokens + stats.num_decode_tokens <= budget,
            "{stats:?}"
        );
        assert_eq!(
            outputs.len(),
            stats.num_seqs - stats.num_partial_prefills,
            "{stats:?}"
        );
        num_chunked_steps += (stats.num_chunked_prefill_tokens > 0) as usize;
        for o in outputs {
            let i: usize = o.request_id.parse().unwrap();
            let logits = engine
                .last_logits(&o.request_id)
                .expect("host sampling keeps logits");
            out[i].push((o.token_id.expect("no adapter failed to load"), logits.to_vec()));
        }
    }
    (out, num_chunked_steps)
}

fn assert_same(chunked: &Outputs, whole: &Outputs, what: &str) {
    for (i, (c, w)) in chunked.iter().zip(whole).enumerate() {
        let tokens = |o: &[(u32, Vec<f32>)]| o.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(tokens(c), tokens(w), "{what}: request {i}: tokens differ");
        for (k, (a, b)) in c.iter().zip(w).enumerate() {
            let d = max_diff(&a.1, &b.1);
            assert!(d < 1e-5, "{what}: request {i} token {k}: logits differ by {d}");
        }
    }
}

/// Every golden case (adapters in llama, qwen2 and qwen3; GQA, biases, qk-norm, tied
/// embeddings), prefilled in chunks, against one-step prefill and against PEFT.
#[test]
fn chunked_greedy_matches_one_step_prefill_and_peft() {
    // Prompts of 5..90 tokens: chunks of 3 and 5 cut through them and through the 4-token
    // blocks; 16 splits only the longer ones, and shares steps with decodes. And with the
    // default budget but long_prefill_token_threshold 7: every longer prompt takes 7 tokens a
    // step, several of them partly prefilled at once.
    let budgets = [(Some(3), 0), (Some(5), 0), (Some(16), 0), (None, 7)];
    for case in ["llama", "llama3_tied", "qwen2_bf16_sharded", "qwen3", "mistral"] {
        check_chunked_against_peft(case, &budgets);
    }
}

/// The same for prompts of 2,050 to 2,300 tokens beside short ones, in the shapes nobody tuned
/// for (GQA ratios 1, 4, 7 and 8; q/k/v bias; q/k norm; adapter ranks 8 to 64): chunks of 333
/// and 1,000 tokens end inside KV blocks, and with the default budget a threshold of 700 prefills
/// the long prompts side by side.
#[test]
fn chunked_long_prompts_in_untuned_shapes_match_one_step_prefill_and_peft() {
    let budgets = [(Some(333), 0), (Some(1000), 0), (None, 700)];
    for case in GQA_CASES {
        check_chunked_against_peft(case, &budgets);
    }
}

/// `case` prefilled with each (`max_num_batched_tokens`, `long_prefill_token_threshold`) of
/// `budgets`: the same tokens and logits as one-step prefill, and PEFT's.
fn check_chunked_against_peft(case: &str, budgets: &[(Option<usize>, usize)]) {
    let golden = load(case);
    let greedy = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(golden.num_steps)
    };
    let (whole, n) = run(&mut engine(case, None), case, &greedy);
    assert_eq!(
        n, 0,
        "{case}: the default budget prefills every prompt in one step"
    );
    for &(budget, threshold) in budgets {
        let what = format!("{case}, budget {budget:?}, long_prefill_token_threshold {threshold}");
        let mut cfg = config(case, budget);
        cfg.long_prefill_token_threshold = threshold;
        let (chunked, n) = run(&mut LLMEngine::new(cfg).expect("engine loads"), case, &greedy);
        assert!(n > 0, "{what}: some prompt should be chunked");
        assert_same(&chunked, &whole, &what);
        for (i, r) in golden.requests.iter().enumerate() {
            let tokens: Vec<u32> = chunked[i].iter().map(|x| x.0).collect();
            assert_eq!(tokens, r.greedy_token_ids, "{what}: request {i} vs PEFT");
            let d = max_diff(&chunked[i][0].1, &r.first_logits);
            assert!(
                d < 1e-4,
                "{what}: request {i}: first logits vs PEFT differ by {d}"
            );
        }
    }
}

/// A request's RNG advances only on the steps that sample, so seeded requests draw the same.
#[test]
fn chunked_seeded_sampling_matches_one_step_prefill() {
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(11),
        ignore_eos: true,
        max_tokens: 12,
        ..Default::default()
    };
    let (whole, _) = run(&mut engine("llama", None), "llama", &params);
    let distinct: std::collections::HashSet<u32> = whole.iter().flatten().map(|x| x.0).collect();
    assert!(distinct.len() > 10, "sampling is not degenerate: {distinct:?}");
    for budget in [3, 7] {
        let (chunked, n) = run(&mut engine("llama", Some(budget)), "llama", &params);
        assert!(n > 0);
        assert_same(&chunked, &whole, &format!("seeded, budget {budget}"));
    }
}

/// Three requests decode while a 200-token prompt arrives with a budget of 16: each of them
/// gets a token every step, the long prompt takes the other 13 tokens a step and produces its
/// first token (and its first-token time) only after its last chunk, and its tokens are those
/// of a one-step prefill.
#[test]
fn decodes_keep_streaming_while_a_long_prompt_is_chunked() {
    let long: Vec<u32> = (0..200).map(|t| 3 + (t * 37 + 11) % 300).collect();
    let greedy = |n| SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    };
    let mut alone = engine("llama", None);
    alone
        .add_request("long", Prompt::TokenIds(long.clone()), greedy(4), None)
        .unwrap();
    let mut expected = Vec::new();
    while alone.has_unfinished_requests() {
        for o in alone.step().unwrap() {
            expected.extend(o.token_id);
        }
    }

    let mut e = engine("llama", Some(16));
    for i in 0..3u32 {
        let prompt = Prompt::TokenIds(vec![1, 5 + i, 9, 13 + i, 2]);
        e.add_request(&format!("d{i}"), prompt, greedy(40), None).unwrap();
    }
    e.step().unwrap();
    e.add_request("long", Prompt::TokenIds(long), greedy(4), None)
        .unwrap();
    let mut got = Vec::new();
    let mut num_chunk_steps = 0;
    while got.is_empty() {
        let before = Instant::now();
        let outputs = e.step().unwrap();
        let stats = e.last_step_stats();
        let mut tokens: HashMap<String, u32> = HashMap::new();
        for o in outputs {
            tokens.insert(o.request_id.to_string(), o.token_id.unwrap());
            if &*o.request_id == "long" {
                got.extend(o.token_id);
                let t = o.metrics.first_token_time.unwrap();
                assert!(t >= before, "first-token time set in an earlier step");
            }
        }
        for i in 0..3 {
            assert!(
                tokens.contains_key(&format!("d{i}")),
                "d{i} got no token in a chunk step"
            );
        }
        assert_eq!(stats.num_decode_tokens, 3);
        assert_eq!(
            stats.num_prefill_tokens,
            if got.is_empty() { 13 } else { 200 % 13 }
        );
        assert_eq!(stats.num_chunked_prefill_tokens, stats.num_prefill_tokens);
        assert_eq!(stats.num_partial_prefills, got.is_empty() as usize);
        num_chunk_steps += 1;
    }
    assert_eq!(num_chunk_steps, 200usize.div_ceil(13));
    while e.has_unfinished_requests() {
        for o in e.step().unwrap() {
            if &*o.request_id == "long" {
                got.extend(o.token_id);
            }
        }
    }
    assert_eq!(got, expected, "the long prompt's tokens, chunked vs one step");
}

/// On the GPU (skipped without one, as on CI): chunked prefill with device sampling. Rows whose
/// chunk stops inside the prompt are in the batch but sample nothing, so each returned id must
/// still be the host argmax of its own row's logits, and each request's first token and logits
/// must match PEFT within bf16 rounding (`logits_tolerance`, as the `cuda_*.rs` tests).
#[test]
fn cuda_chunked_prefill_samples_the_right_rows() {
    if !have_gpu() {
        return;
    }
    let golden = load("llama");
    let loras = lora_requests("llama");
    for budget in [5, 16] {
        let mut cfg = config("llama", Some(budget));
        cfg.device = multilora_engine::Device::Cuda;
        cfg.return_logits = true;
        let mut e = LLMEngine::new(cfg).expect("engine loads");
        for (i, r) in golden.requests.iter().enumerate() {
            let lora = r.lora.as_ref().map(|name| &loras[name]);
            let params = SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(4)
            };
            let prompt = Prompt::TokenIds(r.prompt_token_ids.clone());
            e.add_request(&i.to_string(), prompt, params, lora).unwrap();
        }
        let mut num_partial = 0;
        while e.has_unfinished_requests() {
            let outputs = e.step().unwrap();
            num_partial += e.last_step_stats().num_partial_prefills;
            for o in outputs {
                let i: usize = o.request_id.parse().unwrap();
                let logits = e.last_logits(&o.request_id).expect("return_logits");
                let id = o.token_id.unwrap();
                let best = multilora_engine::sampling::argmax(logits);
                assert_eq!(id, best, "budget {budget}: request {i}: device id vs host argmax");
                if o.num_output_tokens == 1 {
                    let r = &golden.requests[i];
                    let rel = max_diff(logits, &r.first_logits) / common::max_abs(&r.first_logits);
                    assert!(
                        rel < logits_tolerance(Elem::Bf16),
                        "budget {budget}: request {i}: first logits rel diff {rel}"
                    );
                    assert_eq!(id, r.greedy_token_ids[0], "budget {budget}: request {i}");
                }
            }
        }
        assert!(num_partial > 0, "budget {budget}: some prompt should be chunked");
    }
}
