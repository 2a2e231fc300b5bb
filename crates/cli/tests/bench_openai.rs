//! The benchmark's client mode end to end: `multilora serve` (the real binary, loopback) is
//! benchmarked by `multilora bench multi-lora --backend openai` with the same config files the
//! in-process benchmark reads, and by `multilora bench serving`; the report files are checked.

mod first_point;
mod server_process;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use server_process::ServerProcess;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const NUM_TOKENS: usize = 5;

fn csv_rows(path: &Path) -> Result<Vec<Vec<String>>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect())
}

fn multilora(dir: &Path, args: &[&str]) -> Result<std::process::Output, Box<dyn std::error::Error>> {
    Ok(Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(args)
        .current_dir(dir)
        .output()?)
}

/// `multilora bench serving` in `dir` against `base_url` with the prompts in `prompts`, the
/// report under `dir/reports`, and `args`.
fn bench_serving(
    dir: &Path,
    base_url: &str,
    prompts: &str,
    args: &[&str],
) -> Result<std::process::Output, Box<dyn std::error::Error>> {
    let mut all = vec!["bench", "serving", "--base-url", base_url, "--prompts", prompts];
    all.extend(["--report-dir", "reports"]);
    all.extend(args);
    multilora(dir, &all)
}

/// The demo, 4 adapters, the repository's prompts and one `common.json` for the server and
/// the benchmark in `dir`; `num_tokens` and `max_model_len` as given.
fn write_setup(dir: &Path, num_tokens: usize, max_model_len: usize) -> TestResult {
    multilora_engine::demo::ensure_demo(&dir.join("demo"), 0)?;
    let prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/prompts.json");
    std::fs::copy(prompts, dir.join("prompts.json"))?;
    let adapters: Vec<Value> = (0..4)
        .map(|i| json!({"name": format!("demo-r16-{i:03}")}))
        .collect();
    std::fs::write(
        dir.join("adapters.json"),
        json!([{"rank": 16, "adapters": adapters}]).to_string(),
    )?;
    // One config for the server and the benchmark, relative paths as users write them.
    std::fs::write(
        dir.join("common.json"),
        json!({
            "base_model_path": "demo/model", "enable_lora": true, "max_loras": 4,
            "max_lora_rank": 16, "max_cpu_loras": 8, "max_model_len": max_model_len, "max_num_seqs": 8,
            "random_seed": 0, "no_lora_prompts_path": "prompts.json",
            "lora_adapters_config_path": "adapters.json", "lora_adapters_path": "demo/adapters",
            "report_dir": "reports", "num_tokens": num_tokens, "warmup_num_tokens": 2,
            "workload_type": "all", "identical_lora_id": 1,
        })
        .to_string(),
    )?;
    Ok(())
}

