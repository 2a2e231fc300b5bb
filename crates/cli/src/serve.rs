//! `multilora serve`: the OpenAI-compatible server, called as `vllm serve` is: the model folder,
//! vLLM's engine flags (or the benchmark's `common.json` through `--config`), `--lora-modules
//! name=path ...`, `--host`, `--port`, `--api-key`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use multilora_engine::EngineConfig;
use multilora_server::{Server, ServerConfig};
use serde_json::{Map, Value};

use crate::engine_args::{parse_device, parse_load_format, EngineArgs};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (or `base_model_path` from --config).
    model: Option<PathBuf>,
    /// The benchmark's common.json: its engine keys (base_model_path, dtype, enable_lora,
    /// max_loras, max_lora_rank, max_cpu_loras, max_model_len, max_num_seqs, ...) are used;
    /// flags override them, other keys are ignored.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The `model` name of the base model in requests (default: the model path as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Adapters served from the start: NAME=PATH, or vLLM's JSON form
    /// '{"name": ..., "path": ...}'. Several may follow one flag.
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    lora_modules: Vec<String>,
    /// Accept adapters (needed for /v1/load_lora_adapter without --lora-modules).
    #[arg(long)]
    enable_lora: bool,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (printed at start-up).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 routes (default: $MULTILORA_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// A chat template (a file or the template itself) instead of the model's.
    #[arg(long)]
    chat_template: Option<String>,
    /// Requests waiting for a batch slot beyond which new ones are refused with 429.
    #[arg(long, default_value_t = 1024)]
    max_waiting_requests: usize,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds a shutdown (Ctrl-C, SIGTERM) lets running requests finish before aborting them.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = EngineConfig::new(PathBuf::new());
    let mut config_model = None;
    if let Some(path) = &args.config {
        config_model = apply_common_json(path, &mut cfg)?;
    }
    let Some(model) = args.model.clone().or(config_model) else {
        bail!("give the model folder: multilora serve <MODEL> (or base_model_path in --config)");
    };
    cfg.model = model.clone();
    args.engine.apply(&mut cfg)?;
    if args.enable_lora {
        cfg.enable_lora = true;
    }
    let lora_modules = args
        .lora_modules
        .iter()
        .map(|s| parse_lora_module(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // As `generate`: the host cache holds every start-up adapter unless told otherwise.
    if (cfg.enable_lora || !lora_modules.is_empty()) && cfg.max_cpu_loras.is_none() {
        cfg.max_cpu_loras = Some(cfg.max_loras.max(lora_modules.len()));
    }
    if !(args.shutdown_timeout.is_finite() && args.shutdown_timeout >= 0.0) {
        bail!("--shutdown-timeout must be a number of seconds >= 0");
    }
    let mut server_cfg = ServerConfig::new(
        args.served_model_name
            .clone()
            .unwrap_or_else(|| model.display().to_string()),
    );
    server_cfg.lora_modules = lora_modules;
    server_cfg.api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("MULTILORA_API_KEY").ok())
        .filter(|k| !k.is_empty());
    server_cfg.chat_template = args.chat_template.clone();
    server_cfg.max_waiting_requests = args.max_waiting_requests;
    server_cfg.max_body_bytes = args.max_body_bytes;
    server_cfg.drain_timeout = Duration::from_secs_f64(args.shutdown_timeout);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let name = server_cfg.served_model_name.clone();
        let num_adapters = server_cfg.lora_modules.len();
        let server =
            Server::start(cfg, server_cfg).with_context(|| format!("loading model {}", model.display()))?;
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        eprintln!("multilora serve: listening on http://{addr} (model {name:?}, {num_adapters} adapters)");
        server
            .serve(listener, multilora_server::shutdown_signal())
            .await
            .context("serving")?;
        eprintln!("multilora serve: stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// `NAME=PATH` or `{"name": ..., "path": ...}` as vLLM's `--lora-modules` takes them.
fn parse_lora_module(spec: &str) -> anyhow::Result<(String, PathBuf)> {
    if spec.trim_start().starts_with('{') {
        let v: Value =
            serde_json::from_str(spec).with_context(|| format!("--lora-modules {spec:?}: invalid JSON"))?;
        return match (v["name"].as_str(), v["path"].as_str()) {
            (Some(n), Some(p)) if !n.is_empty() && !p.is_empty() => Ok((n.into(), p.into())),
            _ => bail!("--lora-modules {spec:?}: expected {{\"name\": ..., \"path\": ...}}"),
        };
    }
    match spec.split_once('=') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.into(), p.into())),
        _ => bail!("--lora-modules {spec:?}: expected NAME=PATH"),
    }
}

