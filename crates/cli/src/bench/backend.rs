//! What the benchmark needs from something that runs requests: count a prompt's tokens, run one
//! batch to completion and hand back plain [`BatchRun`] records. [`EngineBackend`] drives the
//! in-process engine the way the original drives vLLM's `LLMEngine`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use multilora_engine::{AdapterId, EngineConfig, LLMEngine, LoraRequest, Prompt, SamplingParams};
use serde_json::json;

use super::plan::PlannedPoint;
use super::records::{BatchRun, RequestRecord, StepRecord};

/// An adapter as the original names it: `lora-{i+1}`, int id `i+1`, its folder.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchLora {
    pub name: String,
    pub int_id: u32,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct BenchRequest {
    pub request_id: String,
    pub prompt: String,
    pub lora: Option<BenchLora>,
}

pub trait Backend {
    fn num_prompt_tokens(&mut self, prompt: &str) -> anyhow::Result<usize>;
    fn max_model_len(&self) -> usize;
    /// Adds every request before the first step, runs until all are done, each producing
    /// exactly `num_tokens` tokens (EOS ignored).
    fn run_batch(&mut self, requests: &[BenchRequest], num_tokens: usize) -> anyhow::Result<BatchRun>;
    /// Device, model and settings, for `run.json`.
    fn describe(&self) -> serde_json::Value;
    /// Gets ready for every point of the run before the first is measured (a server loads the
    /// adapters it lacks), so a broken input fails before any measurement.
    fn prepare(&mut self, _points: &[PlannedPoint]) -> anyhow::Result<()> {
        Ok(())
    }
}

pub struct EngineBackend {
    engine: LLMEngine,
    /// Whether step times came from device events (else host wall time).
    has_device_time: bool,
    /// Token ids of each prompt seen, so prompts are tokenized once.
    encoded: HashMap<String, Vec<u32>>,
}

/// Steps in a row that schedule nothing before the engine is declared stuck.
const MAX_IDLE_STEPS: usize = 1000;

impl EngineBackend {
    pub fn open(cfg: &EngineConfig) -> anyhow::Result<Self> {
        let engine =
            LLMEngine::new(cfg.clone()).with_context(|| format!("loading model {}", cfg.model.display()))?;
        // The structured outputs' token table builds on a thread of its own (about half a second
        // for a 128k vocabulary): measuring starts after it, not beside it. Whether there is one
        // does not matter here.
        let _ = engine.grammars().available();
        if engine.tokenizer().is_none() {
            // Once per process, not per engine.
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| {
                eprintln!(
                    "note: {} has no tokenizer.json: prompts are encoded as Llama byte tokens (BOS, then id 3 + byte)",
                    cfg.model.display()
                )
            });
        }
        Ok(EngineBackend {
            engine,
            has_device_time: false,
            encoded: HashMap::new(),
        })
    }

    fn encode(&mut self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        if let Some(ids) = self.encoded.get(prompt) {
            return Ok(ids.clone());
        }
        let ids = if self.engine.tokenizer().is_some() {
            self.engine.encode(prompt)?
        } else {
            byte_tokens(prompt, self.engine.model_config())?
        };
        self.encoded.insert(prompt.to_string(), ids.clone());
        Ok(ids)
    }
}

/// Llama's SentencePiece byte-fallback ids (`<0x00>` is id 3), after BOS: a tokenizer-free
/// encoding for `config.json`-only models (`load_format: dummy`).
fn byte_tokens(prompt: &str, cfg: &multilora_engine::ModelConfig) -> anyhow::Result<Vec<u32>> {
    if cfg.vocab_size < 259 {
        bail!(
            "the model has no tokenizer.json and a vocabulary of {} (< 259) too small for byte tokens",
            cfg.vocab_size
        );
    }
    let bos = cfg.bos_token_id.unwrap_or(1);
    Ok(std::iter::once(bos)
        .chain(prompt.bytes().map(|b| 3 + b as u32))
        .collect())
}

impl Backend for EngineBackend {
    fn num_prompt_tokens(&mut self, prompt: &str) -> anyhow::Result<usize> {
        Ok(self.encode(prompt)?.len())
    }

    fn max_model_len(&self) -> usize {
        self.engine.resolved().max_model_len
    }

