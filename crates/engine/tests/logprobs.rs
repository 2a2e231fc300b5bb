//! `logprobs` and `prompt_logprobs` on the CPU backend: the sampled token's log-probability is
//! the log-softmax of the logits it was drawn from (raw: before temperature and the
//! `min_tokens` ban), a prompt token's is the one the prefix before it gives its next token,
//! whether the prompt ran in one step or in chunks, with or without an adapter; and both equal
//! transformers' log-softmax on the golden fixtures.

mod common;

use std::collections::HashMap;

use common::{case_config, case_dir, load, lora_requests};
use multilora_engine::{
    EngineConfig, LLMEngine, LoraRequest, Prompt, RequestOutput, SamplingParams, TokenLogprob,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn engine(
    max_num_batched_tokens: Option<usize>,
    return_logits: bool,
) -> Result<LLMEngine, multilora_engine::Error> {
    let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = 2;
    cfg.max_cpu_loras = Some(4);
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(128);
    cfg.max_num_seqs = 4;
    cfg.max_num_batched_tokens = max_num_batched_tokens;
    cfg.return_logits = return_logits;
    LLMEngine::new(cfg)
}

/// Runs requests to the end; every output of each, by request id.
fn run_all(
    engine: &mut LLMEngine,
    requests: &[(&str, Vec<u32>, SamplingParams, Option<&LoraRequest>)],
) -> Result<HashMap<String, Vec<RequestOutput>>, Box<dyn std::error::Error>> {
    for (id, prompt, params, lora) in requests {
        engine.add_request(id, Prompt::TokenIds(prompt.clone()), params.clone(), *lora)?;
    }
    let mut outs: HashMap<String, Vec<RequestOutput>> = HashMap::new();
    for _ in 0..1000 {
        if !engine.has_unfinished_requests() {
            return Ok(outs);
        }
        for o in engine.step()? {
            outs.entry(o.request_id.to_string()).or_default().push(o);
        }
    }
    Err("requests did not finish".into())
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| l as f64 - z).collect()
}

fn prompt_logprobs_of(outs: &[RequestOutput]) -> Result<&Vec<Option<TokenLogprob>>, &'static str> {
    outs[0]
        .prompt_logprobs
        .as_ref()
        .ok_or("no prompt logprobs with the first output")
}

#[test]
fn sampled_logprobs_are_the_raw_log_softmax_of_the_logits() -> TestResult {
    let golden = load("llama");
    let loras = lora_requests("llama");
    let mut engine = engine(None, true)?;
    let eos = engine.model_config().eos_token_ids.clone();
    for (k, r) in golden.requests.iter().enumerate() {
        let lora = r.lora.as_ref().map(|n| &loras[n]);
        let prompt = || Prompt::TokenIds(r.prompt_token_ids.clone());
        // The raw logits of the first token: greedy, nothing banned.
        engine.add_request("raw", prompt(), SamplingParams::greedy(1), lora)?;
        engine.step()?;
        let raw = engine.last_logits("raw").ok_or("no logits")?.to_vec();
        // Sampled hot, EOS banned (min_tokens): neither changes the logprobs.
        let params = SamplingParams {
            temperature: 1.7,
            seed: Some(k as u64),
            logprobs: Some(4),
            min_tokens: 2,
            max_tokens: 2,
            ..Default::default()
        };
        engine.add_request("hot", prompt(), params, lora)?;
        let out = engine.step()?;
        let masked = engine.last_logits("hot").ok_or("no logits")?;
        assert!(
            eos.iter().all(|&e| masked[e as usize] == f32::NEG_INFINITY),
            "EOS banned"
        );
        let lp = out[0].logprobs.as_ref().ok_or("no logprobs")?;
        let token = out[0].token_id.ok_or("no token")?;
        assert_eq!(lp.token_id, token);
        let ls = log_softmax(&raw);
        assert!(
            (lp.logprob as f64 - ls[token as usize]).abs() < 1e-5,
            "{lp:?} vs {}",
            ls[token as usize]
        );
        let rank = 1 + raw.iter().filter(|&&l| l > raw[token as usize]).count() as u32;
        assert_eq!(lp.rank, rank);
        let mut order: Vec<usize> = (0..raw.len()).collect();
        order.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]).then(a.cmp(&b)));
        let top: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        let want: Vec<u32> = order[..4].iter().map(|&i| i as u32).collect();
        assert_eq!(top, want, "request {k}");
        for &(id, l) in &lp.top {
            assert!((l as f64 - ls[id as usize]).abs() < 1e-5);
        }
        while engine.has_unfinished_requests() {
            engine.step()?;
        }
    }
    Ok(())
}

