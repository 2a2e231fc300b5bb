//! A Hugging Face `config.json` for the Llama family, parsed once into a validated
//! [`ModelConfig`]. Accepts both the older top-level `rope_theta`/`rope_scaling` keys that most
//! Hub checkpoints carry and the `rope_parameters` object that transformers 5 writes.

use std::path::Path;

use serde::Deserialize;

use crate::error::{read_json, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "LlamaForCausalLM" => Architecture::Llama,
            "MistralForCausalLM" => Architecture::Mistral,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "Qwen3ForCausalLM" => Architecture::Qwen3,
            _ => return None,
        })
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// RoPE frequency scaling, as HF names the `rope_type`s we implement.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Linear {
        factor: f32,
    },
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (always for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama's `attention_bias` applies to it too).
    pub o_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// `torch_dtype` / `dtype` as written in config.json, if any.
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    /// From generation_config.json when present, else config.json.
    pub eos_token_ids: Vec<u32>,
}

/// One id or a list of ids, as HF writes `eos_token_id`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![id],
            TokenIds::Many(ids) => ids,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f32>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f32>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
    hidden_act: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawGenerationConfig {
    eos_token_id: Option<TokenIds>,
}

impl ModelConfig {
    /// Reads `config.json` (and `generation_config.json` if present) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw: RawConfig = read_json(&path)?;
        let mut cfg = Self::from_raw(raw, &path)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen: RawGenerationConfig = read_json(&gen_path)?;
            if let Some(ids) = gen.eos_token_id {
                cfg.eos_token_ids = ids.into_vec();
            }
        }
        Ok(cfg)
    }

    /// Parses the text of a `config.json` (`path` names it in errors).
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let raw = serde_json::from_str(json).map_err(|e| Error::model(path, e.to_string()))?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self> {
        let arch_name = raw
            .architectures
            .first()
            .ok_or_else(|| Error::model(path, "field `architectures` is missing or empty"))?;
        let architecture =
            Architecture::from_hf(arch_name).ok_or_else(|| Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.clone(),
            })?;
        let need = |v: Option<usize>, field: &str| {
            v.filter(|&x| x > 0).ok_or_else(|| {
                Error::model(
                    path,
                    format!("field `{field}` is missing or not a positive integer"),
                )
            })
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::model(
                path,
                format!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(Error::model(
                    path,
                    "hidden_size is not divisible by num_attention_heads and `head_dim` is not given",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::model(
                path,
                format!("head_dim {head_dim} must be even for RoPE"),
            ));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(Error::model(
                    path,
                    format!("hidden_act {act:?} is not supported (expected \"silu\")"),
                ));
            }
        }
        if architecture == Architecture::Qwen2 && raw.use_sliding_window == Some(true) {
            return Err(Error::model(path, "use_sliding_window=true is not supported"));
        }
        if architecture == Architecture::Mistral {
            if let Some(w) = raw.sliding_window.as_ref().and_then(|v| v.as_u64()) {
                tracing::warn!(
                    sliding_window = w,
                    "sliding window attention is not implemented; attention spans the full context"
                );
            }
        }

        // transformers 5 moves rope_theta and the scaling fields into `rope_parameters`.
        let rope = raw.rope_parameters.or(raw.rope_scaling);
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => None,
            Some(r) => parse_rope_scaling(r, path)?,
        };

        let qkv_bias = match architecture {
            Architecture::Qwen2 => true,
            _ => raw.attention_bias.unwrap_or(false),
        };
        let o_bias = matches!(architecture, Architecture::Llama) && raw.attention_bias.unwrap_or(false);

        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            qk_norm: architecture == Architecture::Qwen3,
            torch_dtype: raw.dtype.or(raw.torch_dtype),
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        })
    }

    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of parameters, for reports and bandwidth floors.
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let per_layer = h * (self.q_size() + 2 * self.kv_size())
            + self.q_size() * h
            + 3 * h * self.intermediate_size
            + 2 * h;
        let embed = self.vocab_size * h;
        let lm_head = if self.tie_word_embeddings { 0 } else { embed };
        embed + lm_head + h + self.num_hidden_layers * per_layer
    }
}

fn parse_rope_scaling(r: RawRope, path: &Path) -> Result<Option<RopeScaling>> {
    let kind = r.rope_type.or(r.legacy_type).unwrap_or_else(|| "default".into());
    let factor = || {
        r.factor
            .ok_or_else(|| Error::model(path, format!("rope scaling {kind:?} needs `factor`")))
    };
    Ok(match kind.as_str() {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: r.low_freq_factor.unwrap_or(1.0),
            high_freq_factor: r.high_freq_factor.unwrap_or(4.0),
            original_max_position_embeddings: r.original_max_position_embeddings.unwrap_or(8192.0),
        }),
        other => {
            return Err(Error::model(
                path,
                format!("rope scaling type {other:?} is not supported (supported: default, linear, llama3)"),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_raw(serde_json::from_str(json).unwrap(), Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn reads_rope_from_either_place() -> Result<()> {
        let old = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))?;
        let new = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_parameters": {{"rope_theta": 500000.0,
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))?;
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(old.rope_scaling, new.rope_scaling);
        assert!(matches!(old.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(old.head_dim, 16);
        Ok(())
    }

    #[test]
    fn rejects_unknown_architecture_and_missing_fields() {
        let err = parse(&format!(r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#)).unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
        let err =
            parse(r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4}"#)
                .unwrap_err();
        assert!(err.to_string().contains("intermediate_size"), "{err}");
        let err = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn qwen_variants_set_bias_and_norm() -> Result<()> {
        let q2 = parse(&format!(r#"{{"architectures": ["Qwen2ForCausalLM"], {BASE}}}"#))?;
        assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm);
        let q3 = parse(&format!(
            r#"{{"architectures": ["Qwen3ForCausalLM"], {BASE}, "head_dim": 32}}"#
        ))?;
        assert!(!q3.qkv_bias && q3.qk_norm);
        assert_eq!(q3.head_dim, 32);
        Ok(())
    }
}
