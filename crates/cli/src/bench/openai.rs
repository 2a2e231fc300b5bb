//! The benchmark as a client of any OpenAI-compatible server (multilora serve, vLLM,
//! vllm-ascend, SGLang): each request is one streamed `/v1/completions` call whose `model` is
//! the adapter's name (vLLM's convention) or the base model's, with vLLM's `ignore_eos` and
//! `min_tokens` so that every request produces exactly `num_tokens` tokens.
//!
//! A client cannot see engine steps, so the batch numbers come from the streams: prefill ≈
//! time to first token (the batch's slowest), decode ≈ mean inter-token latency, e2e from the
//! first request sent to the last token received. [`RequestTiming`] keeps every chunk's arrival
//! for TTFT/TPOT/ITL percentiles.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::backend::{Backend, BenchRequest};
use super::plan::PlannedPoint;
use super::records::{BatchRun, RequestRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The engine in this process.
    Engine,
    /// An OpenAI-compatible server at --base-url.
    Openai,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    /// Run on the engine in-process, or against an OpenAI-compatible server.
    #[arg(long, value_enum, default_value = "engine")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Where the server is.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's OpenAI API root, http:// or https:// (certificates checked against the
    /// system's and Mozilla's roots; SSL_CERT_FILE adds a private CA).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1")]
    pub base_url: String,
    /// Sent as `Authorization: Bearer` (default: $OPENAI_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The base model's name on the server (default: the first model /v1/models lists without
    /// a parent).
    #[arg(long)]
    pub model: Option<String>,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
}

/// What a client saw of one streamed request.
#[derive(Debug, Clone)]
pub struct RequestTiming {
    pub sent: Instant,
    /// Arrival of every chunk that carried a token, its text possibly empty (the first is the
    /// time to first token).
    pub chunk_times: Vec<Instant>,
    pub done: Instant,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub finish_reason: String,
}

impl RequestTiming {
    pub fn ttft_s(&self) -> Option<f64> {
        self.chunk_times.first().map(|t| (*t - self.sent).as_secs_f64())
    }

    pub fn e2e_s(&self) -> f64 {
        (self.done - self.sent).as_secs_f64()
    }

    /// vLLM's TPOT: (e2e − TTFT) / (output tokens − 1).
    pub fn tpot_s(&self) -> Option<f64> {
        let ttft = self.ttft_s()?;
        (self.output_tokens > 1).then(|| (self.e2e_s() - ttft) / (self.output_tokens - 1) as f64)
    }

    /// Gaps between chunks (a chunk may carry several tokens when the server batches text).
    pub fn itls_s(&self) -> impl Iterator<Item = f64> + '_ {
        self.chunk_times.windows(2).map(|w| (w[1] - w[0]).as_secs_f64())
    }
}

