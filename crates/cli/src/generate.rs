//! `multilora generate`: offline batch inference. Every line of the input is added to one
//! engine, the engine is stepped until all are done, and one output line per input is written
//! in input order.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::{AdapterId, LLMEngine, LoraRequest, Prompt, SamplingParams, TokenLogprob};
use serde::Deserialize;

use crate::engine_args::EngineArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// An adapter requests may name: NAME=PATH (repeatable).
    #[arg(long = "lora", value_name = "NAME=PATH")]
    loras: Vec<String>,
    /// JSONL requests: {"prompt": ...} or {"prompt_token_ids": [...]}, optional "lora",
    /// "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos",
    /// "stop_token_ids", "n", "logprobs", "prompt_logprobs", "allowed_token_ids". One output
    /// line per choice, in input order.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the JSONL results (stdout if absent).
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    prompt: Option<String>,
    prompt_token_ids: Option<Vec<u32>>,
    lora: Option<String>,
    max_tokens: Option<usize>,
    min_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<u64>,
    ignore_eos: Option<bool>,
    stop_token_ids: Option<Vec<u32>>,
    n: Option<usize>,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    allowed_token_ids: Option<Vec<u32>>,
}

/// Parses `NAME=PATH` pairs into requests with ids 1, 2, ... in order.
pub fn parse_loras(specs: &[String]) -> anyhow::Result<HashMap<String, LoraRequest>> {
    let mut out = HashMap::new();
    for (i, spec) in specs.iter().enumerate() {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--lora {spec:?}: expected NAME=PATH");
        };
        if name.is_empty() || path.is_empty() {
            bail!("--lora {spec:?}: expected NAME=PATH");
        }
        let req = LoraRequest {
            name: name.to_string(),
            id: AdapterId(i as u32 + 1),
            path: PathBuf::from(path),
        };
        if out.insert(name.to_string(), req).is_some() {
            bail!("--lora: adapter name {name:?} given twice");
        }
    }
    Ok(out)
}

/// One input line: its line number (1-based), prompt, sampling parameters and adapter name.
type InputRequest = (usize, Prompt, SamplingParams, Option<String>);

