//! Runs the requests of `scripts/gpu_check_peft.py` as one mixed-adapter batch on CUDA, greedy,
//! and writes each request's output tokens as JSON.
//!
//! usage: peft_check REQUESTS.json OUT.json

use multilora_engine::{AdapterId, Device, EngineConfig, LLMEngine, LoraRequest, Prompt, SamplingParams};
use serde_json::Value;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&args[1]).expect("requests")).unwrap();
    let mut cfg = EngineConfig::new(spec["model"].as_str().unwrap());
    cfg.device = Device::Cuda;
    cfg.enable_lora = true;
    cfg.max_loras = 4;
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(256);
    cfg.max_num_seqs = 16;
    let mut engine = LLMEngine::new(cfg).expect("engine");
    let reqs = spec["requests"].as_array().unwrap();
    let mut paths: Vec<String> = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let lora = r["adapter"].as_str().map(|p| {
            let k = paths.iter().position(|x| x == p).unwrap_or_else(|| {
                paths.push(p.to_string());
                paths.len() - 1
            });
            LoraRequest {
                name: format!("adapter-{k}"),
                id: AdapterId(k as u32 + 1),
                path: p.into(),
            }
        });
        let ids: Vec<u32> = r["prompt_token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let n = r["max_tokens"].as_u64().unwrap() as usize;
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(n)
        };
        engine
            .add_request(&i.to_string(), Prompt::TokenIds(ids), params, lora.as_ref())
            .expect("add request");
    }
    let mut out = vec![Vec::new(); reqs.len()];
    while engine.has_unfinished_requests() {
        for o in engine.step().expect("step") {
            if o.is_finished() {
                out[o.request_id.parse::<usize>().unwrap()] = o.output_token_ids;
            }
        }
    }
    std::fs::write(&args[2], serde_json::to_string(&out).unwrap()).unwrap();
    println!("peft_check: {} requests on {}", reqs.len(), engine.device_name());
}