/// A connection to one server.
#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl OpenAiClient {
    pub fn new(args: &ServerArgs) -> anyhow::Result<Self> {
        if !(args.request_timeout.is_finite() && args.request_timeout > 0.0) {
            bail!("--request-timeout must be a positive number of seconds");
        }
        let url = reqwest::Url::parse(&args.base_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if url.is_none() {
            bail!(
                "--base-url {:?}: expected the server's API root as http://HOST:PORT/v1 or https://HOST/v1",
                args.base_url
            );
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(args.request_timeout))
            .pool_max_idle_per_host(1024)
            .build()
            .context("creating the HTTP client")?;
        Ok(OpenAiClient {
            http,
            base_url: args.base_url.trim_end_matches('/').to_string(),
            api_key: args
                .api_key
                .clone()
                .or_else(|| std::env::var("OPENAI_API_KEY").ok())
                .filter(|k| !k.is_empty()),
        })
    }

    /// Sends `method url` (with the API key, if any, and `body` as JSON); a failure to connect
    /// (or to complete the TLS handshake) names both and says what to check.
    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let mut req = self.http.request(method.clone(), url);
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.map_err(|e| {
            let hint = match (e.is_connect(), url.starts_with("https://")) {
                (false, _) => String::new(),
                (true, false) => ": no connection (is the server running?)".into(),
                (true, true) => ": no HTTPS connection (is the server running, and serving HTTPS on that port? A plain-HTTP server wants an http:// --base-url; a certificate from a private CA wants SSL_CERT_FILE set to its PEM file)".into(),
            };
            anyhow::Error::new(e).context(format!("{method} {url}{hint}"))
        })
    }

    /// `/v1/models`' `data`: every model card (`id`, `parent`, `max_model_len` where the
    /// server reports it).
    pub async fn models(&self) -> anyhow::Result<Vec<Value>> {
        let url = format!("{}/models", self.base_url);
        let res = self.send(reqwest::Method::GET, &url, None).await?;
        let body = checked_body(res, &url).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON"))?;
        Ok(v["data"].as_array().cloned().unwrap_or_default())
    }

    /// The base model's name: `preferred`, else the first model without a parent.
    pub fn base_model(models: &[Value], preferred: Option<&str>) -> anyhow::Result<String> {
        if let Some(m) = preferred {
            return Ok(m.to_string());
        }
        models
            .iter()
            .find(|m| m["parent"].is_null())
            .and_then(|m| m["id"].as_str())
            .map(str::to_string)
            .context("the server lists no base model in /v1/models; name it with --model")
    }

    /// Names of the adapters the server lists, in its order.
    pub fn adapter_names(models: &[Value]) -> Vec<String> {
        models
            .iter()
            .filter(|m| !m["parent"].is_null())
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect()
    }

    /// vLLM's `/tokenize` (multilora serves it too): the prompt's token count, or `None` where
    /// the server has no such route.
    pub async fn count_tokens(&self, model: &str, prompt: &str) -> anyhow::Result<Option<usize>> {
        let root = self.base_url.trim_end_matches("/v1");
        let url = format!("{root}/tokenize");
        let body = json!({"model": model, "prompt": prompt});
        let res = self.send(reqwest::Method::POST, &url, Some(&body)).await?;
        if res.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let body = checked_body(res, &url).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("POST {url}: not JSON"))?;
        Ok(v["count"].as_u64().map(|n| n as usize))
    }

    /// The server's Prometheus `/metrics` text, or `None` where it has no such route (or it
    /// fails: a scrape is an extra, never a reason to fail a benchmark).
    pub async fn metrics_text(&self) -> Option<String> {
        let root = self.base_url.trim_end_matches("/v1");
        let url = format!("{root}/metrics");
        let res = self.send(reqwest::Method::GET, &url, None).await.ok()?;
        if !res.status().is_success() {
            return None;
        }
        res.text().await.ok()
    }

    /// vLLM's `/v1/load_lora_adapter`; the path is the server's.
    pub async fn load_lora(&self, name: &str, path: &str) -> anyhow::Result<()> {
        let url = format!("{}/load_lora_adapter", self.base_url);
        let body = json!({"lora_name": name, "lora_path": path});
        let res = self.send(reqwest::Method::POST, &url, Some(&body)).await?;
        checked_body(res, &url)
            .await
            .with_context(|| format!("loading adapter {name:?} from {path} on the server"))?;
        Ok(())
    }

    /// One streamed completion of exactly `num_tokens` tokens.
    pub async fn complete(
        &self,
        model: &str,
        prompt: &str,
        num_tokens: usize,
    ) -> anyhow::Result<RequestTiming> {
        let body = json!({
            "model": model, "prompt": prompt, "max_tokens": num_tokens, "min_tokens": num_tokens,
            "ignore_eos": true, "temperature": 0.0, "stream": true,
            "stream_options": {"include_usage": true},
        });
        let url = format!("{}/completions", self.base_url);
        let sent = Instant::now();
        let res = check_status(self.send(reqwest::Method::POST, &url, Some(&body)).await?, &url).await?;
        let mut timing = RequestTiming {
            sent,
            chunk_times: Vec::with_capacity(num_tokens),
            done: sent,
            prompt_tokens: 0,
            output_tokens: 0,
            finish_reason: String::new(),
        };
        let mut stream = res.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut is_done = false;
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.with_context(|| format!("reading the stream of {url}"))?;
            let now = Instant::now();
            buf.extend_from_slice(&bytes);
            // Server-sent events end with a blank line.
            while let Some(end) = find_event_end(&buf) {
                let event: Vec<u8> = buf.drain(..end).collect();
                for line in String::from_utf8_lossy(&event).lines() {
                    let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                        continue;
                    };
                    if data == "[DONE]" {
                        is_done = true;
                        continue;
                    }
                    on_chunk(data, now, &mut timing)?;
                }
            }
        }
        if !is_done {
            bail!("{url}: the stream ended without [DONE]");
        }
        timing.done = timing.chunk_times.last().copied().unwrap_or_else(Instant::now);
        if timing.output_tokens == 0 {
            // Servers that do not send usage: count token chunks.
            timing.output_tokens = timing.chunk_times.len();
        }
        Ok(timing)
    }
}

