//! Engine flags shared by the commands, spelled as vLLM spells them.

use std::path::PathBuf;

use anyhow::bail;
use multilora_engine::{Device, EngineConfig, LoadFormat};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct EngineArgs {
    /// Most distinct adapters in one batch.
    #[arg(long)]
    pub max_loras: Option<usize>,
    /// Largest adapter rank accepted.
    #[arg(long)]
    pub max_lora_rank: Option<usize>,
    /// Host adapter cache capacity (>= max-loras).
    #[arg(long)]
    pub max_cpu_loras: Option<usize>,
    /// Projections adapters may target (vLLM's lora_target_modules): q_proj, k_proj, v_proj,
    /// o_proj, gate_proj, up_proj, down_proj, or the packed qkv_proj / gate_up_proj; comma- or
    /// space-separated. Default: all. An adapter targeting another fails to load.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<String>>,
    /// Steps a waiting request may be passed over (its adapter loading, or max-loras taken)
    /// while later requests are admitted; then nothing later is admitted before it (default 64).
    #[arg(long)]
    pub max_times_passed_over: Option<u32>,
    /// Most sequences in one batch.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Longest prompt plus output, in tokens (default: the model's).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Tokens per step (at least max-num-seqs); below max-model-len, long prompts are
    /// prefilled in chunks over several steps, beside the running decodes.
    #[arg(long)]
    pub max_num_batched_tokens: Option<usize>,
    /// Most prompt tokens one request computes in a step (0: no bound but
    /// max-num-batched-tokens); a long prompt then arrives without stretching the running
    /// requests' inter-token latency.
    #[arg(long)]
    pub long_prefill_token_threshold: Option<usize>,
    /// auto, float32, float16, bfloat16
    #[arg(long)]
    pub dtype: Option<String>,
    /// Ranks the model is split over, Megatron-style (heads and intermediate size must
    /// divide). On the CPU the ranks run one after another in this process: the split's
    /// arithmetic, not a speed-up. The CUDA backend runs on one GPU.
    #[arg(long)]
    pub tensor_parallel_size: Option<usize>,
    /// cpu or cuda
    #[arg(long)]
    pub device: Option<String>,
    /// Share of the GPU's memory this process may take (weights, adapter slots, buffers); the
    /// KV cache gets what is left of it (config: gpu_memory_utilization; default 0.9).
    #[arg(long)]
    pub gpu_memory_utilization: Option<f32>,
    /// No CUDA graphs: every step launched kernel by kernel (config: enforce_eager).
    #[arg(long)]
    pub enforce_eager: bool,
    /// auto (safetensors) or dummy (random weights from config.json)
    #[arg(long)]
    pub load_format: Option<String>,
    /// Seed of the sampler (and, in the benchmark, of the workloads' draws).
    #[arg(long)]
    pub seed: Option<u64>,
}

pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    Ok(match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda,
        other => bail!("device {other:?} is not one of cpu, cuda"),
    })
}

pub fn parse_load_format(s: &str) -> anyhow::Result<LoadFormat> {
    Ok(match s {
        "auto" | "safetensors" => LoadFormat::Auto,
        "dummy" => LoadFormat::Dummy,
        other => bail!("load_format {other:?} is not one of auto, safetensors, dummy"),
    })
}

impl EngineArgs {
    /// Applies the flags that were given on top of `cfg`.
    pub fn apply(&self, cfg: &mut EngineConfig) -> anyhow::Result<()> {
        if let Some(v) = self.max_loras {
            cfg.max_loras = v;
        }
        if let Some(v) = self.max_lora_rank {
            cfg.max_lora_rank = v;
        }
        if let Some(v) = self.max_cpu_loras {
            cfg.max_cpu_loras = Some(v);
        }
        if let Some(v) = &self.lora_target_modules {
            cfg.lora_target_modules = Some(v.clone());
        }
        if let Some(v) = self.max_times_passed_over {
            cfg.max_times_passed_over = v;
        }
        if let Some(v) = self.max_num_seqs {
            cfg.max_num_seqs = v;
        }
        if let Some(v) = self.max_model_len {
            cfg.max_model_len = Some(v);
        }
        if let Some(v) = self.max_num_batched_tokens {
            cfg.max_num_batched_tokens = Some(v);
        }
        if let Some(v) = self.long_prefill_token_threshold {
            cfg.long_prefill_token_threshold = v;
        }
        if let Some(v) = &self.dtype {
            cfg.dtype = v.clone();
        }
        if let Some(v) = self.tensor_parallel_size {
            cfg.tensor_parallel_size = v;
        }
        if let Some(v) = &self.device {
            cfg.device = parse_device(v)?;
        }
        if let Some(v) = self.gpu_memory_utilization {
            cfg.gpu_memory_utilization = v;
        }
        if self.enforce_eager {
            cfg.enforce_eager = true;
        }
        if let Some(v) = &self.load_format {
            cfg.load_format = parse_load_format(v)?;
        }
        if let Some(v) = self.seed {
            cfg.seed = v;
        }
        // The CUDA backend's comparison switches (README, GPU).
        Ok(cfg.cuda.apply_vars(|k| std::env::var(k).ok())?)
    }

    pub fn config(&self, model: PathBuf) -> anyhow::Result<EngineConfig> {
        let mut cfg = EngineConfig::new(model);
        self.apply(&mut cfg)?;
        Ok(cfg)
    }
}