    fn run_batch(&mut self, requests: &[BenchRequest], num_tokens: usize) -> anyhow::Result<BatchRun> {
        let params = SamplingParams {
            temperature: 0.0,
            min_tokens: num_tokens,
            max_tokens: num_tokens,
            ignore_eos: true,
            ..Default::default()
        };
        let mut loras = Vec::with_capacity(requests.len());
        for r in requests {
            let ids = self.encode(&r.prompt)?;
            let lora = r.lora.as_ref().map(|l| LoraRequest {
                name: l.name.clone(),
                id: AdapterId(l.int_id),
                path: l.path.clone(),
            });
            self.engine
                .add_request(
                    &r.request_id,
                    Prompt::TokenIds(ids),
                    params.clone(),
                    lora.as_ref(),
                )
                .with_context(|| match &r.lora {
                    Some(l) => format!("adding request {} (adapter {})", r.request_id, l.path.display()),
                    None => format!("adding request {}", r.request_id),
                })?;
            loras.push(r.lora.as_ref().map(|l| l.name.clone()));
        }
        let index: HashMap<&str, usize> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.request_id.as_str(), i))
            .collect();
        let mut run = BatchRun::default();
        let mut finished = vec![None; requests.len()];
        let (mut first_start, mut last_end) = (None, Instant::now());
        let mut num_idle = 0;
        while self.engine.has_unfinished_requests() {
            let start = Instant::now();
            let outputs = self.engine.step()?;
            let end = Instant::now();
            let stats = self.engine.last_step_stats();
            if stats.num_seqs == 0 {
                num_idle += 1;
                if num_idle >= MAX_IDLE_STEPS {
                    bail!("the engine scheduled nothing for {MAX_IDLE_STEPS} steps with requests waiting");
                }
                continue;
            }
            num_idle = 0;
            first_start.get_or_insert(start);
            last_end = end;
            // Device events where the backend has them (as the original's), else the CPU
            // step's wall time of forward and sampling.
            self.has_device_time |= stats.device_time.is_some();
            run.steps.push(StepRecord {
                latency_ms: stats.device_time.unwrap_or(stats.duration).as_secs_f64() * 1e3,
                wall_ms: (end - start).as_secs_f64() * 1e3,
                num_seqs: stats.num_seqs,
                num_prefill_tokens: stats.num_prefill_tokens,
                num_chunked_prefill_tokens: stats.num_chunked_prefill_tokens,
                num_decode_tokens: stats.num_decode_tokens,
                num_loras: stats.num_loras,
                num_preempted: stats.num_preempted,
            });
            for out in outputs.into_iter().filter(|o| o.is_finished()) {
                let Some(&i) = index.get(&*out.request_id) else {
                    continue;
                };
                let m = out.metrics;
                let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
                    (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
                    _ => f64::NAN,
                };
                finished[i] = Some(RequestRecord {
                    request_id: out.request_id.to_string(),
                    lora: loras[i].clone(),
                    prompt_num_tokens: out.num_prompt_tokens,
                    output_num_tokens: out.output_token_ids.len(),
                    finish_reason: out.finish_reason.map_or("", |f| f.as_str()).to_string(),
                    first_token_time_s: secs(m.first_scheduled_time, m.first_token_time),
                    completion_time_s: secs(m.first_token_time, m.last_token_time),
                    inter_token_latencies_s: Vec::new(),
                });
            }
        }
        run.e2e_ms = first_start.map_or(0.0, |s| (last_end - s).as_secs_f64() * 1e3);
        run.requests = finished.into_iter().flatten().collect();
        Ok(run)
    }

    fn describe(&self) -> serde_json::Value {
        let m = self.engine.model_config();
        let r = self.engine.resolved();
        json!({
            "backend": "engine",
            "device": self.engine.device_name(),
            "step_timing": if self.has_device_time {
                "device events around the forward"
            } else {
                "host wall time of forward and sampling"
            },
            "model": {
                "architecture": m.architecture.hf_name(),
                "hidden_size": m.hidden_size,
                "intermediate_size": m.intermediate_size,
                "num_hidden_layers": m.num_hidden_layers,
                "num_attention_heads": m.num_attention_heads,
                "num_key_value_heads": m.num_key_value_heads,
                "head_dim": m.head_dim,
                "vocab_size": m.vocab_size,
                "max_position_embeddings": m.max_position_embeddings,
                "num_params": m.num_params(),
                "torch_dtype": m.torch_dtype,
                "has_tokenizer": self.engine.tokenizer().is_some(),
            },
            "resolved": {
                "max_model_len": r.max_model_len,
                "max_num_batched_tokens": r.max_num_batched_tokens,
                "long_prefill_token_threshold": r.long_prefill_token_threshold,
                "num_kv_blocks": r.num_kv_blocks,
                "block_size": r.block_size,
                "dtype": r.dtype,
                "lora": r.lora.map(|l| json!({
                    "max_loras": l.max_loras,
                    "max_lora_rank": l.max_lora_rank,
                    "max_cpu_loras": l.max_cpu_loras,
                    "target_modules": l.target_modules.to_string(),
                })),
            },
            "lora_stats": self.engine.lora_stats().map(|s| json!({
                "cache_hits": s.cache_hits,
                "cache_misses": s.cache_misses,
                "cache_evictions": s.cache_evictions,
                "slot_loads": s.slot_loads,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_follow_llamas_byte_fallback() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cfg = multilora_engine::demo::demo_config_json();
        cfg["bos_token_id"] = 1.into();
        std::fs::write(dir.path().join("config.json"), cfg.to_string())?;
        let m = multilora_engine::ModelConfig::from_dir(dir.path())?;
        assert_eq!(byte_tokens("A\n", &m)?, vec![1, 3 + 65, 3 + 10]);
        Ok(())
    }
}
