//! `common.json`, the original benchmark's one flat settings file, read key by key so that every
//! error names the file, the key and the value; then the command line's overrides on top, and
//! validated once into a [`BenchConfig`] that the rest of the benchmark reads.
//!
//! Relative paths resolve against the config file's folder first, so a config works from any
//! working directory; where the path exists only relative to the working directory (as the
//! original's configs are written), that one is used. A path found in neither place (a report
//! folder, a demo yet to be written) is the config folder's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use multilora_engine::{Device, EngineConfig, LoadFormat};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::openai::BackendKind;
use super::workload::{Series, Workload};
use super::{CommonArgs, LoraArgs};
use crate::engine_args::{parse_device, parse_load_format};

/// The original's default batch sizes (edited in its `main`).
pub const DEFAULT_BATCH_SIZES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Every key `common.json` may hold: the original's, plus `load_format`, `device`,
/// `max_num_batched_tokens`, `long_prefill_token_threshold`, `lora_target_modules`,
/// `batch_sizes` and `repeat`. `disable_async_output_proc` is accepted and has no effect on
/// this engine.
const KNOWN_KEYS: [&str; 28] = [
    "base_model_path",
    "dtype",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
    "max_cpu_loras",
    "lora_target_modules",
    "enforce_eager",
    "max_model_len",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "disable_async_output_proc",
    "max_num_seqs",
    "max_num_batched_tokens",
    "long_prefill_token_threshold",
    "load_format",
    "device",
    "random_seed",
    "no_lora_prompts_path",
    "lora_adapters_config_path",
    "lora_adapters_path",
    "report_dir",
    "num_tokens",
    "warmup_num_tokens",
    "workload_type",
    "identical_lora_id",
    "batch_sizes",
    "repeat",
];

/// Everything the benchmark reads, resolved: file values, defaults, then flags.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub config_path: PathBuf,
    pub base_model_path: PathBuf,
    pub no_lora_prompts_path: Option<PathBuf>,
    pub lora_adapters_config_path: Option<PathBuf>,
    pub lora_adapters_path: Option<PathBuf>,
    pub report_dir: PathBuf,
    pub num_tokens: usize,
    pub warmup_num_tokens: usize,
    /// The LoRA series to run (empty for `no-lora`).
    pub workloads: Vec<Workload>,
    pub identical_lora_id: usize,
    pub random_seed: u64,
    pub batch_sizes: Vec<usize>,
    pub repeat: usize,
    /// Run the no-LoRA series as well (always for `no-lora`).
    pub baseline: bool,
    /// Keys in the file this benchmark does not know (warned about).
    pub unknown_keys: Vec<String>,
    #[serde(skip)]
    pub engine: EngineConfig,
}

impl BenchConfig {
    /// The series in the order they run: the no-LoRA baseline first, as the original's README
    /// recommends, then each workload.
    pub fn series(&self) -> Vec<Series> {
        let mut out = Vec::new();
        if self.baseline {
            out.push(Series::NoLora);
        }
        out.extend(self.workloads.iter().map(|&w| Series::Lora(w)));
        out
    }
}

/// A parsed `common.json`, keys taken out one by one.
struct Keys<'a> {
    file: &'a Path,
    map: Map<String, Value>,
}

impl Keys<'_> {
    /// Takes `key` if present and not null; `what` describes the expected type for the error.
    fn take<T: DeserializeOwned>(&mut self, key: &str, what: &str) -> anyhow::Result<Option<T>> {
        match self.map.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match serde_json::from_value(v.clone()) {
                Ok(t) => Ok(Some(t)),
                Err(_) => bail!("{}: key {key:?} must be {what}, got {v}", self.file.display()),
            },
        }
    }

    /// Takes an integer key that must be at least 1.
    fn positive(&mut self, key: &str) -> anyhow::Result<Option<usize>> {
        match self.take(key, POS)? {
            Some(0) => bail!(
                "{}: key {key:?} must be a positive integer, got 0",
                self.file.display()
            ),
            v => Ok(v),
        }
    }
}

