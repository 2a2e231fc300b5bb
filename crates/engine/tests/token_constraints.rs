//! vLLM's `allowed_token_ids` and `bad_words` (tokenized): every output token is allowed, no
//! bad word appears, requests without them in the same batch are unchanged, and ids outside the
//! vocabulary are refused naming the field.

mod common;

use std::collections::HashMap;

use common::{case_dir, load};
use multilora_engine::{EngineConfig, Error, LLMEngine, Prompt, SamplingParams};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn engine() -> Result<LLMEngine, Error> {
    let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
    cfg.max_model_len = Some(64);
    cfg.max_num_seqs = 8;
    LLMEngine::new(cfg)
}

fn params(seed: u64) -> SamplingParams {
    SamplingParams {
        seed: Some(seed),
        temperature: 1.0,
        ignore_eos: true,
        max_tokens: 12,
        ..Default::default()
    }
}

/// Runs the requests (id, params) together over golden prompt 0; output tokens by id.
fn run(reqs: &[(&str, SamplingParams)]) -> Result<HashMap<String, Vec<u32>>, Box<dyn std::error::Error>> {
    let prompt = load("llama").requests[0].prompt_token_ids.clone();
    let mut e = engine()?;
    for (id, p) in reqs {
        e.add_request(id, Prompt::TokenIds(prompt.clone()), p.clone(), None)?;
    }
    let mut outs = HashMap::new();
    while e.has_unfinished_requests() {
        for o in e.step()? {
            if o.is_finished() {
                outs.insert(o.request_id.to_string(), o.output_token_ids);
            }
        }
    }
    Ok(outs)
}

#[test]
fn outputs_keep_to_the_allowed_tokens_and_avoid_bad_words() -> TestResult {
    let free = run(&[("free", params(7))])?["free"].clone();
    let (t0, t1) = (free[0], free[1]);
    let allowed = vec![3, 17, 250, t1];
    let constrained = [
        (
            "allowed",
            SamplingParams {
                allowed_token_ids: Some(allowed.clone()),
                ..params(1)
            },
        ),
        // The free request's first token as a one-token bad word, and its first two tokens as
        // a two-token one.
        (
            "bad-one",
            SamplingParams {
                bad_words_token_ids: vec![vec![t0]],
                ..params(7)
            },
        ),
        (
            "bad-two",
            SamplingParams {
                bad_words_token_ids: vec![vec![t0, t1]],
                ..params(7)
            },
        ),
        ("free", params(7)),
    ];
    let outs = run(&constrained)?;
    assert!(
        outs["allowed"].iter().all(|t| allowed.contains(t)),
        "{:?} only from {allowed:?}",
        outs["allowed"]
    );
    assert!(
        !outs["bad-one"].contains(&t0),
        "{:?} without {t0}",
        outs["bad-one"]
    );
    let two = &outs["bad-two"];
    assert_eq!(two[0], t0, "the word's first token alone is not banned");
    assert!(
        !two.windows(2).any(|w| w == [t0, t1]),
        "{two:?} never has {t0} then {t1}"
    );
    // A request without constraints in the same batch draws what it draws alone.
    assert_eq!(outs["free"], free);
    Ok(())
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused_by_field() -> TestResult {
    let mut e = engine()?;
    let vocab = e.model_config().vocab_size as u32;
    for (field, p) in [
        (
            "allowed_token_ids",
            SamplingParams {
                allowed_token_ids: Some(vec![1, vocab]),
                ..params(0)
            },
        ),
        (
            "bad_words",
            SamplingParams {
                bad_words_token_ids: vec![vec![vocab + 5]],
                ..params(0)
            },
        ),
        (
            "allowed_token_ids",
            SamplingParams {
                allowed_token_ids: Some(vec![]),
                ..params(0)
            },
        ),
    ] {
        let err = e
            .add_request("r", Prompt::TokenIds(vec![1, 2]), p, None)
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidSamplingParams { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
    Ok(())
}
