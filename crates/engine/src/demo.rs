//! The embedded demo: a small Llama-architecture model (random weights from a seed, a real
//! byte-level BPE tokenizer) and synthesized PEFT adapters, written to a local folder so the
//! benchmark runs on a fresh clone with no downloads. [`synth_adapter`] also serves
//! `multilora adapters synth` for real base models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use crate::error::{Error, Result};
use crate::lora::LoraTarget;
use crate::ModelConfig;

const TOKENIZER_JSON: &str = include_str!("demo/tokenizer.json");
const TOKENIZER_CONFIG_JSON: &str = include_str!("demo/tokenizer_config.json");

/// The demo model's tokenizer, for unit tests that need a real vocabulary.
#[cfg(test)]
pub(crate) fn demo_tokenizer() -> Result<tokenizers::Tokenizer> {
    use std::str::FromStr;
    tokenizers::Tokenizer::from_str(TOKENIZER_JSON).map_err(|e| Error::Tokenizer {
        path: "demo/tokenizer.json".into(),
        msg: e.to_string(),
    })
}

/// Shape of the demo model: ~4.5 M parameters, 4 layers, GQA.
pub fn demo_config_json() -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "attention_bias": false,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16"
    })
}

/// Writes `dir/` atomically: everything goes to a sibling temp folder that is renamed at the
/// end, so an interrupted run leaves no half-written model or adapter behind.
fn write_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if dir.exists() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
        ));
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per call, not only per process: threads of one process (tests) may write the
    // same folder at once, and each must own its temp folder.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("json values serialize");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

enum Data {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, (Vec<usize>, Data)>) -> Result<()> {
    let bytes: Vec<(&String, &Vec<usize>, Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, data))| match data {
            Data::F32(v) => (
                name,
                shape,
                Dtype::F32,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            Data::Bf16(v) => (
                name,
                shape,
                Dtype::BF16,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, d, b)| {
            (
                (*n).clone(),
                TensorView::new(*d, (*s).clone(), b).expect("shape matches data"),
            )
        })
        .collect();
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    // Serialized in memory and written with `fs::write`, which creates the file 0666 less the
    // umask (0644 as a rule): `serialize_to_file` goes through a temp file created 0600, which
    // a server running as another user could not read. The folder is renamed into place whole.
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes the demo model (config, bf16 weights, tokenizer) to `dir`, deterministically from
/// `seed`. Fails if `dir` exists.
pub fn write_demo_model(dir: &Path, seed: u64) -> Result<()> {
    let config = demo_config_json();
    write_atomically(dir, |tmp| {
        write_json(&tmp.join("config.json"), &config)?;
        write_json(
            &tmp.join("generation_config.json"),
            &json!({"bos_token_id": 0, "eos_token_id": 1}),
        )?;
        std::fs::write(tmp.join("tokenizer.json"), TOKENIZER_JSON).map_err(|e| Error::io(tmp, e))?;
        std::fs::write(tmp.join("tokenizer_config.json"), TOKENIZER_CONFIG_JSON)
            .map_err(|e| Error::io(tmp, e))?;
        let cfg = ModelConfig::from_dir(tmp)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 1.0).expect("valid");
        let mut t = BTreeMap::new();
        let add = |t: &mut BTreeMap<_, _>, name: String, shape: Vec<usize>, std: f32, rng: &mut StdRng| {
            let n = shape.iter().product();
            let v = (0..n)
                .map(|_| half::bf16::from_f32(normal.sample(rng) * std))
                .collect();
            t.insert(name, (shape, Data::Bf16(v)));
        };
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        add(
            &mut t,
            "model.embed_tokens.weight".into(),
            vec![v, h],
            1.0,
            &mut rng,
        );
        for i in 0..cfg.num_hidden_layers {
            for target in LoraTarget::ALL {
                let (in_f, out_f) = target.shape(&cfg);
                let name = format!("model.layers.{i}.{}.{}.weight", target.parent(), target.name());
                add(
                    &mut t,
                    name,
                    vec![out_f, in_f],
                    1.0 / (in_f as f32).sqrt(),
                    &mut rng,
                );
            }
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                let ones = vec![half::bf16::ONE; h];
                t.insert(
                    format!("model.layers.{i}.{norm}.weight"),
                    (vec![h], Data::Bf16(ones)),
                );
            }
        }
        t.insert(
            "model.norm.weight".into(),
            (vec![h], Data::Bf16(vec![half::bf16::ONE; h])),
        );
        add(
            &mut t,
            "lm_head.weight".into(),
            vec![v, h],
            1.0 / (h as f32).sqrt(),
            &mut rng,
        );
        write_safetensors(&tmp.join("model.safetensors"), &t)
    })
}

/// What [`synth_adapter`] writes.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub rank: usize,
    pub lora_alpha: f32,
    pub targets: Vec<LoraTarget>,
    pub use_rslora: bool,
    pub seed: u64,
}