/// vLLM's `dtype` values that this engine accepts.
const DTYPES: [&str; 6] = ["auto", "float32", "float16", "bfloat16", "half", "float"];

const INT: &str = "a non-negative integer";
const POS: &str = "a positive integer";
const BOOL: &str = "true or false";
const STR: &str = "a string";
const PATH: &str = "a path (string)";

/// Resolves a relative path from a config in `config_dir`: beside the config if it exists there,
/// else the working directory's if it exists there, else beside the config.
pub fn resolve_path(raw: &Path, config_dir: &Path) -> PathBuf {
    let beside = beside(raw, config_dir);
    if raw.is_absolute() || beside.exists() || !raw.exists() {
        beside
    } else {
        raw.to_path_buf()
    }
}

/// `raw` relative to `config_dir`, with `dir/..` folded away (lexically, as a user reads
/// `config/../demo` as `demo`).
fn beside(raw: &Path, config_dir: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in config_dir.join(raw).components() {
        let after_normal = matches!(out.components().next_back(), Some(Component::Normal(_)));
        match c {
            Component::CurDir => {}
            Component::ParentDir if after_normal => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Every place [`resolve_path`] looks for `raw`, for an error that says where it looked.
fn places_looked(raw: &Path, config_dir: &Path) -> String {
    let beside = beside(raw, config_dir);
    if raw.is_absolute() || beside == raw {
        return beside.display().to_string();
    }
    let cwd = std::path::absolute(raw).unwrap_or_else(|_| raw.to_path_buf());
    format!(
        "{} (beside the config) nor {} (the working directory)",
        beside.display(),
        cwd.display()
    )
}

/// The folder a demo path (`…/demo/model`, `…/demo/adapters`) belongs to: the benchmark writes
/// the demo there when it is missing.
pub fn demo_root(p: &Path, leaf: &str) -> Option<PathBuf> {
    let parent = p.parent()?;
    (p.file_name()? == leaf && parent.file_name()? == "demo").then(|| parent.to_path_buf())
}

/// The closest known key to a misspelt one, if any is close.
fn did_you_mean(key: &str) -> Option<&'static str> {
    KNOWN_KEYS
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .filter(|&(d, k)| d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

/// A `common.json` as written: every key it may hold type-checked (an error names the file, the
/// key and the value), relative paths resolved, nothing required and no flags applied yet.
/// `multilora serve --config` takes its engine keys from it ([`CommonJson::apply_engine`]); the
/// benchmark resolves it with its flags into a [`BenchConfig`] ([`resolve`]).
#[derive(Debug, Default)]
pub struct CommonJson {
    pub file: PathBuf,
    pub base_model_path: Option<PathBuf>,
    pub dtype: Option<String>,
    pub enable_lora: Option<bool>,
    pub max_loras: Option<usize>,
    pub max_lora_rank: Option<usize>,
    pub max_cpu_loras: Option<usize>,
    pub lora_target_modules: Option<Vec<String>>,
    pub enforce_eager: Option<bool>,
    pub max_model_len: Option<usize>,
    pub gpu_memory_utilization: Option<f32>,
    pub tensor_parallel_size: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub long_prefill_token_threshold: Option<usize>,
    pub load_format: Option<LoadFormat>,
    pub device: Option<Device>,
    pub random_seed: Option<u64>,
    pub no_lora_prompts_path: Option<PathBuf>,
    pub lora_adapters_config_path: Option<PathBuf>,
    pub lora_adapters_path: Option<PathBuf>,
    pub report_dir: Option<PathBuf>,
    pub num_tokens: Option<usize>,
    pub warmup_num_tokens: Option<usize>,
    pub workload_type: Option<String>,
    pub identical_lora_id: Option<usize>,
    pub batch_sizes: Option<Vec<usize>>,
    pub repeat: Option<usize>,
    /// Keys in the file that no command reads (warned about).
    pub unknown_keys: Vec<String>,
    /// Each path key's value as written, for errors.
    raw_paths: Vec<(&'static str, PathBuf)>,
}

impl CommonJson {
    /// Reads and checks `file`; unknown keys are warned about on stderr.
    pub fn read(file: &Path) -> anyhow::Result<CommonJson> {
        Self::read_checked(file, true)
    }

    /// Reads and checks `file`; an unknown key is an error (a misspelt key would silently fall
    /// back to its default), or only a warning with `allow_unknown_keys`.
    pub fn read_checked(file: &Path, allow_unknown_keys: bool) -> anyhow::Result<CommonJson> {
        let text = std::fs::read_to_string(file).with_context(|| {
            format!(
                "reading the config {} (give another with --config)",
                file.display()
            )
        })?;
        let value: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", file.display()))?;
        let Value::Object(map) = value else {
            bail!("{}: expected one JSON object of settings", file.display());
        };
        // Checked first: a misspelt key may be why a required one is missing.
        let unknown: Vec<String> = map
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .map(|k| match did_you_mean(k) {
                Some(known) => format!("{k:?} (did you mean {known:?}?)"),
                None => format!("{k:?}"),
            })
            .collect();
        if !unknown.is_empty() {
            let f = file.display();
            if !allow_unknown_keys {
                bail!(
                    "{f}: unknown key {}; a misspelt key would fall back to its default (--allow-unknown-keys only warns)",
                    unknown.join(", ")
                );
            }
            for key in unknown {
                eprintln!("warning: {f}: unknown key {key} ignored");
            }
        }
        CommonJson::from_map(file, map)
    }

    fn from_map(file: &Path, map: Map<String, Value>) -> anyhow::Result<CommonJson> {
        let unknown_keys: Vec<String> = map
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        let mut k = Keys { file, map };
        let dir = file.parent().unwrap_or(Path::new(""));
        let mut raw_paths = Vec::new();
        let mut path = |key: &'static str| -> anyhow::Result<Option<PathBuf>> {
            let raw = k.take::<PathBuf>(key, PATH)?;
            if let Some(raw) = &raw {
                raw_paths.push((key, raw.clone()));
            }
            Ok(raw.map(|p| resolve_path(&p, dir)))
        };
        let base_model_path = path("base_model_path")?;
        let no_lora_prompts_path = path("no_lora_prompts_path")?;
        let lora_adapters_config_path = path("lora_adapters_config_path")?;
        let lora_adapters_path = path("lora_adapters_path")?;
        let report_dir = path("report_dir")?;
        let f = file.display();
        let dtype: Option<String> = k.take("dtype", STR)?;
        if let Some(d) = dtype.as_deref().filter(|d| !DTYPES.contains(d)) {
            bail!(
                "{f}: key \"dtype\" must be one of {}, got {d:?}",
                DTYPES.join(", ")
            );
        }
        let gpu_memory_utilization: Option<f32> = k.take("gpu_memory_utilization", "a number in (0, 1]")?;
        if let Some(v) = gpu_memory_utilization.filter(|v| !(*v > 0.0 && *v <= 1.0)) {
            bail!("{f}: key \"gpu_memory_utilization\" must be a number in (0, 1], got {v}");
        }
        let load_format = k
            .take::<String>("load_format", STR)?
            .map(|s| parse_load_format(&s).with_context(|| format!("{f}: key \"load_format\"")))
            .transpose()?;
        let device = k
            .take::<String>("device", STR)?
            .map(|s| parse_device(&s).with_context(|| format!("{f}: key \"device\"")))
            .transpose()?;
        let c = CommonJson {
            file: file.to_path_buf(),
            base_model_path,
            dtype,
            enable_lora: k.take("enable_lora", BOOL)?,
            max_loras: k.positive("max_loras")?,
            max_lora_rank: k.positive("max_lora_rank")?,
            max_cpu_loras: k.positive("max_cpu_loras")?,
            lora_target_modules: k.take("lora_target_modules", "a list of module names")?,
            enforce_eager: k.take("enforce_eager", BOOL)?,
            max_model_len: k.positive("max_model_len")?,
            gpu_memory_utilization,
            tensor_parallel_size: k.positive("tensor_parallel_size")?,
            max_num_seqs: k.positive("max_num_seqs")?,
            max_num_batched_tokens: k.positive("max_num_batched_tokens")?,
            long_prefill_token_threshold: k.take("long_prefill_token_threshold", INT)?,
            load_format,
            device,
            random_seed: k.take("random_seed", INT)?,
            no_lora_prompts_path,
            lora_adapters_config_path,
            lora_adapters_path,
            report_dir,
            num_tokens: k.take("num_tokens", INT)?,
            warmup_num_tokens: k.take("warmup_num_tokens", INT)?,
            workload_type: k.take("workload_type", STR)?,
            identical_lora_id: k.take("identical_lora_id", INT)?,
            batch_sizes: k.take("batch_sizes", "a list of positive integers")?,
            repeat: k.positive("repeat")?,
            unknown_keys,
            raw_paths,
        };
        assert!(
            k.map
                .keys()
                .all(|key| c.unknown_keys.contains(key) || key == "disable_async_output_proc"),
            "every key in KNOWN_KEYS is read"
        );
        Ok(c)
    }

    /// An error for path key `key` that does not exist: the file, the key, its value and the
    /// places looked.
    fn missing_path(&self, key: &str) -> anyhow::Error {
        let dir = self.file.parent().unwrap_or(Path::new(""));
        match self.raw_paths.iter().find(|(k, _)| *k == key) {
            Some((_, raw)) => anyhow::anyhow!(
                "{}: key {key:?} is {:?}, which is not at {}",
                self.file.display(),
                raw.display().to_string(),
                places_looked(raw, dir)
            ),
            None => anyhow::anyhow!("{}: missing key {key:?} ({PATH})", self.file.display()),
        }
    }

    /// Sets the engine settings the file gives on `engine` (`random_seed` is the engine's
    /// seed); the rest stays as it is.
    pub fn apply_engine(&self, engine: &mut EngineConfig) {
        if let Some(v) = &self.dtype {
            engine.dtype = v.clone();
        }
        if let Some(v) = self.enable_lora {
            engine.enable_lora = v;
        }
        engine.max_loras = self.max_loras.unwrap_or(engine.max_loras);
        engine.max_lora_rank = self.max_lora_rank.unwrap_or(engine.max_lora_rank);
        engine.max_cpu_loras = self.max_cpu_loras.or(engine.max_cpu_loras);
        engine.lora_target_modules = self
            .lora_target_modules
            .clone()
            .or(engine.lora_target_modules.take());
        engine.enforce_eager = self.enforce_eager.unwrap_or(engine.enforce_eager);
        engine.max_model_len = self.max_model_len.or(engine.max_model_len);
        engine.gpu_memory_utilization = self
            .gpu_memory_utilization
            .unwrap_or(engine.gpu_memory_utilization);
        engine.max_num_seqs = self.max_num_seqs.unwrap_or(engine.max_num_seqs);
        engine.tensor_parallel_size = self.tensor_parallel_size.unwrap_or(engine.tensor_parallel_size);
        engine.max_num_batched_tokens = self.max_num_batched_tokens.or(engine.max_num_batched_tokens);
        engine.long_prefill_token_threshold = self
            .long_prefill_token_threshold
            .unwrap_or(engine.long_prefill_token_threshold);
        engine.load_format = self.load_format.unwrap_or(engine.load_format);
        engine.device = self.device.unwrap_or(engine.device);
        engine.seed = self.random_seed.unwrap_or(engine.seed);
    }
}

/// Reads `args.config` and applies the flags. Warnings (unknown keys, ignored settings) are
/// printed to stderr.
/// `lora` is `Some` for `multi-lora`, `None` for `no-lora`.
pub fn load(args: &CommonArgs, lora: Option<&LoraArgs>) -> anyhow::Result<BenchConfig> {
    let c = CommonJson::read_checked(&args.config, args.allow_unknown_keys)?;
    let is_client = args.client.backend == BackendKind::Openai;
    // Inputs must exist before anything is written or measured; a missing demo gets written.
    // A server has its own model folder.
    let mut inputs = vec![("base_model_path", &c.base_model_path, "model")];
    inputs.retain(|_| !is_client);
    if lora.is_none_or(|l| !l.no_baseline) {
        inputs.push(("no_lora_prompts_path", &c.no_lora_prompts_path, ""));
    }
    if lora.is_some() {
        inputs.push(("lora_adapters_config_path", &c.lora_adapters_config_path, ""));
        inputs.push(("lora_adapters_path", &c.lora_adapters_path, "adapters"));
    }
    for (key, path, demo_leaf) in inputs {
        let is_missing = path
            .as_ref()
            .is_some_and(|p| !p.exists() && demo_root(p, demo_leaf).is_none());
        if is_missing {
            return Err(c.missing_path(key));
        }
    }
    resolve(c, args, lora)
}

/// The file's values, then defaults and flags, checked into what the benchmark runs.
fn resolve(c: CommonJson, args: &CommonArgs, lora: Option<&LoraArgs>) -> anyhow::Result<BenchConfig> {
    let f = c.file.display();
    let base_model_path = c
        .base_model_path
        .clone()
        .with_context(|| format!("{f}: missing key \"base_model_path\" ({PATH}); the base model folder"))?;
    let num_tokens = args.num_tokens.or(c.num_tokens).with_context(|| {
        format!("{f}: missing key \"num_tokens\" (output tokens per request); or give --num-tokens")
    })?;
    if num_tokens < 2 {
        bail!(
            "num_tokens is {num_tokens} ({f} or --num-tokens): it must be at least 2, since decode latency is the mean of the last num_tokens - 1 steps"
        );
    }
    let warmup_num_tokens = args.warmup_num_tokens.or(c.warmup_num_tokens).with_context(|| {
        format!("{f}: missing key \"warmup_num_tokens\" (output tokens of the warm-up run; 0 for none); or give --warmup-num-tokens")
    })?;
    let batch_sizes = args
        .batch_sizes
        .clone()
        .or(c.batch_sizes.clone())
        .unwrap_or_else(|| DEFAULT_BATCH_SIZES.to_vec());
    check_batch_sizes(&batch_sizes).with_context(|| format!("batch sizes ({f} or --batch-sizes)"))?;
    let repeat = args.repeat.or(c.repeat).unwrap_or(1);
    if repeat == 0 {
        bail!("--repeat must be at least 1");
    }

    let (workloads, baseline) = match lora {
        None => (Vec::new(), true),
        Some(l) => {
            let raw = l.workload.clone().or(c.workload_type.clone());
            let workloads = match raw.as_deref() {
                None => Workload::ALL.to_vec(),
                Some(s) => Workload::parse_list(s)
                    .with_context(|| format!("workload {s:?} ({f} key \"workload_type\" or --workload)"))?,
            };
            if c.enable_lora == Some(false) {
                bail!("{f}: enable_lora is false, but multi-lora needs it; set it to true");
            }
            (workloads, !l.no_baseline)
        }
    };

    let mut engine = EngineConfig::new(&base_model_path);
    c.apply_engine(&mut engine);
    engine.enable_lora = lora.is_some();
    args.engine.apply(&mut engine)?;
    if !(engine.gpu_memory_utilization > 0.0 && engine.gpu_memory_utilization <= 1.0) {
        bail!(
            "gpu_memory_utilization {} ({f} or --gpu-memory-utilization) must be in (0, 1]",
            engine.gpu_memory_utilization
        );
    }

    let need = |p: &Option<PathBuf>, key: &str, why: &str| -> anyhow::Result<()> {
        match p {
            Some(_) => Ok(()),
            None => bail!("{f}: missing key {key:?} ({PATH}); {why}"),
        }
    };
    if baseline {
        need(
            &c.no_lora_prompts_path,
            "no_lora_prompts_path",
            "the no-LoRA baseline reads its prompts from it (or pass --no-baseline)",
        )?;
    }
    if lora.is_none() {
        let lora_flags = [
            ("--max-loras", args.engine.max_loras),
            ("--max-lora-rank", args.engine.max_lora_rank),
            ("--max-cpu-loras", args.engine.max_cpu_loras),
            (
                "--lora-target-modules",
                args.engine.lora_target_modules.as_ref().map(Vec::len),
            ),
        ];
        if let Some((flag, _)) = lora_flags.iter().find(|(_, v)| v.is_some()) {
            bail!("{flag} is a LoRA setting; no-lora runs the base model alone (bench multi-lora takes it)");
        }
    } else {
        need(
            &c.lora_adapters_config_path,
            "lora_adapters_config_path",
            "multi-lora reads its adapters.json from it",
        )?;
        need(
            &c.lora_adapters_path,
            "lora_adapters_path",
            "the folder that holds the adapters",
        )?;
    }
    // `--seed` over `random_seed` over 0, as `args.engine.apply` left it.
    let random_seed = engine.seed;
    Ok(BenchConfig {
        config_path: c.file.clone(),
        base_model_path,
        no_lora_prompts_path: c.no_lora_prompts_path,
        lora_adapters_config_path: c.lora_adapters_config_path,
        lora_adapters_path: c.lora_adapters_path,
        // A flag is the working directory's; only the file's value may fall back to its folder.
        report_dir: args
            .report_dir
            .clone()
            .or(c.report_dir)
            .unwrap_or_else(|| PathBuf::from("reports")),
        num_tokens,
        warmup_num_tokens,
        workloads,
        identical_lora_id: lora
            .and_then(|l| l.identical_lora_id)
            .or(c.identical_lora_id)
            .unwrap_or(0),
        random_seed,
        batch_sizes,
        repeat,
        baseline,
        unknown_keys: c.unknown_keys,
        engine,
    })
}

fn check_batch_sizes(sizes: &[usize]) -> anyhow::Result<()> {
    if sizes.is_empty() {
        bail!("no batch sizes given");
    }
    for (i, &b) in sizes.iter().enumerate() {
        if b == 0 {
            bail!("batch size 0 is not allowed");
        }
        if sizes[..i].contains(&b) {
            bail!("batch size {b} is given twice");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: CommonArgs,
    }

    fn args(flags: &[&str]) -> CommonArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(flags);
        T::parse_from(v).args
    }

    fn parse(lora: Option<&LoraArgs>, json: &str, flags: &[&str]) -> anyhow::Result<BenchConfig> {
        let map = match serde_json::from_str(json)? {
            Value::Object(m) => m,
            _ => unreachable!("tests give objects"),
        };
        resolve(
            CommonJson::from_map(Path::new("cfg/common.json"), map)?,
            &args(flags),
            lora,
        )
    }

    const MULTI: Option<&LoraArgs> = Some(&LoraArgs {
        workload: None,
        identical_lora_id: None,
        no_baseline: false,
    });
    const NO_LORA: Option<&LoraArgs> = None;

    /// A common.json as the original ships it (every key it reads).
    const ORIGINAL: &str = r#"{
        "base_model_path": "/models/Llama-2-7b-hf",
        "dtype": "float16",
        "enable_lora": true,
        "max_loras": 32,
        "max_lora_rank": 16,
        "max_cpu_loras": 64,
        "enforce_eager": true,
        "max_model_len": 2048,
        "gpu_memory_utilization": 0.9,
        "tensor_parallel_size": 1,
        "disable_async_output_proc": true,
        "max_num_seqs": 256,
        "random_seed": 42,
        "no_lora_prompts_path": "config/prompts.json",
        "lora_adapters_config_path": "config/adapters.json",
        "lora_adapters_path": "/models/loras",
        "report_dir": "./reports",
        "num_tokens": 128,
        "warmup_num_tokens": 16,
        "workload_type": "uniform",
        "identical_lora_id": 3
    }"#;

    #[test]
    fn reads_the_originals_keys() -> anyhow::Result<()> {
        let c = parse(MULTI, ORIGINAL, &[])?;
        assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
        assert_eq!(c.base_model_path, PathBuf::from("/models/Llama-2-7b-hf"));
        assert_eq!(c.engine.dtype, "float16");
        assert_eq!(c.engine.max_loras, 32);
        assert_eq!(c.engine.max_lora_rank, 16);
        assert_eq!(c.engine.max_cpu_loras, Some(64));
        assert!(c.engine.enforce_eager && c.engine.enable_lora);
        assert_eq!(c.engine.max_model_len, Some(2048));
        assert_eq!(c.engine.max_num_seqs, 256);
        assert_eq!(c.engine.seed, 42);
        assert_eq!((c.random_seed, c.num_tokens, c.warmup_num_tokens), (42, 128, 16));
        assert_eq!(c.workloads, vec![Workload::Uniform]);
        assert_eq!(c.identical_lora_id, 3);
        assert_eq!(c.batch_sizes, DEFAULT_BATCH_SIZES.to_vec());
        // Relative to the config's folder.
        assert_eq!(c.report_dir, PathBuf::from("cfg/reports"));
        assert_eq!(c.series(), vec![Series::NoLora, Series::Lora(Workload::Uniform)]);
        Ok(())
    }

    #[test]
    fn flags_override_keys() -> anyhow::Result<()> {
        let c = parse(
            MULTI,
            ORIGINAL,
            &[
                "--batch-sizes",
                "3,5",
                "--num-tokens",
                "9",
                "--warmup-num-tokens",
                "0",
                "--seed",
                "7",
                "--max-loras",
                "4",
                "--report-dir",
                "/tmp/r",
                "--repeat",
                "3",
                "--tensor-parallel-size",
                "2",
            ],
        )?;
        assert_eq!(c.engine.tensor_parallel_size, 2);
        assert_eq!(c.batch_sizes, vec![3, 5]);
        assert_eq!((c.num_tokens, c.warmup_num_tokens, c.repeat), (9, 0, 3));
        assert_eq!((c.random_seed, c.engine.seed, c.engine.max_loras), (7, 7, 4));
        assert_eq!(c.report_dir, PathBuf::from("/tmp/r"));
        Ok(())
    }

    /// The engine settings this project adds to the original's keys, from common.json and
    /// from flags (which win); a wrong type names the key.
    #[test]
    fn long_prefill_and_target_module_keys_and_flags() -> anyhow::Result<()> {
        let json = ORIGINAL.replace(
            "\"dtype\"",
            "\"long_prefill_token_threshold\": 64, \"lora_target_modules\": [\"q_proj\", \"v_proj\"], \"dtype\"",
        );
        let names = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let c = parse(MULTI, &json, &[])?;
        assert_eq!(c.engine.long_prefill_token_threshold, 64);
        assert_eq!(c.engine.lora_target_modules, names(&["q_proj", "v_proj"]));
        let c = parse(
            MULTI,
            &json,
            &[
                "--long-prefill-token-threshold",
                "8",
                "--lora-target-modules",
                "qkv_proj,o_proj",
            ],
        )?;
        assert_eq!(c.engine.long_prefill_token_threshold, 8);
        assert_eq!(c.engine.lora_target_modules, names(&["qkv_proj", "o_proj"]));
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"dtype\"", "\"lora_target_modules\": \"q_proj\", \"dtype\""),
        );
        assert!(
            e.contains("\"lora_target_modules\" must be a list of module names"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_are_collected_not_fatal() -> anyhow::Result<()> {
        let json = ORIGINAL.replace("\"dtype\"", "\"max_lora\": 3, \"dtype\"");
        let c = parse(MULTI, &json, &[])?;
        assert_eq!(c.unknown_keys, vec!["max_lora".to_string()]);
        Ok(())
    }

    fn err(lora: Option<&LoraArgs>, json: &str) -> String {
        match parse(lora, json, &[]) {
            Ok(_) => panic!("expected an error for {json}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn errors_name_file_key_and_value() {
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"max_loras\": 32", "\"max_loras\": \"32\""),
        );
        assert!(
            e.contains("cfg/common.json") && e.contains("\"max_loras\"") && e.contains("\"32\""),
            "{e}"
        );
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"base_model_path\": \"/models/Llama-2-7b-hf\",", ""),
        );
        assert!(e.contains("missing key \"base_model_path\""), "{e}");
        let e = err(MULTI, &ORIGINAL.replace("\"num_tokens\": 128,", ""));
        assert!(e.contains("missing key \"num_tokens\""), "{e}");
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"lora_adapters_path\": \"/models/loras\",", ""),
        );
        assert!(e.contains("\"lora_adapters_path\""), "{e}");
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"tensor_parallel_size\": 1", "\"tensor_parallel_size\": 0"),
        );
        assert!(e.contains("\"tensor_parallel_size\"") && e.contains('0'), "{e}");
        let e = err(MULTI, &ORIGINAL.replace("\"uniform\"", "\"random\""));
        assert!(e.contains("\"random\"") && e.contains("workload_type"), "{e}");
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"num_tokens\": 128", "\"num_tokens\": 1"),
        );
        assert!(e.contains("at least 2"), "{e}");
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"max_num_seqs\": 256", "\"max_num_seqs\": 0"),
        );
        assert!(
            e.contains("\"max_num_seqs\" must be a positive integer, got 0"),
            "{e}"
        );
        let e = err(MULTI, &ORIGINAL.replace("\"float16\"", "\"fp8\""));
        assert!(
            e.contains("\"dtype\" must be one of") && e.contains("\"fp8\""),
            "{e}"
        );
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"enable_lora\": true", "\"enable_lora\": false"),
        );
        assert!(e.contains("enable_lora"), "{e}");
    }

    #[test]
    fn no_lora_needs_prompts_not_adapters() -> anyhow::Result<()> {
        let json = ORIGINAL
            .replace("\"lora_adapters_path\": \"/models/loras\",", "")
            .replace("\"lora_adapters_config_path\": \"config/adapters.json\",", "");
        let c = parse(NO_LORA, &json, &[])?;
        assert!(!c.engine.enable_lora);
        assert_eq!(c.series(), vec![Series::NoLora]);
        let e = err(
            NO_LORA,
            &ORIGINAL.replace("\"no_lora_prompts_path\": \"config/prompts.json\",", ""),
        );
        assert!(e.contains("\"no_lora_prompts_path\""), "{e}");
        Ok(())
    }

    #[test]
    fn batch_sizes_are_checked() {
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"dtype\"", "\"batch_sizes\": [1, 2, 2], \"dtype\""),
        );
        assert!(e.contains("given twice"), "{e}");
        let e = err(
            MULTI,
            &ORIGINAL.replace("\"dtype\"", "\"batch_sizes\": [0], \"dtype\""),
        );
        assert!(e.contains("batch size 0"), "{e}");
    }

    #[test]
    fn relative_paths_resolve_beside_the_config_then_in_the_working_directory() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // Tests run in the crate's folder, which has `src`.
        assert_eq!(resolve_path(Path::new("src"), dir.path()), PathBuf::from("src"));
        std::fs::create_dir(dir.path().join("src"))?;
        assert_eq!(resolve_path(Path::new("src"), dir.path()), dir.path().join("src"));
        // In neither place (a report folder to create): beside the config.
        let p = resolve_path(Path::new("no-such-folder"), dir.path());
        assert_eq!(p, dir.path().join("no-such-folder"));
        assert_eq!(resolve_path(Path::new("/abs"), dir.path()), PathBuf::from("/abs"));
        assert_eq!(
            beside(Path::new("../demo/model"), Path::new("config")),
            PathBuf::from("demo/model")
        );
        assert_eq!(beside(Path::new("x"), Path::new("")), PathBuf::from("x"));
        Ok(())
    }

    #[test]
    fn misspelt_keys_get_a_suggestion() {
        assert_eq!(did_you_mean("max_lora"), Some("max_loras"));
        assert_eq!(did_you_mean("num_token"), Some("num_tokens"));
        assert_eq!(did_you_mean("surprise"), None);
    }
}