/// Index just past the first `\n\n` (or `\r\n\r\n`) in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn on_chunk(data: &str, now: Instant, t: &mut RequestTiming) -> anyhow::Result<()> {
    let v: Value =
        serde_json::from_str(data).with_context(|| format!("a stream chunk is not JSON: {data}"))?;
    if let Some(e) = v.get("error") {
        bail!(
            "the server failed the request mid-stream: {}",
            e["message"].as_str().unwrap_or(data)
        );
    }
    if let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) {
        // A token's chunk, whatever its text: a token that completes no character yet streams
        // empty text (vLLM sends a chunk per step). A chat stream's first chunk (the role) and
        // last (`delta: {}`) carry no token.
        let delta = &choice["delta"];
        if choice.get("text").is_some() || (delta.get("content").is_some() && delta.get("role").is_none()) {
            t.chunk_times.push(now);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            t.finish_reason = f.to_string();
        }
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        t.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        t.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
    }
    Ok(())
}

/// The body of a successful response; an error status becomes an error with the server's
/// message.
async fn checked_body(res: reqwest::Response, url: &str) -> anyhow::Result<String> {
    check_status(res, url)
        .await?
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))
}

/// `res` if its status is a success, else an error with the server's message.
async fn check_status(res: reqwest::Response, url: &str) -> anyhow::Result<reqwest::Response> {
    let status = res.status();
    if status.is_success() {
        return Ok(res);
    }
    let body = res
        .text()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    let msg = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    bail!("{url} answered {status}: {msg}")
}

/// The benchmark's [`Backend`] over HTTP.
pub struct OpenAiBackend {
    client: OpenAiClient,
    runtime: tokio::runtime::Runtime,
    base_url: String,
    model: String,
    max_model_len: usize,
    /// Adapters the server has (listed, or loaded by us).
    adapters: HashSet<String>,
    num_loaded: usize,
    /// Prompts counted so far, and their token counts.
    prompt_tokens: HashMap<String, usize>,
}

impl OpenAiBackend {
    /// Connects and reads the server's models; `max_model_len` is the server's where it says
    /// (vLLM and multilora do), else `fallback_max_model_len`.
    pub fn connect(args: &ServerArgs, fallback_max_model_len: usize) -> anyhow::Result<Self> {
        let client = OpenAiClient::new(args)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let models = runtime.block_on(client.models())?;
        let model = OpenAiClient::base_model(&models, args.model.as_deref())?;
        let max_model_len = models
            .iter()
            .find(|m| m["id"] == model.as_str())
            .and_then(|m| m["max_model_len"].as_u64())
            .map_or(fallback_max_model_len, |n| n as usize);
        Ok(OpenAiBackend {
            adapters: OpenAiClient::adapter_names(&models).into_iter().collect(),
            client,
            runtime,
            base_url: args.base_url.clone(),
            model,
            max_model_len,
            num_loaded: 0,
            prompt_tokens: HashMap::new(),
        })
    }
}