/// Writes a PEFT-format LoRA adapter that fits the model described by `cfg`: random A (scaled
/// like PEFT's Kaiming init) and random nonzero B, so it visibly changes the output.
pub fn synth_adapter(dir: &Path, cfg: &ModelConfig, base_model: &str, spec: &SynthSpec) -> Result<()> {
    if spec.rank == 0 || spec.targets.is_empty() {
        return Err(Error::InvalidConfig(
            "an adapter needs rank >= 1 and at least one target module".into(),
        ));
    }
    let mut targets = spec.targets.clone();
    targets.sort();
    targets.dedup();
    let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": names,
        "use_rslora": spec.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true
    });
    write_atomically(dir, |tmp| {
        write_json(&tmp.join("adapter_config.json"), &config)?;
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut t = BTreeMap::new();
        for i in 0..cfg.num_hidden_layers {
            for &target in &targets {
                let (in_f, out_f) = target.shape(cfg);
                let prefix = format!(
                    "base_model.model.model.layers.{i}.{}.{}",
                    target.parent(),
                    target.name()
                );
                let bound = 1.0 / (in_f as f32).sqrt();
                let a = (0..spec.rank * in_f)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let b = (0..out_f * spec.rank)
                    .map(|_| rng.random_range(-0.05..0.05))
                    .collect();
                t.insert(
                    format!("{prefix}.lora_A.weight"),
                    (vec![spec.rank, in_f], Data::F32(a)),
                );
                t.insert(
                    format!("{prefix}.lora_B.weight"),
                    (vec![out_f, spec.rank], Data::F32(b)),
                );
            }
        }
        write_safetensors(&tmp.join("adapter_model.safetensors"), &t)
    })
}

/// The demo's layout under a root folder.
pub struct DemoPaths {
    pub model: PathBuf,
    pub adapters: PathBuf,
}

impl DemoPaths {
    pub fn new(root: &Path) -> Self {
        DemoPaths {
            model: root.join("model"),
            adapters: root.join("adapters"),
        }
    }
}

/// Demo adapter groups: (rank, count). 32 per rank so `distinct` runs up to batch 32.
pub const DEMO_ADAPTER_GROUPS: [(usize, usize); 2] = [(8, 32), (16, 32)];

pub fn demo_adapter_name(rank: usize, i: usize) -> String {
    format!("demo-r{rank}-{i:03}")
}

/// Writes whatever part of the demo (model, adapters) is missing under `root`. Returns true if
/// anything was written.
pub fn ensure_demo(root: &Path, seed: u64) -> Result<bool> {
    let paths = DemoPaths::new(root);
    let mut wrote = false;
    // Another process or thread may write the same folder at once: losing that race (the
    // rename finds the folder there) is success, since the winner wrote the same bytes.
    let written_or_raced = |done: &Path, result: Result<()>| match result {
        Err(_) if done.exists() => Ok(false),
        other => other.map(|()| true),
    };
    let config = paths.model.join("config.json");
    if !config.exists() {
        wrote |= written_or_raced(&config, write_demo_model(&paths.model, seed))?;
    }
    let cfg = ModelConfig::from_dir(&paths.model)?;
    for (g, &(rank, count)) in DEMO_ADAPTER_GROUPS.iter().enumerate() {
        for i in 0..count {
            let dir = paths.adapters.join(demo_adapter_name(rank, i));
            let weights = dir.join("adapter_model.safetensors");
            if weights.exists() {
                continue;
            }
            let spec = SynthSpec {
                rank,
                lora_alpha: 2.0 * rank as f32,
                targets: vec![
                    LoraTarget::QProj,
                    LoraTarget::KProj,
                    LoraTarget::VProj,
                    LoraTarget::OProj,
                ],
                use_rslora: false,
                seed: seed.wrapping_add(1000 * (g as u64 + 1) + i as u64),
            };
            wrote |= written_or_raced(&weights, synth_adapter(&dir, &cfg, "../../model", &spec))?;
        }
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test binaries run their tests on threads of one process, several of which may write the
    /// demo folder at once (CI once failed a server test this way): every writer succeeds and the
    /// folder ends complete, with no temp folder left behind.
    #[test]
    fn threads_racing_to_write_the_demo_all_succeed() {
        let root = std::env::temp_dir().join(format!("multilora-demo-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let results: Vec<Result<bool>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6).map(|_| s.spawn(|| ensure_demo(&root, 0))).collect();
            handles.into_iter().map(|h| h.join().expect("no panic")).collect()
        });
        for r in &results {
            assert!(r.is_ok(), "{r:?}");
        }
        assert!(!ensure_demo(&root, 0).expect("complete"), "nothing left to write");
        let leftovers: Vec<_> = std::fs::read_dir(root.join("adapters"))
            .expect("adapters folder")
            .chain(std::fs::read_dir(&root).expect("root"))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .map(|e| e.path())
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        std::fs::remove_dir_all(&root).expect("clean up");
    }
}
