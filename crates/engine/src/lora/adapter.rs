//! PEFT LoRA adapters as saved by `PeftModel.save_pretrained`: `adapter_config.json` plus
//! `adapter_model.safetensors`. The tensors are the truth for which modules are targeted and at
//! what rank (that is what `target_modules`, `rank_pattern` and `layers_to_transform` produced);
//! the config gives alphas and the scaling rule. Everything is validated against the base model
//! at load, so a bad adapter fails its own request and nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use super::{LoraTarget, LoraTargets};

use crate::error::{Error, Result};
use crate::weights::SafetensorsFiles;
use crate::ModelConfig;

/// The projections `modules` (`[layers * 7]`) hold in some layer.
fn targets_of(modules: &[Option<LoraModule>]) -> LoraTargets {
    (modules.iter().enumerate())
        .filter(|(_, m)| m.is_some())
        .fold(LoraTargets::NONE, |set, (i, _)| {
            set.with(LoraTarget::ALL[i % LoraTarget::ALL.len()])
        })
}

/// One targeted projection of one layer.
#[derive(Debug, Clone)]
pub struct LoraModule {
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
    /// `[rank, in_features]`
    pub a: Vec<f32>,
    /// `[out_features, rank]`
    pub b: Vec<f32>,
}

#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    pub path: PathBuf,
    /// Largest rank over all modules.
    pub rank: usize,
    num_layers: usize,
    /// `[num_layers * 7]`, indexed by `layer * 7 + target`.
    modules: Vec<Option<LoraModule>>,
    /// The projections it targets in some layer (kept when the host weights are dropped).
    targets: LoraTargets,
    /// The backend's form of it, where the backend has one (see `AdapterPreparer`).
    pub prepared: Option<crate::backend::PreparedAdapter>,
}

#[derive(Debug, Deserialize)]
struct AdapterConfig {
    peft_type: Option<String>,
    /// The ranks come from the tensors' shapes (which `rank_pattern` shaped); `r` must be present.
    r: Option<usize>,
    lora_alpha: Option<f32>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    alpha_pattern: HashMap<String, f32>,
    target_modules: Option<serde_json::Value>,
    modules_to_save: Option<Vec<String>>,
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
}

/// PEFT's rule for `rank_pattern`/`alpha_pattern` keys: the key matches a module whose full
/// name ends in `.key` (the key may itself be a regex).
fn pattern_matches(key: &str, module_name: &str) -> bool {
    match Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")) {
        Ok(re) => re.is_match(module_name),
        Err(_) => module_name == key || module_name.ends_with(&format!(".{key}")),
    }
}

/// serde's messages quote the values they reject, and an adapter path may name any file the
/// server can read: keep the position and the expected type, drop what the file says.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for (i, part) in msg.split('"').enumerate() {
        match i % 2 {
            0 => out.push_str(part),
            _ => out.push_str("\"…\""),
        }
    }
    out
}

