//! The golden fixtures (`scripts/make_golden.py`) as the engine tests read them: each test
//! binary uses part of this. `gpu` holds what the CUDA targets (`cuda_*.rs`) share.
#![allow(dead_code)]

pub mod gpu;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use multilora_engine::demo::{synth_adapter, SynthSpec};
use multilora_engine::lora::LoraTarget;
use multilora_engine::{
    AdapterId, EngineConfig, LLMEngine, LoraRequest, ModelConfig, Prompt, SamplingParams,
};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Golden {
    pub num_steps: usize,
    pub requests: Vec<GoldenRequest>,
}

#[derive(Deserialize, Clone)]
pub struct GoldenRequest {
    pub prompt_token_ids: Vec<u32>,
    pub lora: Option<String>,
    pub greedy_token_ids: Vec<u32>,
    pub first_logits: Vec<f32>,
    pub last_logits: Vec<f32>,
    /// Only in `llama_bf16` (`scripts/make_golden_bf16.py`): transformers run in bf16.
    #[serde(default)]
    pub bf16_greedy_token_ids: Vec<u32>,
    #[serde(default)]
    pub bf16_first_logits: Vec<f32>,
    #[serde(default)]
    pub bf16_last_logits: Vec<f32>,
    /// The largest |logit| difference between the bf16 and the f32 transformers runs, and the
    /// largest |logit| of the bf16 run.
    #[serde(default)]
    pub bf16_max_diff_to_f32: f32,
    #[serde(default)]
    pub bf16_max_abs_logit: f32,
}

/// A case's directory: from the build's source tree, or, for a test binary carried to the GPU
/// machine, `crates/engine` under the working directory.
pub fn case_dir(case: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if built.exists() {
        built.to_path_buf()
    } else {
        PathBuf::from("crates/engine")
    };
    root.join("tests/golden").join(case)
}

pub fn load(case: &str) -> Golden {
    read_json(&case_dir(case).join("golden.json"))
}

/// A fixture's JSON file, parsed; a test fails naming the file if it cannot be.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The cases of shapes nobody tuned for, each with a prompt of over 2,000 tokens: GQA ratio 1
/// (Llama, head size 24 apart from hidden size 80), 4 (Qwen2 with q/k/v bias, ranks 64 on
/// q,k,v,o and 16 on all seven), 7 (Qwen2, head size 8, rsLoRA rank 32) and 8 (Qwen3 with q/k
/// norm, hidden size 72, rank 64 on all seven).
pub const GQA_CASES: [&str; 4] = ["gqa1_long", "gqa4_bias", "gqa7_long", "gqa8_qknorm"];

/// A golden case's engine (CPU unless changed): LoRA on with 4 slots, `max_lora_rank` 16 or the
/// case's largest adapter rank, `max_model_len` the model's `max_position_embeddings` (256; 4096
/// in the long-prompt `gqa*` cases).
pub fn case_config(case: &str) -> EngineConfig {
    let dir = case_dir(case);
    let model: serde_json::Value = read_json(&dir.join("model/config.json"));
    let max_model_len = model["max_position_embeddings"]
        .as_u64()
        .expect("the case's config.json has max_position_embeddings");
    let largest_rank = lora_requests(case)
        .values()
        .map(|r| {
            let c: serde_json::Value = read_json(&r.path.join("adapter_config.json"));
            let pattern = c["rank_pattern"].as_object().into_iter().flat_map(|m| m.values());
            std::iter::once(&c["r"])
                .chain(pattern)
                .map(|v| v.as_u64().expect("an adapter rank is an integer"))
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let mut cfg = EngineConfig::new(dir.join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_lora_rank = (largest_rank as usize).max(16);
    cfg.max_model_len = Some(max_model_len as usize);
    cfg
}

/// Adapter names of a case, with stable ids 1.. in sorted name order (none for a case without
/// an adapters folder).
pub fn lora_requests(case: &str) -> HashMap<String, LoraRequest> {
    let dir = case_dir(case).join("adapters");
    if !dir.exists() {
        return HashMap::new();
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            let req = LoraRequest {
                name: n.clone(),
                id: AdapterId(i as u32 + 1),
                path: dir.join(&n),
            };
            (n, req)
        })
        .collect()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "comparing rows of different lengths (an empty one was never filled?)"
    );
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Adds golden requests `which` to `engine` (request id = index), greedy for the case's steps.
pub fn add_requests(
    engine: &mut LLMEngine,
    golden: &Golden,
    loras: &HashMap<String, LoraRequest>,
    which: &[usize],
) {
    for &i in which {
        let r = &golden.requests[i];
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(golden.num_steps)
        };
        let lora = r.lora.as_ref().map(|name| {
            loras.get(name).unwrap_or_else(|| {
                panic!("request {i} names adapter {name:?}, which the case's adapters folder lacks")
            })
        });
        engine
            .add_request(
                &i.to_string(),
                Prompt::TokenIds(r.prompt_token_ids.clone()),
                params,
                lora,
            )
            .unwrap();
    }
}

/// `num_adapters` synthesized adapters for the golden llama model, of mixed ranks (2 to 16)
/// and targets, in `dir`.
pub fn synth_adapters(dir: &Path, num_adapters: usize) -> Vec<LoraRequest> {
    let model = ModelConfig::from_dir(&case_dir("llama").join("model")).unwrap();
    let target_sets = [
        vec![LoraTarget::QProj, LoraTarget::VProj],
        LoraTarget::ALL.to_vec(),
        vec![LoraTarget::OProj, LoraTarget::DownProj],
    ];
    (0..num_adapters)
        .map(|i| {
            let path = dir.join(format!("lora-{i}"));
            let spec = SynthSpec {
                rank: [2, 4, 8, 16][i % 4],
                lora_alpha: 16.0,
                targets: target_sets[i % 3].clone(),
                use_rslora: i % 5 == 0,
                seed: i as u64,
            };
            synth_adapter(&path, &model, "golden-llama", &spec).unwrap();
            LoraRequest {
                name: format!("lora-{i}"),
                id: AdapterId(i as u32 + 1),
                path,
            }
        })
        .collect()
}