/// Applies the engine keys of a `common.json` to `cfg`; returns its `base_model_path`.
fn apply_common_json(path: &Path, cfg: &mut EngineConfig) -> anyhow::Result<Option<PathBuf>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the config {}", path.display()))?;
    let map: Map<String, Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected one JSON object of settings", path.display()))?;
    let f = path.display();
    let get = |key: &str| map.get(key).filter(|v| !v.is_null());
    let uint = |key: &str| -> anyhow::Result<Option<usize>> {
        get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .with_context(|| format!("{f}: key {key:?} must be a non-negative integer, got {v}"))
            })
            .transpose()
    };
    let string = |key: &str| -> anyhow::Result<Option<String>> {
        get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{f}: key {key:?} must be a string, got {v}"))
            })
            .transpose()
    };
    let boolean = |key: &str| -> anyhow::Result<Option<bool>> {
        get(key)
            .map(|v| {
                v.as_bool()
                    .with_context(|| format!("{f}: key {key:?} must be true or false, got {v}"))
            })
            .transpose()
    };
    if let Some(v) = string("dtype")? {
        cfg.dtype = v;
    }
    if let Some(v) = boolean("enable_lora")? {
        cfg.enable_lora = v;
    }
    if let Some(v) = boolean("enforce_eager")? {
        cfg.enforce_eager = v;
    }
    if let Some(v) = uint("max_loras")? {
        cfg.max_loras = v;
    }
    if let Some(v) = uint("max_lora_rank")? {
        cfg.max_lora_rank = v;
    }
    if let Some(v) = uint("max_cpu_loras")? {
        cfg.max_cpu_loras = Some(v);
    }
    if let Some(v) = uint("max_model_len")? {
        cfg.max_model_len = Some(v);
    }
    if let Some(v) = uint("max_num_seqs")? {
        cfg.max_num_seqs = v;
    }
    if let Some(v) = uint("max_num_batched_tokens")? {
        cfg.max_num_batched_tokens = Some(v);
    }
    if let Some(v) = get("gpu_memory_utilization") {
        cfg.gpu_memory_utilization = v
            .as_f64()
            .with_context(|| format!("{f}: key \"gpu_memory_utilization\" must be a number, got {v}"))?
            as f32;
    }
    if let Some(v) = string("load_format")? {
        cfg.load_format = parse_load_format(&v).with_context(|| f.to_string())?;
    }
    if let Some(v) = string("device")? {
        cfg.device = parse_device(&v).with_context(|| f.to_string())?;
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(string("base_model_path")?.map(|p| {
        let p = PathBuf::from(p);
        if p.is_absolute() || p.exists() || !dir.join(&p).exists() {
            p
        } else {
            dir.join(p)
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_modules_both_spellings() -> anyhow::Result<()> {
        assert_eq!(parse_lora_module("a=/x/a")?, ("a".into(), "/x/a".into()));
        assert_eq!(
            parse_lora_module(r#"{"name": "b", "path": "/x/b", "base_model_name": "m"}"#)?,
            ("b".into(), "/x/b".into())
        );
        assert!(parse_lora_module("noequals").is_err());
        assert!(parse_lora_module("=p").is_err());
        Ok(())
    }

    #[test]
    fn common_json_engine_keys() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("common.json");
        std::fs::write(
            &path,
            r#"{"base_model_path": "/m", "max_loras": 4, "max_lora_rank": 8, "max_cpu_loras": 8,
                "enable_lora": true, "max_num_seqs": 32, "num_tokens": 64, "dtype": "bfloat16"}"#,
        )?;
        let mut cfg = EngineConfig::new(PathBuf::new());
        let model = apply_common_json(&path, &mut cfg)?;
        assert_eq!(model, Some(PathBuf::from("/m")));
        assert_eq!(
            (cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras),
            (4, 8, Some(8))
        );
        assert!(cfg.enable_lora);
        assert_eq!(cfg.max_num_seqs, 32);
        std::fs::write(&path, r#"{"max_loras": "four"}"#)?;
        let err = apply_common_json(&path, &mut cfg).expect_err("ill-typed key");
        assert!(format!("{err:#}").contains("max_loras"));
        Ok(())
    }
}