#[test]
fn client_mode_benchmarks_multilora_serve() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_setup(dir, NUM_TOKENS, 128)?;
    let server = ServerProcess::start(dir, &["--config", "common.json", "--served-model-name", "demo"])?;
    let base_url = format!("http://{}/v1", server.addr);

    let out = multilora(
        dir,
        &[
            "bench",
            "multi-lora",
            "--config",
            "common.json",
            "--backend",
            "openai",
            "--base-url",
            &base_url,
            "--batch-sizes",
            "1,2,4",
            "--repeat",
            "1",
            "--overwrite",
            "--json",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let reports = dir.join("reports");
    for series in ["no-lora", "distinct", "uniform", "identical"] {
        let per_batch = csv_rows(&reports.join(series).join("per_batch_latency.csv"))?;
        assert_eq!(
            per_batch[0],
            [
                "batch_size",
                "prefill_latency_ms",
                "decode_latency_ms",
                "e2e_latency_ms"
            ]
        );
        assert_eq!(per_batch.len(), 4, "{series}: {per_batch:?}");
        for row in &per_batch[1..] {
            let v: Vec<f64> = row[1..].iter().map(|x| x.parse()).collect::<Result<_, _>>()?;
            assert!(v.iter().all(|&x| x > 0.0), "{series}: {row:?}");
            assert!(
                v[0] < v[2] && v[1] < v[2],
                "prefill and decode within e2e: {row:?}"
            );
        }
        let per_request = csv_rows(&reports.join(series).join("per_request_latency-4.csv"))?;
        assert_eq!(per_request.len(), 5, "{series}: one row per request");
        for row in &per_request[1..] {
            assert_eq!(row[0], NUM_TOKENS.to_string(), "{series}: {row:?}");
            assert_eq!(row[5], "length", "{series}: {row:?}");
        }
        // A client sees no engine steps: no step files rather than empty ones.
        assert!(
            !reports.join(series).join("step_latency-4.csv").exists(),
            "{series}"
        );
    }
    assert!(!reports.join("steps.csv").exists());
    assert!(stderr.contains("client_latency_percentiles.csv"), "{stderr}");

    // Percentiles of TTFT, TPOT, ITL and e2e per series and batch size.
    let pct = csv_rows(&reports.join("client_latency_percentiles.csv"))?;
    let header = &pct[0];
    assert_eq!(
        header[..5],
        ["mode", "workload", "batch_size", "repeats", "num_requests"]
    );
    assert_eq!(pct.len(), 1 + 4 * 3, "4 series x 3 batch sizes: {pct:?}");
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or(format!("no column {name}"))
    };
    let (p50, p99) = (col("ttft_ms_p50")?, col("ttft_ms_p99")?);
    let (itl_mean, tpot_p90, e2e_max) = (col("itl_ms_mean")?, col("tpot_ms_p90")?, col("e2e_ms_max")?);
    for row in &pct[1..] {
        let v = |i: usize| row[i].parse::<f64>();
        assert_eq!(row[4], row[2], "one request per batch slot, one repeat: {row:?}");
        assert!(v(p50)? > 0.0 && v(p50)? <= v(p99)?, "{row:?}");
        assert!(v(itl_mean)? > 0.0 && v(tpot_p90)? > 0.0, "{row:?}");
        assert!(v(e2e_max)? >= v(p99)?, "e2e includes the first token: {row:?}");
    }
    let run: Value = serde_json::from_str(&std::fs::read_to_string(reports.join("run.json"))?)?;
    assert_eq!(
        run["client_latency_percentiles"].as_array().map(Vec::len),
        Some(12)
    );
    assert!(run["layout"]
        .as_str()
        .is_some_and(|l| l.contains("no step_latency")));
    let printed: Value = serde_json::from_slice(&out.stdout)?;
    // The no-LoRA batch of 1: the server streams one chunk per token, empty text or not, and
    // the client times tokens, so every gap between tokens is there.
    let num_itls = printed["client_latency_percentiles"][0]["itl_ms"]["count"].as_u64();
    assert_eq!(num_itls, Some(NUM_TOKENS as u64 - 1), "{printed}");
    assert_eq!(run["backends"]["multi-lora"]["backend"], "openai");
    // The benchmark loaded the four adapters into the server by name, as vLLM's API takes them,
    // all before the first measurement (so on the no-LoRA baseline's connection): a broken one
    // fails the run before anything is measured.
    let loaded = |key: &str| run["backends"][key]["adapters_loaded_by_benchmark"].as_u64();
    assert_eq!((loaded("no-lora"), loaded("multi-lora")), (Some(4), Some(0)));

    let out = bench_serving(
        dir,
        &base_url,
        "prompts.json",
        &[
            "--num-prompts",
            "24",
            "--max-concurrency",
            "6",
            "--adapter-popularity",
            "power-law",
            "--num-tokens",
            "6",
            "--slo-ttft-ms",
            "60000",
            "--json",
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serving bench failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let s = &v["summary"];
    assert_eq!(s["num_requests"], 24, "{s}");
    assert_eq!(s["num_failed"], 0, "{s}");
    // Every request has its figures (the demo's random weights stream many tokens of empty
    // text), every token its gap, and nothing is left out of the percentiles.
    assert_eq!(s["ttft_ms"]["count"], 24, "{s}");
    assert_eq!(s["tpot_ms"]["count"], 24, "{s}");
    assert_eq!(s["itl_ms"]["count"], 24 * 5, "{s}");
    assert_eq!(s["missing_figures"], json!([]), "{s}");
    assert!(
        s["num_adapters_used"]
            .as_u64()
            .is_some_and(|n| (1..=4).contains(&n)),
        "{s}"
    );
    assert_eq!(s["slo_attainment_pct"], 100.0, "{s}");
    // The server's own figures over the run: every request named an adapter, and the four
    // were in host memory before it (loaded by the benchmark above), so none loaded during it.
    let m = &s["server_adapter_metrics"];
    assert_eq!(m["adapter_wait_ms"]["count"], 24, "{s}");
    // Nobody waited: exactly 0, not an estimate within the first bucket.
    assert_eq!(m["adapter_wait_ms"]["p99"], 0.0, "{s}");
    assert_eq!(
        (&m["num_loads"], &m["num_load_failures"]),
        (&json!(0), &json!(0)),
        "{s}"
    );
    assert!(m["load_time_ms"].is_null(), "{s}");
    let report = Path::new(v["report_dir"].as_str().ok_or("report_dir")?);
    let requests = csv_rows(&dir.join(report).join("requests.csv"))?;
    assert_eq!(requests.len(), 25);
    assert!(
        requests[1..].iter().all(|r| r[4] == "6" && r[10].is_empty()),
        "{requests:?}"
    );
    let summary = csv_rows(&dir.join(report).join("summary.csv"))?;
    assert!(summary.iter().any(|r| r[0] == "itl_ms"), "{summary:?}");
    assert!(
        summary
            .iter()
            .any(|r| r[0] == "server_adapter_wait_ms" && r[1] == "24"),
        "{summary:?}"
    );

    // One token per request: no TPOT to give, and the report says so rather than dropping
    // them silently.
    let out = bench_serving(
        dir,
        &base_url,
        "prompts.json",
        &["--num-prompts", "4", "--num-tokens", "1"],
    )?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        printed.contains("note: no TPOT: 4 of 4 successful requests have fewer than 2 streamed tokens"),
        "{printed}"
    );
    assert!(!printed.contains("no TTFT"), "{printed}");
    assert!(printed.contains("Adapter wait p50 / p99 (ms):"), "{printed}");

    let (exit, rest) = server.terminate()?;
    assert!(exit.success(), "{rest:?}");
    Ok(())
}

/// Adapters that do not fit the server's host cache reload during the run: `bench serving`
/// reports those loads and the requests' waits from the server's `/metrics`.
#[test]
fn serving_reports_the_servers_adapter_loads_and_waits() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_setup(dir, NUM_TOKENS, 128)?;
    let modules: Vec<String> = (0..4)
        .map(|i| format!("a{i}=demo/adapters/demo-r16-{i:03}"))
        .collect();
    let mut args = vec!["--config", "common.json", "--served-model-name", "demo"];
    args.extend(["--max-loras", "1", "--max-cpu-loras", "1", "--lora-modules"]);
    args.extend(modules.iter().map(String::as_str));
    let server = ServerProcess::start(dir, &args)?;
    let base_url = format!("http://{}/v1", server.addr);
    let args = [
        "--num-prompts",
        "16",
        "--max-concurrency",
        "4",
        "--num-tokens",
        "3",
        "--json",
    ];
    let out = bench_serving(dir, &base_url, "prompts.json", &args)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let s = &v["summary"];
    assert_eq!(s["num_failed"], 0, "{s}");
    let m = &s["server_adapter_metrics"];
    assert_eq!(m["adapter_wait_ms"]["count"], 16, "{s}");
    // One adapter fits at a time: every change of adapter is a reload from disk, on the
    // loader threads, timed.
    let num_loads = m["num_loads"].as_u64().ok_or("num_loads")?;
    assert!(num_loads >= 2, "{s}");
    assert_eq!(m["load_time_ms"]["count"].as_u64(), Some(num_loads), "{s}");
    let (p50, p99) = (
        m["load_time_ms"]["p50"].as_f64(),
        m["load_time_ms"]["p99"].as_f64(),
    );
    assert!(p50.zip(p99).is_some_and(|(a, b)| a > 0.0 && a <= b), "{s}");
    // Some request arrived while another adapter held the only place: it waited (the mean is
    // exact; a percentile within the first bucket would be above 0 anyway).
    assert!(
        m["adapter_wait_ms"]["mean"].as_f64().is_some_and(|w| w > 0.0),
        "{s}"
    );
    let (exit, rest) = server.terminate()?;
    assert!(exit.success(), "{rest:?}");
    Ok(())
}