impl OpenAiBackend {
    /// Loads the adapters of `requests` the server does not have yet from their folders (a
    /// path the server must see), as vLLM's /v1/load_lora_adapter takes it.
    fn load_adapters(&mut self, requests: &[BenchRequest]) -> anyhow::Result<()> {
        for l in requests.iter().filter_map(|r| r.lora.as_ref()) {
            if !self.adapters.contains(&l.name) {
                // Absolute: the server does not share our working directory.
                let path = std::path::absolute(&l.path)
                    .with_context(|| format!("adapter {}: resolving {}", l.name, l.path.display()))?;
                let path = path.to_string_lossy().into_owned();
                self.runtime.block_on(self.client.load_lora(&l.name, &path))?;
                self.adapters.insert(l.name.clone());
                self.num_loaded += 1;
            }
        }
        Ok(())
    }
}

impl Backend for OpenAiBackend {
    fn prepare(&mut self, points: &[PlannedPoint]) -> anyhow::Result<()> {
        for p in points {
            self.load_adapters(&p.requests)?;
        }
        Ok(())
    }

    /// Counted by the server: `/tokenize` where it has one, else a one-token request's usage.
    /// Each distinct prompt is counted once (the plan checks every request of every point).
    fn num_prompt_tokens(&mut self, prompt: &str) -> anyhow::Result<usize> {
        if let Some(&n) = self.prompt_tokens.get(prompt) {
            return Ok(n);
        }
        let n = match self
            .runtime
            .block_on(self.client.count_tokens(&self.model, prompt))?
        {
            Some(n) => n,
            None => {
                let timing = self
                    .runtime
                    .block_on(self.client.complete(&self.model, prompt, 1))
                    .context("counting prompt tokens with a one-token request")?;
                // A prompt has at least one token: 0 means the server sent no usage.
                if timing.prompt_tokens == 0 {
                    bail!(
                        "{}: the server has no /tokenize and reported no usage for a one-token \
                         request, so prompt lengths cannot be checked against its max_model_len",
                        self.base_url
                    );
                }
                timing.prompt_tokens
            }
        };
        self.prompt_tokens.insert(prompt.to_string(), n);
        Ok(n)
    }

    fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    fn run_batch(&mut self, requests: &[BenchRequest], num_tokens: usize) -> anyhow::Result<BatchRun> {
        self.load_adapters(requests)?;
        let client = &self.client;
        let base = &self.model;
        let timings = self.runtime.block_on(async {
            // All requests of the batch go out at once, as the original adds them all before
            // the first step.
            let calls = requests.iter().map(|r| {
                let model = r.lora.as_ref().map_or(base.as_str(), |l| l.name.as_str());
                client.complete(model, &r.prompt, num_tokens)
            });
            futures_util::future::join_all(calls).await
        });
        let mut run = BatchRun::default();
        let mut first_sent = None;
        let mut last_done = None;
        for (r, t) in requests.iter().zip(timings) {
            let t = t.with_context(|| format!("request {}", r.request_id))?;
            first_sent = Some(first_sent.map_or(t.sent, |s: Instant| s.min(t.sent)));
            last_done = Some(last_done.map_or(t.done, |d: Instant| d.max(t.done)));
            let first = t.chunk_times.first().copied().unwrap_or(t.done);
            run.requests.push(RequestRecord {
                request_id: r.request_id.clone(),
                lora: r.lora.as_ref().map(|l| l.name.clone()),
                prompt_num_tokens: t.prompt_tokens,
                output_num_tokens: t.output_tokens,
                finish_reason: t.finish_reason.clone(),
                // From sending the request: a client cannot see when it was scheduled.
                first_token_time_s: (first - t.sent).as_secs_f64(),
                completion_time_s: (t.done - first).as_secs_f64(),
                inter_token_latencies_s: t.itls_s().collect(),
            });
        }
        if let (Some(s), Some(d)) = (first_sent, last_done) {
            run.e2e_ms = (d - s).as_secs_f64() * 1e3;
        }
        Ok(run)
    }

