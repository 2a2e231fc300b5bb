//! Tensor parallelism on shapes nobody tuned for: dummy-weight models whose hidden size is not a
//! multiple of 128, with GQA groups 1, 3 and 8 (8: one KV head, replicated on every rank), q/k/v
//! bias, and rank-8 to rank-64 adapters on all seven projections; every split of each model gives
//! the one-rank engine's greedy tokens and its logits within 1e-4 (f32), in one mixed batch.
//! (`golden.rs` checks the splits against transformers + PEFT on the golden fixtures.)

use std::collections::HashMap;
use std::path::Path;

use multilora_engine::demo::{synth_adapter, SynthSpec};
use multilora_engine::lora::LoraTarget;
use multilora_engine::{
    AdapterId, EngineConfig, LLMEngine, LoadFormat, LoraRequest, ModelConfig, Prompt, SamplingParams,
};

/// A model shape and the splits it is run with.
struct Shape {
    arch: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    splits: &'static [usize],
}

const MODELS: [Shape; 3] = [
    Shape {
        arch: "Qwen2ForCausalLM",
        heads: 12,
        kv_heads: 4,
        head_dim: 16,
        intermediate: 264,
        splits: &[2, 4],
    },
    Shape {
        arch: "LlamaForCausalLM",
        heads: 8,
        kv_heads: 1,
        head_dim: 24,
        intermediate: 344,
        splits: &[2, 4, 8],
    },
    Shape {
        arch: "LlamaForCausalLM",
        heads: 6,
        kv_heads: 6,
        head_dim: 20,
        intermediate: 180,
        splits: &[2, 3, 6],
    },
];

fn write_model(dir: &Path, s: &Shape) -> ModelConfig {
    let config = serde_json::json!({
        "architectures": [s.arch],
        "hidden_size": s.heads * s.head_dim,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": 2,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": 301,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
    });
    std::fs::create_dir_all(dir).expect("model folder");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config.json");
    ModelConfig::from_dir(dir).expect("config reads")
}

/// Greedy tokens and the logits of every step, by request.
type Run = HashMap<String, (Vec<u32>, Vec<Vec<f32>>)>;

fn run(model: &Path, loras: &[LoraRequest], tensor_parallel_size: usize) -> Run {
    let mut cfg = EngineConfig::new(model);
    cfg.load_format = LoadFormat::Dummy;
    cfg.dtype = "float32".into();
    cfg.tensor_parallel_size = tensor_parallel_size;
    cfg.enable_lora = true;
    cfg.max_loras = loras.len();
    cfg.max_lora_rank = 64;
    cfg.max_model_len = Some(96);
    cfg.return_logits = true;
    let mut engine = LLMEngine::new(cfg).expect("engine loads");
    for i in 0..6 {
        let prompt: Vec<u32> = (0..5 + 7 * i)
            .map(|j| ((31 * i + 17 * j + 3) % 301) as u32)
            .collect();
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(6)
        };
        let lora = (i < loras.len()).then(|| &loras[i]);
        engine
            .add_request(&i.to_string(), Prompt::TokenIds(prompt), params, lora)
            .expect("request added");
    }
    let mut out: Run = HashMap::new();
    while engine.has_unfinished_requests() {
        for o in engine.step().expect("step") {
            let logits = engine.last_logits(&o.request_id).expect("return_logits").to_vec();
            let entry = out.entry(o.request_id.to_string()).or_default();
            entry.1.push(logits);
            if o.is_finished() {
                entry.0 = o.output_token_ids;
            }
        }
    }
    out
}

#[test]
fn every_split_of_untuned_shapes_matches_one_rank() {
    let tmp = tempfile::tempdir().expect("temp folder");
    for (m, shape) in MODELS.iter().enumerate() {
        let model = tmp.path().join(format!("model-{m}"));
        let cfg = write_model(&model, shape);
        let loras: Vec<LoraRequest> = [8, 64, 16]
            .iter()
            .enumerate()
            .map(|(k, &rank)| {
                let dir = tmp.path().join(format!("lora-{m}-{k}"));
                let spec = SynthSpec {
                    rank,
                    lora_alpha: 2.0 * rank as f32,
                    targets: LoraTarget::ALL.to_vec(),
                    use_rslora: k == 2,
                    seed: 100 * m as u64 + k as u64,
                };
                synth_adapter(&dir, &cfg, "model", &spec).expect("adapter written");
                LoraRequest {
                    name: format!("lora-{k}"),
                    id: AdapterId(k as u32 + 1),
                    path: dir,
                }
            })
            .collect();
        let whole = run(&model, &loras, 1);
        for &tp in shape.splits {
            let got = run(&model, &loras, tp);
            for (id, (tokens, logits)) in &whole {
                let Shape {
                    arch,
                    heads,
                    kv_heads,
                    head_dim,
                    ..
                } = shape;
                let what = format!(
                    "{arch} heads {heads}/{kv_heads}, head size {head_dim}, tensor_parallel_size {tp}, request {id}"
                );
                let (got_tokens, got_logits) = &got[id];
                assert_eq!(got_tokens, tokens, "{what}: tokens");
                assert_eq!(got_logits.len(), logits.len(), "{what}: steps");
                for (step, (g, w)) in got_logits.iter().zip(logits).enumerate() {
                    let d = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                    assert!(d < 1e-4, "{what}, step {step}: logits differ by {d}");
                }
            }
        }
    }
}
