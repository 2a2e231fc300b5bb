//! Structured outputs on the demo model (random weights: whatever it would say, the output must
//! obey its constraint). Seeded, sampled (temperature 1) requests held to a choice, a regex, a
//! JSON schema or a Lark grammar, with and without an adapter and with `n` > 1, in one batch with free requests
//! whose outputs must equal the same requests run alone.

use std::collections::HashMap;
use std::path::Path;

use multilora_engine::demo::{synth_adapter, write_demo_model, SynthSpec};
use multilora_engine::lora::LoraTarget;
use multilora_engine::{
    choice_request_id, AdapterId, Constraint, EngineConfig, FinishReason, LLMEngine, LoraRequest,
    ModelConfig, Prompt, SamplingParams,
};
use serde_json::{json, Value};

type TestResult = Result<(), Box<dyn std::error::Error>>;
/// Output tokens and finish reason by request id.
type Outputs = HashMap<String, (Vec<u32>, FinishReason)>;

const CHOICES: [&str; 3] = ["red", "green", "blue"];
const REGEX: &str = "[a-z]{3}-[0-9]{2}";

/// An object with a required short string and a required bounded integer; whitespace is fixed
/// so that a random model cannot wander in it until `max_tokens`.
fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 999}
        },
        "required": ["name", "age"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false}
    })
}

fn matches_schema(text: &str) -> bool {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(text) else {
        return false;
    };
    let name_ok = o["name"].as_str().is_some_and(|s| s.chars().count() <= 8);
    let age_ok = o["age"].as_u64().is_some_and(|a| a <= 999);
    o.len() == 2 && name_ok && age_ok
}

fn constraint(i: usize) -> Constraint {
    match i % 3 {
        0 => Constraint::Choice(CHOICES.iter().map(|c| c.to_string()).collect()),
        1 => Constraint::Regex(REGEX.into()),
        _ => Constraint::JsonSchema(schema()),
    }
}

fn obeys(i: usize, text: &str) -> bool {
    match i % 3 {
        0 => CHOICES.contains(&text),
        1 => regex::Regex::new(&format!("^{REGEX}$")).is_ok_and(|r| r.is_match(text)),
        _ => matches_schema(text),
    }
}

fn engine(dir: &Path) -> Result<LLMEngine, multilora_engine::Error> {
    let mut cfg = EngineConfig::new(dir.join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = 1;
    cfg.max_lora_rank = 8;
    cfg.max_model_len = Some(256);
    cfg.max_num_seqs = 32;
    LLMEngine::new(cfg)
}

fn adapter(dir: &Path) -> Result<LoraRequest, Box<dyn std::error::Error>> {
    let path = dir.join("adapters/a");
    if !path.exists() {
        let model = ModelConfig::from_dir(&dir.join("model"))?;
        let spec = SynthSpec {
            rank: 8,
            lora_alpha: 16.0,
            targets: LoraTarget::ALL.to_vec(),
            use_rslora: false,
            seed: 1,
        };
        synth_adapter(&path, &model, "demo", &spec)?;
    }
    Ok(LoraRequest {
        name: "a".into(),
        id: AdapterId(1),
        path,
    })
}

/// Runs to the end: (output tokens, finish reason) by request id.
fn run(engine: &mut LLMEngine) -> Result<Outputs, Box<dyn std::error::Error>> {
    let mut outs = HashMap::new();
    for _ in 0..1000 {
        if !engine.has_unfinished_requests() {
            return Ok(outs);
        }
        for o in engine.step()? {
            if let Some(reason) = o.finish_reason {
                assert!(o.error.is_none(), "{:?}", o.error);
                outs.insert(o.request_id.to_string(), (o.output_token_ids, reason));
            }
        }
    }
    Err("did not finish".into())
}

fn free_params(i: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(100 + i as u64),
        ignore_eos: true,
        max_tokens: 12,
        ..Default::default()
    }
}

#[test]
fn constrained_outputs_obey_with_adapters_and_free_requests_alongside() -> TestResult {
    let tmp = tempfile::tempdir()?;
    write_demo_model(&tmp.path().join("model"), 0)?;
    let lora = adapter(tmp.path())?;
    let mut together = engine(tmp.path())?;
    for i in 0..20 {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(i as u64),
            max_tokens: 64,
            // Two of them as three choices each, every one on its own grammar.
            n: if i == 4 || i == 5 { 3 } else { 1 },
            constraint: Some(constraint(i)),
            ..Default::default()
        };
        let l = (i % 2 == 1).then_some(&lora);
        together.add_request(&format!("c{i}"), Prompt::Text(format!("request {i}:")), params, l)?;
    }
    // A Lark grammar too.
    let lark = Constraint::Grammar("start: \"(\" num \")\"\nnum: /[0-9]{1,3}/".into());
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(7),
        max_tokens: 64,
        constraint: Some(lark),
        ..Default::default()
    };
    together.add_request("g", Prompt::Text("lark".into()), params, Some(&lora))?;
    for i in 0..4 {
        let l = (i % 2 == 1).then_some(&lora);
        together.add_request(
            &format!("f{i}"),
            Prompt::Text(format!("free {i}")),
            free_params(i),
            l,
        )?;
    }
    let got = run(&mut together)?;

    let mut num_checked = 0;
    let mut distinct = std::collections::HashSet::new();
    for i in 0..20 {
        let n = if i == 4 || i == 5 { 3 } else { 1 };
        for c in 0..n {
            let id = choice_request_id(&format!("c{i}"), c);
            let (tokens, reason) = got.get(&id).ok_or(format!("{id} did not finish"))?;
            let text = together.decode(tokens).ok_or("decodes")?;
            assert!(obeys(i, &text), "{id}: {text:?} breaks {:?}", constraint(i));
            assert_eq!(*reason, FinishReason::Stop, "{id}: {text:?}");
            distinct.insert(text);
            num_checked += 1;
        }
    }
    assert_eq!(num_checked, 24);
    let text = together.decode(&got["g"].0).ok_or("decodes")?;
    let is_lark_sentence = regex::Regex::new(r"^\([0-9]{1,3}\)$").is_ok_and(|r| r.is_match(&text));
    assert!(is_lark_sentence, "{text:?}");
    assert_eq!(got["g"].1, FinishReason::Stop);
    assert!(distinct.len() > 6, "sampling varied the outputs: {distinct:?}");

    // The free requests are untouched by their constrained neighbours.
    for i in 0..4 {
        let mut alone = engine(tmp.path())?;
        let l = (i % 2 == 1).then_some(&lora);
        alone.add_request("f", Prompt::Text(format!("free {i}")), free_params(i), l)?;
        let want = run(&mut alone)?;
        assert_eq!(got[&format!("f{i}")].0, want["f"].0, "free request {i}");
    }
    Ok(())
}

#[test]
fn a_bad_constraint_is_refused_naming_it() -> TestResult {
    let tmp = tempfile::tempdir()?;
    write_demo_model(&tmp.path().join("model"), 0)?;
    let mut engine = engine(tmp.path())?;
    let params = SamplingParams {
        constraint: Some(Constraint::Regex("[a-z".into())),
        ..Default::default()
    };
    let err = engine
        .add_request("r", Prompt::Text("x".into()), params, None)
        .err()
        .ok_or("a broken regex was accepted")?;
    assert!(err.to_string().contains("constraint"), "{err}");
    assert!(!engine.has_unfinished_requests());
    Ok(())
}