/// A server that dies mid-run fails the run, which keeps every point measured before.
#[test]
fn a_failure_mid_run_leaves_a_valid_partial_report() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // Long enough (seconds) that the server dies mid-run.
    write_setup(dir, 400, 1024)?;
    let server = ServerProcess::start(dir, &["--config", "common.json", "--served-model-name", "demo"])?;
    let base_url = format!("http://{}/v1", server.addr);
    let child = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args([
            "bench",
            "no-lora",
            "--config",
            "common.json",
            "--backend",
            "openai",
        ])
        .args([
            "--base-url",
            &base_url,
            "--batch-sizes",
            "1,2,3,4,5,6,7,8",
            "--repeat",
            "1",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let report = first_point::wait_for_first_point(&dir.join("reports"))?;
    drop(server);
    let out = child.wait_with_output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(
        e.contains("error: no-lora batch") && e.contains("partial report:"),
        "{e}"
    );
    let per_batch = csv_rows(&report.join("no-lora/per_batch_latency.csv"))?;
    assert!((2..9).contains(&per_batch.len()), "{per_batch:?}");
    let run: Value = serde_json::from_str(&std::fs::read_to_string(report.join("run.json"))?)?;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"].as_str().is_some_and(|m| m.contains(&base_url)),
        "{}",
        run["error"]
    );
    let note = std::fs::read_to_string(report.join("INCOMPLETE.txt"))?;
    assert!(
        note.contains("the run failed") && note.contains("--resume"),
        "{note}"
    );
    Ok(())
}

