//! `multilora serve`: the OpenAI-compatible server, called as `vllm serve` is: the model folder,
//! vLLM's engine flags (or the benchmark's `common.json` through `--config`, read by the
//! benchmark's own reader), `--lora-modules name=path ...`, `--host`, `--port`, `--api-key`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use multilora_engine::EngineConfig;
use multilora_server::{Server, ServerConfig};
use serde_json::Value;

use crate::bench::config::CommonJson;
use crate::engine_args::EngineArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model folder (or `base_model_path` from --config).
    model: Option<PathBuf>,
    /// The benchmark's common.json: its engine keys (base_model_path, dtype, enable_lora,
    /// max_loras, max_lora_rank, max_cpu_loras, max_model_len, max_num_seqs, random_seed, ...)
    /// are used, flags override them; the benchmark's own keys are checked and ignored.
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
    /// Queued requests that no free batch slot can take, beyond which new ones get 429.
    #[arg(long, default_value_t = 1024)]
    max_waiting_requests: usize,
    /// Largest request body accepted (413 above).
    #[arg(long, default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds a shutdown (Ctrl-C, SIGTERM) lets running requests finish before aborting them;
    /// new requests get 503 meanwhile. The process ends at most a second after.
    #[arg(long, default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Allow /v1/load_lora_adapter and /v1/unload_lora_adapter (also vLLM's
    /// VLLM_ALLOW_RUNTIME_LORA_UPDATING=True); pair with --api-key and --allowed-lora-dirs.
    #[arg(long)]
    enable_runtime_lora_updating: bool,
    /// Folders that runtime adapter paths must resolve inside, after symlinks.
    #[arg(long, num_args = 1.., value_name = "DIR")]
    allowed_lora_dirs: Vec<PathBuf>,
    /// List each adapter's folder as its `root` in /v1/models (default: its name).
    #[arg(long)]
    show_lora_paths: bool,
    /// Seconds a connection may take to send a request's headers, from its opening or its
    /// previous response (so also how long an idle keep-alive connection stays open).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a request's body may take to arrive after its headers (408 after).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
    /// Open connections beyond which new ones wait in the listen backlog.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds one engine step or command may run before /health answers 503.
    #[arg(long, default_value_t = 60.0)]
    engine_stall_timeout: f64,
    #[command(flatten)]
    engine: EngineArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut cfg = EngineConfig::new(PathBuf::new());
    let mut config_model = None;
    if let Some(path) = &args.config {
        let common = CommonJson::read(path)?;
        common.apply_engine(&mut cfg);
        config_model = common.base_model_path;
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
    let seconds = |flag: &str, v: f64| {
        if (0.0..=1e9).contains(&v) {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!("{flag} must be a number of seconds >= 0"))
        }
    };
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
    server_cfg.drain_timeout = seconds("--shutdown-timeout", args.shutdown_timeout)?;
    server_cfg.header_timeout = seconds("--header-timeout", args.header_timeout)?;
    server_cfg.body_timeout = seconds("--body-timeout", args.body_timeout)?;
    server_cfg.engine_stall_timeout = seconds("--engine-stall-timeout", args.engine_stall_timeout)?;
    server_cfg.max_connections = args.max_connections;
    let env_allows = std::env::var("VLLM_ALLOW_RUNTIME_LORA_UPDATING").is_ok_and(|v| is_env_true(&v));
    server_cfg.enable_runtime_lora_updating = args.enable_runtime_lora_updating || env_allows;
    server_cfg.allowed_lora_dirs = args.allowed_lora_dirs.clone();
    server_cfg.show_lora_paths = args.show_lora_paths;
    if server_cfg.enable_runtime_lora_updating && server_cfg.api_key.is_none() {
        tracing::warn!("runtime adapter loading is on without --api-key: anyone who reaches the port can load and unload adapters");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async move {
        let name = server_cfg.served_model_name.clone();
        let num_adapters = server_cfg.lora_modules.len();
        let server = Server::start(cfg, server_cfg)
            .with_context(|| format!("starting the server for {}", model.display()))?;
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
    });
    // A read stuck on the blocking pool (an adapter folder on a hung mount) must not hold the
    // exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// As vLLM reads its boolean variables: "1" or "true", in any case.
fn is_env_true(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_lora_updating_env_as_vllm_reads_it() {
        for yes in ["True", "true", "1", " TRUE "] {
            assert!(is_env_true(yes), "{yes}");
        }
        for no in ["False", "0", "", "yes"] {
            assert!(!is_env_true(no), "{no}");
        }
    }

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
                "enable_lora": true, "max_num_seqs": 32, "num_tokens": 64, "dtype": "bfloat16",
                "random_seed": 7, "report_dir": "reports"}"#,
        )?;
        let mut cfg = EngineConfig::new(PathBuf::new());
        let common = CommonJson::read(&path)?;
        common.apply_engine(&mut cfg);
        assert_eq!(common.base_model_path, Some(PathBuf::from("/m")));
        assert_eq!(
            (cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras),
            (4, 8, Some(8))
        );
        assert!(cfg.enable_lora);
        assert_eq!((cfg.max_num_seqs, cfg.seed), (32, 7));
        assert_eq!(cfg.dtype, "bfloat16");
        // The benchmark's errors: file, key and value named, for every key the file may hold.
        for (bad, key, value) in [
            (r#"{"max_loras": "four"}"#, "max_loras", "\"four\""),
            (r#"{"max_num_seqs": 0}"#, "max_num_seqs", "0"),
            (r#"{"num_tokens": -1}"#, "num_tokens", "-1"),
            (r#"{"tensor_parallel_size": 0}"#, "tensor_parallel_size", "0"),
        ] {
            std::fs::write(&path, bad)?;
            let err = format!("{:#}", CommonJson::read(&path).expect_err(bad));
            // The temp path may hold digits: look for the key and value in the rest.
            let file = path.display().to_string();
            let rest = err.replace(&file, "");
            assert!(
                err.contains(&file) && rest.contains(key) && rest.contains(value),
                "{bad}: {err}"
            );
        }
        Ok(())
    }
}