impl LoraAdapter {
    pub fn load(name: &str, dir: &Path, cfg: &ModelConfig, max_lora_rank: usize) -> Result<Self> {
        let err = |msg: String| Error::AdapterLoad {
            name: name.to_string(),
            path: dir.to_path_buf(),
            msg,
        };
        if !dir.is_dir() {
            return Err(err("adapter directory does not exist".into()));
        }
        let config_path = dir.join("adapter_config.json");
        if !config_path.exists() {
            return Err(err("adapter_config.json is missing".into()));
        }
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| err(format!("adapter_config.json: {e}")))?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "adapter_config.json: invalid JSON: {}",
                redact_quoted(&e.to_string())
            ))
        })?;
        if let Some(t) = &config.peft_type {
            if t != "LORA" {
                return Err(err(format!(
                    "adapter_config.json: peft_type {t:?} is not supported (expected \"LORA\")"
                )));
            }
        }
        config
            .r
            .ok_or_else(|| err("adapter_config.json: field `r` is missing".into()))?;
        if config.use_dora {
            return Err(err(
                "adapter_config.json: use_dora=true (DoRA) is not supported".into()
            ));
        }
        if config.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(err(format!(
                "adapter_config.json: modules_to_save {:?} is not supported (only LoRA weights can be served)",
                config.modules_to_save.unwrap_or_default()
            )));
        }
        if config.bias.as_deref().is_some_and(|b| b != "none") {
            return Err(err(format!(
                "adapter_config.json: bias {:?} is not supported (expected \"none\")",
                config.bias.unwrap_or_default()
            )));
        }
        if config.fan_in_fan_out {
            return Err(err(
                "adapter_config.json: fan_in_fan_out=true is not supported".into()
            ));
        }
        let targets_text = config
            .target_modules
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_default();
        for bad in ["embed_tokens", "lm_head"] {
            if targets_text.contains(bad) {
                return Err(err(format!(
                    "adapter_config.json: target_modules includes {bad}; LoRA on embeddings or lm_head is not supported"
                )));
            }
        }

        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            return Err(err(if dir.join("adapter_model.bin").exists() {
                "only adapter_model.bin found; multilora reads adapter_model.safetensors (re-save with safe_serialization=True)".into()
            } else {
                "adapter_model.safetensors is missing".into()
            }));
        }
        let files = SafetensorsFiles::open(std::slice::from_ref(&weights_path))
            .map_err(|e| err(redact_quoted(&e.to_string())))?;

        let lora_alpha = config.lora_alpha.unwrap_or(8.0);
        let num_layers = cfg.num_hidden_layers;
        let mut modules: Vec<Option<LoraModule>> = vec![None; num_layers * LoraTarget::ALL.len()];
        // Compiled once per process: compiling it took longer than reading a small adapter.
        static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(
                r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_A(?:\.[\w-]+)?\.weight$",
            )
            .expect("static regex")
        });
        let name_re = &*NAME_RE;
        let mut names: Vec<&str> = files.names().collect();
        names.sort_unstable();
        for tensor in &names {
            if tensor.contains("lora_B") {
                continue; // read together with its lora_A
            }
            if tensor.contains("embed_tokens")
                || tensor.contains("lm_head")
                || tensor.contains("lora_embedding")
            {
                return Err(err(format!(
                    "tensor {tensor:?}: LoRA on embeddings or lm_head is not supported"
                )));
            }
            if tensor.contains("lora_magnitude_vector") {
                return Err(err(format!("tensor {tensor:?}: DoRA is not supported")));
            }
            let caps = name_re.captures(tensor).ok_or_else(|| {
                err(format!(
                    "tensor {tensor:?} is not a LoRA weight of a decoder layer projection"
                ))
            })?;
            let layer: usize = caps[1]
                .parse()
                .map_err(|_| err(format!("tensor {tensor:?}: bad layer index")))?;
            let target = LoraTarget::from_name(&caps[3])
                .filter(|t| t.parent() == &caps[2])
                .ok_or_else(|| err(format!("tensor {tensor:?}: unknown projection {:?}", &caps[3])))?;
            if layer >= num_layers {
                return Err(err(format!(
                    "tensor {tensor:?}: layer {layer} does not exist (the base model has {num_layers} layers)"
                )));
            }
            let b_name = tensor.replace("lora_A", "lora_B");
            let a_shape = files.shape(tensor).map_err(|e| err(e.to_string()))?;
            let b_shape = files
                .shape(&b_name)
                .map_err(|_| err(format!("tensor {b_name:?} is missing")))?;
            let (in_f, out_f) = target.shape(cfg);
            let rank = a_shape.first().copied().unwrap_or(0);
            if a_shape.len() != 2 || a_shape[1] != in_f || b_shape != [out_f, rank] || rank == 0 {
                return Err(err(format!(
                    "{}.{}: lora_A {a_shape:?} / lora_B {b_shape:?} do not fit the base model (expected [r, {in_f}] and [{out_f}, r])",
                    layer, target.name()
                )));
            }
            if rank > max_lora_rank {
                return Err(Error::AdapterRankTooLarge {
                    name: name.to_string(),
                    path: dir.to_path_buf(),
                    rank,
                    max_lora_rank,
                });
            }
            let module_name = format!("model.layers.{layer}.{}.{}", target.parent(), target.name());
            let alpha = config
                .alpha_pattern
                .iter()
                .find(|(k, _)| pattern_matches(k, &module_name))
                .map_or(lora_alpha, |(_, &v)| v);
            let scale = if config.use_rslora {
                alpha / (rank as f32).sqrt()
            } else {
                alpha / rank as f32
            };
            let a = files.f32(tensor, &[rank, in_f]).map_err(|e| err(e.to_string()))?;
            let b = files
                .f32(&b_name, &[out_f, rank])
                .map_err(|e| err(e.to_string()))?;
            // A NaN or Inf weight would turn every logit of the adapter's requests into NaN:
            // refuse it here rather than serve empty text.
            for (t, w) in [(*tensor, &a), (b_name.as_str(), &b)] {
                // Whole chunks first (a branch-free pass the compiler vectorizes), the position
                // only for the message.
                let all_finite = w
                    .chunks(256)
                    .all(|c| c.iter().fold(true, |ok, x| ok & x.is_finite()));
                if !all_finite {
                    let i = w.iter().position(|x| !x.is_finite()).unwrap_or_default();
                    return Err(err(format!(
                        "tensor {t:?} holds a non-finite value (NaN or Inf) at element {i}"
                    )));
                }
            }
            modules[layer * LoraTarget::ALL.len() + target.index()] = Some(LoraModule { rank, scale, a, b });
        }
        if let Some(orphan) = names
            .iter()
            .find(|n| n.contains("lora_B") && !files.contains(&n.replace("lora_B", "lora_A")))
        {
            return Err(err(format!("tensor {orphan:?} has no matching lora_A")));
        }
        let rank = modules.iter().flatten().map(|m| m.rank).max().unwrap_or(0);
        if rank == 0 {
            return Err(err("adapter_model.safetensors holds no LoRA weights".into()));
        }
        Ok(LoraAdapter {
            name: name.to_string(),
            path: dir.to_path_buf(),
            rank,
            num_layers,
            targets: targets_of(&modules),
            modules,
            prepared: None,
        })
    }

    /// An adapter from modules made elsewhere (tests, synthesis): `modules` is
    /// `[num_layers * 7]`, indexed by `layer * 7 + target`.
    pub fn from_modules(name: &str, num_layers: usize, modules: Vec<Option<LoraModule>>) -> Self {
        assert_eq!(modules.len(), num_layers * LoraTarget::ALL.len());
        LoraAdapter {
            name: name.to_string(),
            path: PathBuf::new(),
            rank: modules.iter().flatten().map(|m| m.rank).max().unwrap_or(0),
            num_layers,
            targets: targets_of(&modules),
            modules,
            prepared: None,
        }
    }

    /// Frees the f32 weights, keeping the rest (the backend reads its prepared form instead).
    pub fn drop_host_weights(&mut self) {
        self.modules = Vec::new();
    }

    /// False after [`Self::drop_host_weights`]: [`Self::module`] must not be asked then.
    pub fn has_host_weights(&self) -> bool {
        !self.modules.is_empty()
    }

    pub fn module(&self, layer: usize, target: LoraTarget) -> Option<&LoraModule> {
        assert!(layer < self.num_layers);
        assert!(
            self.has_host_weights(),
            "the host weights of {:?} were dropped",
            self.name
        );
        self.modules[layer * LoraTarget::ALL.len() + target.index()].as_ref()
    }

    /// Projections this adapter targets (in any layer).
    pub fn targets(&self) -> LoraTargets {
        self.targets
    }

    /// Host bytes held (f32).
    pub fn size_bytes(&self) -> usize {
        self.modules
            .iter()
            .flatten()
            .map(|m| 4 * (m.a.len() + m.b.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_are_redacted() {
        assert_eq!(
            redact_quoted(r#"invalid type: string "root:x:0:0", expected usize at line 1 column 9"#),
            r#"invalid type: string "…", expected usize at line 1 column 9"#
        );
        assert_eq!(redact_quoted("no quotes"), "no quotes");
    }

    #[test]
    fn pattern_keys_match_like_peft() {
        assert!(pattern_matches("down_proj", "model.layers.0.mlp.down_proj"));
        assert!(!pattern_matches("proj", "model.layers.0.mlp.down_proj"));
        assert!(pattern_matches(
            r"layers\.1\.mlp\.down_proj",
            "model.layers.1.mlp.down_proj"
        ));
        assert!(!pattern_matches(
            r"layers\.1\.mlp\.down_proj",
            "model.layers.11.mlp.down_proj"
        ));
    }
}