/// `--base-url https://...` speaks TLS (the client is built with it) and, against a server that
/// does not, fails with a message that says what to check: no network needed, a plain TCP
/// listener on loopback records what the client sent.
#[test]
fn https_base_url_speaks_tls_and_fails_cleanly_against_a_plain_server() -> TestResult {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let first_bytes = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut conn = loop {
            match listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = [0u8; 3];
        conn.read_exact(&mut buf)?;
        conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        Ok(buf.to_vec())
    });
    let tmp = tempfile::tempdir()?;
    let prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/prompts.json");
    let base_url = format!("https://{addr}/v1");
    let prompts = prompts.to_string_lossy();
    let out = bench_serving(tmp.path(), &base_url, &prompts, &["--num-prompts", "1"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("GET {base_url}/models: no HTTPS connection"))
            && stderr.contains("http:// --base-url"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let hello = first_bytes.join().map_err(|_| "the listener thread panicked")??;
    // A TLS record (type 22, handshake; version 3.x): the client spoke TLS, not plain HTTP.
    assert_eq!(hello[..2], [0x16, 0x03], "{hello:?}");
    let reports = tmp.path().join("reports");
    assert!(
        !reports.exists() || std::fs::read_dir(&reports)?.next().is_none(),
        "a failed run leaves no report"
    );
    Ok(())
}
