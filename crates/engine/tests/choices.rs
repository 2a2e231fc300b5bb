//! `n` > 1: the choices of a request fork from the first after its prompt ran, sharing the
//! prompt's KV blocks. Each choice must produce what a request of its own would (greedy: the
//! same tokens; seeded: the tokens of `seed + index`), with or without an adapter, through
//! preemptions, and every block must come back.

mod common;

use std::collections::HashMap;

use common::{case_dir, load, lora_requests};
use multilora_engine::{choice_request_id, EngineConfig, LLMEngine, LoraRequest, Prompt, SamplingParams};

type TestResult = Result<(), Box<dyn std::error::Error>>;
/// Output tokens by request id.
type Outputs = HashMap<String, Vec<u32>>;

fn engine(num_blocks: Option<usize>) -> Result<LLMEngine, multilora_engine::Error> {
    let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = 2;
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(64);
    cfg.max_num_seqs = 8;
    cfg.block_size = 4;
    cfg.num_gpu_blocks_override = num_blocks;
    LLMEngine::new(cfg)
}

/// Runs to the end; the output tokens of each request id, and the most blocks in use at once.
fn run(engine: &mut LLMEngine) -> Result<(Outputs, usize), Box<dyn std::error::Error>> {
    let total = engine.resolved().num_kv_blocks;
    let (mut outs, mut most_used, mut num_preempted) = (HashMap::new(), 0, 0);
    for _ in 0..2000 {
        if !engine.has_unfinished_requests() {
            assert_eq!(engine.num_free_blocks(), total, "every block came back");
            assert!(total > 100 || num_preempted > 0, "a small cache preempts");
            return Ok((outs, most_used));
        }
        num_preempted += engine.last_step_stats().num_preempted;
        for o in engine.step()? {
            if o.is_finished() {
                outs.insert(o.request_id.to_string(), o.output_token_ids);
            }
        }
        most_used = most_used.max(total - engine.num_free_blocks());
    }
    Err("did not finish".into())
}

fn params(n: usize, seed: Option<u64>) -> SamplingParams {
    SamplingParams {
        n,
        seed,
        temperature: if seed.is_some() { 1.0 } else { 0.0 },
        ignore_eos: true,
        max_tokens: 10,
        ..Default::default()
    }
}

/// Each golden prompt (with its adapter) as n choices, then each choice as a request alone.
fn check(num_blocks: Option<usize>, seed: Option<u64>) -> TestResult {
    let golden = load("llama");
    let loras = lora_requests("llama");
    let n = 3;
    let requests: Vec<(String, Vec<u32>, Option<&LoraRequest>)> = (golden.requests.iter().enumerate())
        .take(4)
        .map(|(i, r)| {
            (
                format!("r{i}"),
                r.prompt_token_ids.clone(),
                r.lora.as_ref().map(|l| &loras[l]),
            )
        })
        .collect();
    let mut together = engine(num_blocks)?;
    for (id, prompt, lora) in &requests {
        together.add_request(id, Prompt::TokenIds(prompt.clone()), params(n, seed), *lora)?;
    }
    let (got, _) = run(&mut together)?;
    assert_eq!(got.len(), n * requests.len());
    let mut alone = engine(None)?;
    for (id, prompt, lora) in &requests {
        for i in 0..n {
            let seed = seed.map(|s| s + i as u64);
            let choice = choice_request_id(id, i);
            alone.add_request(&choice, Prompt::TokenIds(prompt.clone()), params(1, seed), *lora)?;
        }
    }
    let (want, _) = run(&mut alone)?;
    for (id, tokens) in &want {
        assert_eq!(got.get(id), Some(tokens), "choice {id}");
    }
    if seed.is_some() {
        let distinct: std::collections::HashSet<_> =
            (0..n).map(|i| &got[&choice_request_id("r1", i)]).collect();
        assert!(distinct.len() > 1, "seeded choices differ");
    }
    Ok(())
}

#[test]
fn greedy_choices_equal_the_request_alone() -> TestResult {
    check(None, None)
}

#[test]
fn seeded_choices_draw_with_seed_plus_index() -> TestResult {
    check(None, Some(11))
}

#[test]
fn choices_survive_preemption() -> TestResult {
    // 24 blocks of 4 tokens for 12 sequences of up to ~33 tokens: preemptions galore.
    check(Some(24), Some(5))
}

#[test]
fn choices_share_the_prompt_blocks() -> TestResult {
    let golden = load("llama");
    let prompt = golden.requests[3].prompt_token_ids.clone(); // 23 tokens: 5 full blocks of 4
    let mut one = engine(None)?;
    one.add_request("a", Prompt::TokenIds(prompt.clone()), params(1, None), None)?;
    let (_, single) = run(&mut one)?;
    let mut four = engine(None)?;
    four.add_request("a", Prompt::TokenIds(prompt), params(4, None), None)?;
    let (outs, shared) = run(&mut four)?;
    assert_eq!(outs.len(), 4);
    // 32 tokens computed (the last one sampled is never run) take 8 blocks alone; four choices
    // share the first 5, whole prompt blocks short of the last prompt token.
    assert_eq!(single, 8);
    assert_eq!(shared, 8 + 3 * 3, "each fork holds only its own blocks");
    Ok(())
}

#[test]
fn ids_of_every_choice_must_be_free() -> TestResult {
    let mut e = engine(None)?;
    e.add_request("1_x", Prompt::TokenIds(vec![1, 2, 3]), params(1, None), None)?;
    let err = e
        .add_request("x", Prompt::TokenIds(vec![1, 2, 3]), params(2, None), None)
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains("already running"), "{err}");
    let err = e
        .add_request("y", Prompt::TokenIds(vec![1]), params(0, None), None)
        .err()
        .ok_or("accepted")?;
    assert!(err.to_string().contains('n'), "{err}");
    Ok(())
}