fn read_requests(path: &Path) -> anyhow::Result<Vec<InputRequest>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{}:{}", path.display(), n + 1);
        let l: InputLine = serde_json::from_str(&line).with_context(where_)?;
        let prompt = match (l.prompt, l.prompt_token_ids) {
            (Some(p), None) if p.is_empty() => bail!("{}: \"prompt\" is empty", where_()),
            (None, Some(ids)) if ids.is_empty() => bail!("{}: \"prompt_token_ids\" is empty", where_()),
            (Some(p), None) => Prompt::Text(p),
            (None, Some(ids)) => Prompt::TokenIds(ids),
            _ => bail!(
                "{}: give exactly one of \"prompt\" and \"prompt_token_ids\"",
                where_()
            ),
        };
        let d = SamplingParams::default();
        let params = SamplingParams {
            temperature: l.temperature.unwrap_or(0.0),
            top_p: l.top_p.unwrap_or(d.top_p),
            top_k: l.top_k.unwrap_or(d.top_k),
            seed: l.seed,
            max_tokens: l.max_tokens.unwrap_or(d.max_tokens),
            min_tokens: l.min_tokens.unwrap_or(0),
            stop_token_ids: l.stop_token_ids.unwrap_or_default(),
            ignore_eos: l.ignore_eos.unwrap_or(false),
            n: l.n.unwrap_or(1),
            logprobs: l.logprobs,
            prompt_logprobs: l.prompt_logprobs,
            allowed_token_ids: l.allowed_token_ids,
            ..d
        };
        out.push((n + 1, prompt, params, l.lora));
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loras = parse_loras(&args.loras)?;
    let requests = read_requests(&args.input)?;
    let mut cfg = args.engine.config(args.model.clone())?;
    cfg.enable_lora = !loras.is_empty();
    if cfg.enable_lora && args.engine.max_cpu_loras.is_none() {
        cfg.max_cpu_loras = Some(cfg.max_loras.max(loras.len()));
    }
    let max_lora_rank = cfg.max_lora_rank;
    let mut engine =
        LLMEngine::new(cfg).with_context(|| format!("loading model {}", args.model.display()))?;
    // Every adapter given is loaded and checked now, used by a request or not: a typo in an
    // unused one would otherwise go unnoticed.
    let mut specs: Vec<&LoraRequest> = loras.values().collect();
    specs.sort_by_key(|l| l.id.0);
    for l in specs {
        LoraAdapter::load(&l.name, &l.path, engine.model_config(), max_lora_rank)
            .with_context(|| format!("--lora {}={}", l.name, l.path.display()))?;
    }

    let mut names = Vec::with_capacity(requests.len());
    for (index, (line, prompt, params, lora)) in requests.into_iter().enumerate() {
        let at = || format!("{}:{line}", args.input.display());
        let lora_req = match &lora {
            None => None,
            Some(name) => Some(loras.get(name).with_context(|| {
                format!(
                    "{}: unknown adapter {name:?} (give it with --lora {name}=PATH)",
                    at()
                )
            })?),
        };
        engine
            .add_request(&index.to_string(), prompt, params, lora_req)
            .with_context(at)?;
        names.push(lora);
    }
    // By (input index, choice): the finished line, and the logprobs gathered token by token.
    let mut results: BTreeMap<(usize, usize), serde_json::Value> = BTreeMap::new();
    let mut logprobs: HashMap<(usize, usize), Vec<serde_json::Value>> = HashMap::new();
    let mut prompt_logprobs: HashMap<usize, serde_json::Value> = HashMap::new();
    while engine.has_unfinished_requests() {
        for out in engine.step()? {
            // Choice c > 0 of input i runs as "{c}_{i}" (the engine's choice ids).
            let id = out.request_id.rsplit('_').next().unwrap_or(&out.request_id);
            let index: usize = id.parse().expect("ids are input indices");
            let key = (index, out.choice_index);
            if let Some(lp) = &out.logprobs {
                logprobs.entry(key).or_default().push(logprob_json(lp));
            }
            if let Some(lps) = &out.prompt_logprobs {
                let v = lps
                    .iter()
                    .map(|lp| lp.as_ref().map_or(serde_json::Value::Null, logprob_json));
                prompt_logprobs.insert(index, v.collect());
            }
            if let Some(reason) = out.finish_reason {
                let text = engine.decode(&out.output_token_ids);
                let mut line = serde_json::json!({
                    "index": index,
                    "choice": out.choice_index,
                    "lora": names[index],
                    "num_prompt_tokens": out.num_prompt_tokens,
                    "token_ids": out.output_token_ids,
                    "text": text,
                    "finish_reason": reason.as_str(),
                });
                if let Some(lps) = logprobs.remove(&key) {
                    line["logprobs"] = lps.into();
                }
                results.insert(key, line);
            }
        }
    }
    let mut text = String::new();
    for ((index, _), mut r) in results {
        if let Some(p) = prompt_logprobs.get(&index) {
            r["prompt_logprobs"] = p.clone();
        }
        text.push_str(&r.to_string());
        text.push('\n');
    }
    match &args.output {
        Some(path) => write_file_atomically(path, text.as_bytes())?,
        None => crate::print_stdout(&text)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// A token's log-probability as an output line writes it: the token, its logprob and rank, and
/// the most likely alternatives as `[id, logprob]` pairs.
fn logprob_json(lp: &TokenLogprob) -> serde_json::Value {
    serde_json::json!({
        "token_id": lp.token_id,
        "logprob": lp.logprob,
        "rank": lp.rank,
        "top": lp.top.iter().map(|&(id, l)| serde_json::json!([id, l])).collect::<Vec<_>>(),
    })
}

/// Writes a file via a temp file beside it and a rename, so a failure never leaves a
/// half-written file; through a symlink, the file it points to. A path that is not a regular
/// file (`/dev/null`, `/dev/stdout`, a FIFO) is written in place: renaming over it would replace
/// the device or pipe with a file (as root, `/dev/null` itself).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let target = match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => {
            return std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()));
        }
        Ok(_) => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        Err(_) => path.to_path_buf(),
    };
    let tmp = target.with_extension("tmp-multilora");
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    // The file the user named, not the temp file beside it.
    written.with_context(|| format!("writing {}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;

    /// Through a symlink the file it points to is replaced and the link stays; a FIFO (as
    /// `/dev/null` or `/dev/stdout` would be) is written in place and stays a FIFO — the rename
    /// this once did replaced `/dev/null` on a machine with a regular file.
    #[test]
    fn output_goes_through_links_and_into_pipes_and_devices() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let target = dir.path().join("out.jsonl");
        std::fs::write(&target, "old")?;
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&target, &link)?;
        write_file_atomically(&link, b"new")?;
        assert!(std::fs::symlink_metadata(&link)?.file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&target)?, "new");

        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
        anyhow::ensure!(made.success(), "mkfifo failed");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read_to_string(fifo))
        };
        write_file_atomically(&fifo, b"through the pipe")?;
        // Checked before joining: a FIFO renamed over would leave the reader waiting forever.
        assert!(std::fs::symlink_metadata(&fifo)?.file_type().is_fifo());
        let read = reader.join().expect("reader thread")?;
        assert_eq!(read, "through the pipe");
        assert!(std::fs::metadata("/dev/null")?.file_type().is_char_device());
        Ok(())
    }
}