#[test]
fn prompt_logprobs_match_each_prefix_and_chunking() -> TestResult {
    let golden = load("llama");
    let loras = lora_requests("llama");
    // Request 3 has 23 prompt tokens and an adapter, request 1 none.
    for k in [1, 3] {
        let r = &golden.requests[k];
        let lora = r.lora.as_ref().map(|n| &loras[n]);
        let p = &r.prompt_token_ids;
        let params = SamplingParams {
            prompt_logprobs: Some(2),
            logprobs: Some(0),
            ..SamplingParams::greedy(1)
        };
        // One step; then chunks of 5 tokens shared with another request.
        let whole = run_all(
            &mut engine(None, false)?,
            &[("w", p.clone(), params.clone(), lora)],
        )?;
        let other = SamplingParams::greedy(6);
        let chunked = run_all(
            &mut engine(Some(5), false)?,
            &[
                ("o", golden.requests[0].prompt_token_ids.clone(), other, None),
                ("c", p.clone(), params.clone(), lora),
            ],
        )?;
        let (w, c) = (
            prompt_logprobs_of(&whole["w"])?,
            prompt_logprobs_of(&chunked["c"])?,
        );
        assert_eq!(w.len(), p.len());
        assert!(
            w[0].is_none() && c[0].is_none(),
            "the first prompt token has none"
        );
        // Each prefix alone: its last logits score the next prompt token.
        let mut prefix_engine = engine(None, true)?;
        for j in 1..p.len() {
            let (wj, cj) = (w[j].as_ref().ok_or("missing")?, c[j].as_ref().ok_or("missing")?);
            assert_eq!(wj.token_id, p[j]);
            assert!(
                (wj.logprob - cj.logprob).abs() < 1e-4,
                "position {j}: {wj:?} vs {cj:?}"
            );
            assert_eq!(wj.top.len(), 2);
            prefix_engine.add_request(
                "p",
                Prompt::TokenIds(p[..j].to_vec()),
                SamplingParams::greedy(1),
                lora,
            )?;
            prefix_engine.step()?;
            let ls = log_softmax(prefix_engine.last_logits("p").ok_or("no logits")?);
            assert!(
                (wj.logprob as f64 - ls[p[j] as usize]).abs() < 1e-4,
                "request {k} position {j}: {} vs the prefix's {}",
                wj.logprob,
                ls[p[j] as usize]
            );
            while prefix_engine.has_unfinished_requests() {
                prefix_engine.step()?;
            }
        }
        // `logprobs: 0` still gives the sampled token's.
        let first = whole["w"][0].logprobs.as_ref().ok_or("logprobs: 0 gave none")?;
        assert!(
            first.top.is_empty() && first.logprob <= 0.0 && first.rank == 1,
            "{first:?}"
        );
        assert!(chunked["o"][0].prompt_logprobs.is_none() && chunked["o"][0].logprobs.is_none());
    }
    Ok(())
}

#[test]
fn logprobs_above_twenty_are_refused_by_name() -> TestResult {
    let mut engine = engine(None, false)?;
    for field in ["logprobs", "prompt_logprobs"] {
        let mut params = SamplingParams::greedy(1);
        match field {
            "logprobs" => params.logprobs = Some(21),
            _ => params.prompt_logprobs = Some(21),
        }
        let err = engine
            .add_request("x", Prompt::TokenIds(vec![1, 2]), params, None)
            .err()
            .ok_or("accepted")?;
        assert!(err.to_string().contains(field), "{err}");
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct GoldenLogprobs {
    requests: Vec<GoldenSequence>,
}

/// A golden prompt and its greedy continuation, with transformers' log-probability of each
/// token given the ones before it (`scripts/make_golden_logprobs.py`).
#[derive(serde::Deserialize)]
struct GoldenSequence {
    token_ids: Vec<u32>,
    lora: Option<String>,
    logprobs: Vec<Option<f64>>,
}

/// Every case's prompt + continuation as one prompt: our prompt logprobs equal transformers'
/// log-softmax at every position, with each request's adapter (or none), all in one batch —
/// also with the model split over 2 and 4 tensor-parallel ranks (each prompt token's logits
/// gathered from the ranks' vocabulary rows).
#[test]
fn prompt_logprobs_equal_transformers_log_softmax() -> TestResult {
    let cases = ["llama", "llama3_tied", "mistral", "qwen2_bf16_sharded", "qwen3"];
    for (case, tensor_parallel_size) in cases.iter().flat_map(|&c| [(c, 1), (c, 2), (c, 4)]) {
        let path = case_dir(case).join("logprobs.json");
        let golden: GoldenLogprobs = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let loras = lora_requests(case);
        let mut cfg = case_config(case);
        cfg.max_cpu_loras = Some(4);
        cfg.tensor_parallel_size = tensor_parallel_size;
        let mut engine = LLMEngine::new(cfg)?;
        let params = SamplingParams {
            prompt_logprobs: Some(0),
            ..SamplingParams::greedy(1)
        };
        let ids: Vec<String> = (0..golden.requests.len()).map(|i| i.to_string()).collect();
        let requests: Vec<_> = (golden.requests.iter().zip(&ids))
            .map(|(r, id)| {
                (
                    id.as_str(),
                    r.token_ids.clone(),
                    params.clone(),
                    r.lora.as_ref().map(|n| &loras[n]),
                )
            })
            .collect();
        let outs = run_all(&mut engine, &requests)?;
        let mut worst = 0.0f64;
        for (r, id) in golden.requests.iter().zip(&ids) {
            let got = prompt_logprobs_of(&outs[id])?;
            assert_eq!(got.len(), r.logprobs.len());
            for (j, (g, want)) in got.iter().zip(&r.logprobs).enumerate() {
                match (g, want) {
                    (None, None) => {}
                    (Some(g), Some(w)) => {
                        assert_eq!(g.token_id, r.token_ids[j]);
                        worst = worst.max((g.logprob as f64 - w).abs());
                    }
                    _ => return Err(format!("{case} request {id} position {j}: {g:?} vs {want:?}").into()),
                }
            }
        }
        eprintln!("{case}, tensor_parallel_size {tensor_parallel_size}: largest difference from transformers {worst:e}");
        assert!(
            worst < 1e-4,
            "{case}, tensor_parallel_size {tensor_parallel_size}: logprobs differ from transformers' by up to {worst}"
        );
    }
    Ok(())
}