    fn describe(&self) -> Value {
        json!({
            "backend": "openai",
            "base_url": self.base_url,
            "model": self.model,
            "max_model_len": self.max_model_len,
            "adapters_loaded_by_benchmark": self.num_loaded,
            "step_timing": "none: a client cannot see engine steps; prefill = the batch's slowest time to first token, decode = mean inter-token latency, e2e = first request sent to last token received",
            "first_token_time": "first streamed token − request sent (the engine backend measures from first scheduled)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::records::BatchLatency;

    #[test]
    fn batch_latency_from_client_timings() -> anyhow::Result<()> {
        let req = |ttft: f64, completion: f64, n: usize| RequestRecord {
            request_id: "0".into(),
            lora: None,
            prompt_num_tokens: 4,
            output_num_tokens: n,
            finish_reason: "length".into(),
            first_token_time_s: ttft,
            completion_time_s: completion,
            inter_token_latencies_s: Vec::new(),
        };
        // Prefill: the slowest first token; decode: mean of (completion / (n - 1)).
        let l = BatchLatency::from_requests(&[req(0.010, 0.040, 5), req(0.020, 0.080, 5)], 120.0)?;
        assert!((l.prefill_ms - 20.0).abs() < 1e-9);
        assert!((l.decode_ms - 15.0).abs() < 1e-9);
        assert_eq!(l.e2e_ms, 120.0);
        assert!(BatchLatency::from_requests(&[req(0.01, 0.0, 1)], 1.0).is_err());
        Ok(())
    }

    #[test]
    fn base_url_must_be_an_http_or_https_url() {
        let args = |base_url: &str| ServerArgs {
            base_url: base_url.into(),
            api_key: None,
            model: None,
            request_timeout: 1.0,
        };
        for bad in ["localhost:8000/v1", "127.0.0.1:8000", "ftp://host/v1", "/v1", ""] {
            let e = OpenAiClient::new(&args(bad)).err().map(|e| format!("{e:#}"));
            assert!(
                e.as_deref()
                    .is_some_and(|e| e.contains("--base-url") && e.contains(&format!("{bad:?}"))),
                "{bad}: {e:?}"
            );
        }
        for good in ["http://127.0.0.1:8000/v1", "https://gpu-host.example/v1"] {
            assert!(OpenAiClient::new(&args(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        assert_eq!(find_event_end(b"data: {}\n\ndata: x"), Some(10));
        assert_eq!(find_event_end(b"data: {}\r\n\r\n"), Some(12));
        assert_eq!(find_event_end(b"data: {}\n"), None);
    }

    #[test]
    fn chunks_of_both_apis_and_usage_are_read() -> anyhow::Result<()> {
        let now = Instant::now();
        let mut t = RequestTiming {
            sent: now,
            chunk_times: Vec::new(),
            done: now,
            prompt_tokens: 0,
            output_tokens: 0,
            finish_reason: String::new(),
        };
        on_chunk(r#"{"choices":[{"text":"a","finish_reason":null}]}"#, now, &mut t)?;
        on_chunk(
            r#"{"choices":[{"delta":{"content":"b"},"finish_reason":"length"}]}"#,
            now,
            &mut t,
        )?;
        // A token whose text is empty is still a token; a chat role chunk is not.
        on_chunk(r#"{"choices":[{"text":"","finish_reason":null}]}"#, now, &mut t)?;
        on_chunk(
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            now,
            &mut t,
        )?;
        on_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            now,
            &mut t,
        )?;
        assert_eq!(t.chunk_times.len(), 3);
        assert_eq!((t.prompt_tokens, t.output_tokens), (3, 2));
        assert_eq!(t.finish_reason, "length");
        assert!(on_chunk(r#"{"error":{"message":"boom"}}"#, now, &mut t).is_err());
        Ok(())
    }
}
