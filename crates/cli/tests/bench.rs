//! `multilora bench` end to end, through the built binary on the demo model: every output file
//! with its columns and row counts, decode steps numbering exactly N − 1 per batch, each
//! error a user will meet failing before any measurement with a clear message, a non-zero exit
//! and no report left, and an interrupted run keeping what it measured until `--resume`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

mod first_point;

const NUM_TOKENS: usize = 5;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A config folder in a temp dir pointing at a demo there (written by the bench itself on
    /// first use), 4 rank-16 adapters, the repository's prompts.
    fn new() -> Result<Fixture> {
        let f = Fixture {
            dir: tempfile::tempdir()?,
        };
        let repo_prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/prompts.json");
        std::fs::copy(repo_prompts, f.path("prompts.json"))?;
        f.write_adapters(&(0..4).map(|i| format!("demo-r16-{i:03}")).collect::<Vec<_>>())?;
        f.write_common(json!({}))?;
        Ok(f)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write_adapters(&self, names: &[String]) -> Result<()> {
        let entries: Vec<Value> = names.iter().map(|n| json!({ "name": n })).collect();
        let groups = json!([{ "rank": 16, "adapters": entries }]);
        Ok(std::fs::write(self.path("adapters.json"), groups.to_string())?)
    }

    /// The original's keys; `extra` overrides or adds.
    fn write_common(&self, extra: Value) -> Result<()> {
        let mut c = json!({
            "base_model_path": self.path("demo/model"),
            "dtype": "auto",
            "enable_lora": true,
            "max_loras": 4,
            "max_lora_rank": 16,
            "max_cpu_loras": 8,
            "enforce_eager": true,
            "max_model_len": 128,
            "gpu_memory_utilization": 0.9,
            "tensor_parallel_size": 1,
            "disable_async_output_proc": true,
            "max_num_seqs": 8,
            "random_seed": 0,
            "no_lora_prompts_path": self.path("prompts.json"),
            "lora_adapters_config_path": self.path("adapters.json"),
            "lora_adapters_path": self.path("demo/adapters"),
            "report_dir": self.path("reports"),
            "num_tokens": NUM_TOKENS,
            "warmup_num_tokens": 2,
            "workload_type": "all",
            "identical_lora_id": 1,
        });
        let map = c.as_object_mut().context("object")?;
        for (k, v) in extra.as_object().context("object")? {
            map.insert(k.clone(), v.clone());
        }
        Ok(std::fs::write(self.path("common.json"), c.to_string())?)
    }

    fn bench(&self, args: &[&str]) -> Result<Output> {
        let config = self.path("common.json");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_multilora"));
        cmd.arg("bench").args(args).arg("--config").arg(&config);
        cmd.current_dir(self.dir.path());
        Ok(cmd.output()?)
    }

    /// Runs a bench that must fail; returns its stderr after checking that nothing was left
    /// in the report folder.
    fn fails(&self, args: &[&str]) -> Result<String> {
        let out = self.bench(args)?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(!out.status.success(), "expected a failure, got success: {stderr}");
        let reports = self.path("reports");
        if reports.exists() {
            let left: Vec<_> = std::fs::read_dir(&reports)?.collect();
            ensure!(
                left.is_empty(),
                "a failed run left {left:?} in {}",
                reports.display()
            );
        }
        Ok(stderr)
    }
}

fn csv(path: &Path) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect())
}

#[test]
fn multi_lora_writes_every_file_and_n_minus_1_decode_steps() -> Result<()> {
    let f = Fixture::new()?;
    let out = f.bench(&["multi-lora", "--batch-sizes", "1,3", "--json"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bench failed: {stderr}");
    ensure!(stderr.contains("wrote the missing demo"), "{stderr}");
    let result: Value = serde_json::from_slice(&out.stdout).context("--json prints JSON")?;
    let report = PathBuf::from(result["report_dir"].as_str().context("report_dir")?);
    let report = if report.is_absolute() {
        report
    } else {
        f.path("").join(report)
    };
    ensure!(
        report.parent() == Some(f.path("reports").as_path()),
        "{}",
        report.display()
    );
    ensure!(result["summary"].as_array().map(Vec::len) == Some(4 * 2));

    for series in ["no-lora", "distinct", "uniform", "identical"] {
        let dir = report.join(series);
        let per_batch = csv(&dir.join("per_batch_latency.csv"))?;
        ensure!(
            per_batch[0]
                == [
                    "batch_size",
                    "prefill_latency_ms",
                    "decode_latency_ms",
                    "e2e_latency_ms"
                ]
        );
        ensure!(per_batch.len() == 3, "{series}: {per_batch:?}");
        for (row, b) in per_batch[1..].iter().zip([1usize, 3]) {
            ensure!(row[0] == b.to_string());
            let v: Vec<f64> = row[1..].iter().map(|x| x.parse()).collect::<Result<_, _>>()?;
            ensure!(v.iter().all(|&x| x > 0.0), "{series}: {row:?}");
            ensure!(v[2] >= v[0] + v[1], "e2e covers prefill and decode: {row:?}");
            let req = csv(&dir.join(format!("per_request_latency-{b}.csv")))?;
            ensure!(req[0].join(",") == "#tokens,first_token_time,completion_time,prompt_num_tokens,output_num_tokens,finish_reason,tokens_per_second,latency");
            ensure!(req.len() == 1 + b, "{series} {b}: {} rows", req.len() - 1);
            for r in &req[1..] {
                ensure!(
                    r[0] == NUM_TOKENS.to_string() && r[4] == NUM_TOKENS.to_string() && r[5] == "length",
                    "{r:?}"
                );
            }
            let steps = csv(&dir.join(format!("step_latency-{b}.csv")))?;
            ensure!(steps[0] == ["step_latency_ms"]);
            ensure!(steps.len() > NUM_TOKENS, "{series} {b}: S = {}", steps.len() - 1);
        }
    }

    // steps.csv: exactly N − 1 decode steps per batch, each running the whole batch, no prefill.
    let steps = csv(&report.join("steps.csv"))?;
    ensure!(steps[0][..6] == ["mode", "workload", "batch_size", "repeat", "step", "phase"]);
    for workload in ["none", "distinct", "uniform", "identical"] {
        for b in ["1", "3"] {
            let rows: Vec<&Vec<String>> = steps.iter().filter(|r| r[1] == workload && r[2] == b).collect();
            let decode: Vec<&&Vec<String>> = rows.iter().filter(|r| r[5] == "decode").collect();
            ensure!(
                decode.len() == NUM_TOKENS - 1,
                "{workload} {b}: {} decode steps",
                decode.len()
            );
            ensure!(rows.len() > decode.len(), "at least one prefill step");
            for r in decode {
                ensure!(
                    r[8] == b && r[9] == "0",
                    "decode step holds the batch, no prefill: {r:?}"
                );
            }
        }
    }

    let summary = csv(&report.join("summary.csv"))?;
    ensure!(summary.len() == 1 + 4 * 2);
    let col = |name: &str| summary[0].iter().position(|h| h == name).context("column");
    let (overhead, decode_steps) = (col("decode_overhead_pct")?, col("decode_steps")?);
    for row in &summary[1..] {
        ensure!(row[decode_steps] == (NUM_TOKENS - 1).to_string());
        // Overhead exactly where a LoRA row has its no-LoRA row.
        ensure!((row[0] == "multi-lora") != row[overhead].is_empty(), "{row:?}");
    }

    let run: Value = serde_json::from_str(&std::fs::read_to_string(report.join("run.json"))?)?;
    for key in [
        "git_revision",
        "start_time",
        "multilora_version",
        "config",
        "engine_config",
        "backends",
    ] {
        ensure!(!run[key].is_null(), "run.json lacks {key}");
    }
    ensure!(run["engine_config"]["max_loras"] == 4);
    ensure!(run["backends"]["multi-lora"]["model"]["hidden_size"] == 256);
    // What ran, after dtype resolution: the demo checkpoint is bf16, and `auto` keeps the
    // CPU's weights in the checkpoint's dtype.
    ensure!(run["backends"]["multi-lora"]["resolved"]["dtype"] == "bfloat16");
    let svg = std::fs::read_to_string(report.join("latency.svg"))?;
    ensure!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 4 * 3);

    // A second run never overwrites the first.
    let again = f.bench(&[
        "no-lora",
        "--batch-sizes",
        "2",
        "--warmup-num-tokens",
        "0",
        "--repeat",
        "2",
    ])?;
    ensure!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let reports: Vec<_> = std::fs::read_dir(f.path("reports"))?.collect();
    ensure!(reports.len() == 2, "{reports:?}");
    let table = String::from_utf8_lossy(&again.stdout);
    ensure!(table.starts_with("mode") && table.contains("no-lora"), "{table}");
    Ok(())
}

/// A `max_num_batched_tokens` below the batch's prompts chunks their prefill over several
/// steps, and so does a `long_prefill_token_threshold` below them (common.json or the flag);
/// the run still measures, and its notes say so.
#[test]
fn chunked_prefill_is_noted() -> Result<()> {
    for (common, flags) in [
        (json!({ "max_num_batched_tokens": 8 }), vec![]),
        (json!({ "long_prefill_token_threshold": 3 }), vec![]),
        (json!({}), vec!["--long-prefill-token-threshold", "3"]),
    ] {
        let f = Fixture::new()?;
        f.write_common(common.clone())?;
        let mut args = vec![
            "no-lora",
            "--batch-sizes",
            "2",
            "--warmup-num-tokens",
            "0",
            "--json",
        ];
        args.extend(flags.iter().copied());
        let out = f.bench(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "bench failed ({common} {flags:?}): {stderr}"
        );
        let result: Value = serde_json::from_slice(&out.stdout).context("--json prints JSON")?;
        let notes = result["summary"][0]["notes"].to_string();
        ensure!(notes.contains("prefill chunked"), "{common} {flags:?}: {notes}");
    }
    Ok(())
}

#[test]
fn distinct_needs_as_many_adapters_as_the_batch() -> Result<()> {
    let f = Fixture::new()?;
    let e = f.fails(&["multi-lora", "--workload", "distinct", "--batch-sizes", "2,6"])?;
    ensure!(
        e.contains("workload distinct at batch size 6 needs 6 adapters") && e.contains("lists 4"),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_missing_adapter_folder_is_named() -> Result<()> {
    let f = Fixture::new()?;
    f.write_adapters(&["demo-r16-000".into(), "no-such-adapter".into()])?;
    let e = f.fails(&["multi-lora", "--workload", "distinct", "--batch-sizes", "2"])?;
    ensure!(e.contains("no-such-adapter") && e.contains("is missing"), "{e}");
    Ok(())
}

#[test]
fn no_group_of_max_lora_rank() -> Result<()> {
    let f = Fixture::new()?;
    let e = f.fails(&["multi-lora", "--max-lora-rank", "8", "--batch-sizes", "1"])?;
    ensure!(e.contains("no group has rank 8") && e.contains("[16]"), "{e}");
    Ok(())
}

#[test]
fn identical_lora_id_out_of_range() -> Result<()> {
    let f = Fixture::new()?;
    let e = f.fails(&[
        "multi-lora",
        "--workload",
        "identical",
        "--identical-lora-id",
        "4",
        "--batch-sizes",
        "1",
    ])?;
    ensure!(
        e.contains("identical_lora_id 4") && e.contains("out of range"),
        "{e}"
    );
    Ok(())
}

#[test]
fn batch_size_above_max_num_seqs() -> Result<()> {
    let f = Fixture::new()?;
    let e = f.fails(&["no-lora", "--batch-sizes", "1,16"])?;
    ensure!(e.contains("batch size 16 is above max_num_seqs 8"), "{e}");
    Ok(())
}

#[test]
fn prompt_plus_num_tokens_above_max_model_len() -> Result<()> {
    let f = Fixture::new()?;
    let e = f.fails(&[
        "no-lora",
        "--batch-sizes",
        "1",
        "--max-model-len",
        "24",
        "--num-tokens",
        "16",
    ])?;
    ensure!(
        e.contains("above max_model_len 24") && e.contains("prompt 0 of "),
        "{e}"
    );
    Ok(())
}

#[test]
fn report_dir_that_cannot_be_written() -> Result<()> {
    let f = Fixture::new()?;
    std::fs::write(f.path("a-file"), "")?;
    let out = f.bench(&["no-lora", "--batch-sizes", "1", "--report-dir", "a-file/reports"])?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && e.contains("creating report_dir a-file/reports"),
        "{e}"
    );
    Ok(())
}

#[test]
fn fewer_prompts_than_the_batch() -> Result<()> {
    let f = Fixture::new()?;
    std::fs::write(f.path("prompts.json"), r#"[{"prompt": "a"}, {"prompt": "b"}]"#)?;
    let e = f.fails(&["no-lora", "--batch-sizes", "1,3"])?;
    ensure!(
        e.contains("prompts.json holds 2 prompts, fewer than batch size 3"),
        "{e}"
    );
    Ok(())
}

#[test]
fn config_errors_name_the_key_and_file() -> Result<()> {
    let f = Fixture::new()?;
    f.write_common(json!({ "max_loras": "many" }))?;
    let e = f.fails(&["multi-lora"])?;
    ensure!(
        e.contains("common.json: key \"max_loras\" must be a positive integer, got \"many\""),
        "{e}"
    );
    Ok(())
}

#[test]
fn a_misspelt_key_is_an_error_with_a_suggestion() -> Result<()> {
    let f = Fixture::new()?;
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(f.path("common.json"))?)?;
    let map = c.as_object_mut().context("object")?;
    map.remove("max_loras");
    map.insert("max_lora".into(), json!(4));
    map.insert("surprise".into(), json!(1));
    std::fs::write(f.path("common.json"), c.to_string())?;
    let e = f.fails(&["multi-lora", "--batch-sizes", "1"])?;
    ensure!(
        e.contains("unknown key \"max_lora\" (did you mean \"max_loras\"?), \"surprise\"")
            && e.contains("--allow-unknown-keys"),
        "{e}"
    );
    // Checked before anything is written: no demo either.
    ensure!(!f.path("demo").exists());
    let out = f.bench(&["no-lora", "--batch-sizes", "1", "--allow-unknown-keys"])?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{e}");
    ensure!(
        e.contains("warning:")
            && e.contains("unknown key \"max_lora\" (did you mean \"max_loras\"?) ignored"),
        "{e}"
    );
    Ok(())
}

/// The report folder of a run, from `--json`'s `report_dir`.
fn report_dir(f: &Fixture, out: &Output) -> Result<PathBuf> {
    let result: Value = serde_json::from_slice(&out.stdout).context("--json prints JSON")?;
    let report = PathBuf::from(result["report_dir"].as_str().context("report_dir")?);
    Ok(f.path("").join(report))
}

/// The original's files (see the original benchmark's description): these headers, one
/// per_batch row per batch size, one per_request row per request, one step row per step.
const ORIGINAL_PER_BATCH: &str = "batch_size,prefill_latency_ms,decode_latency_ms,e2e_latency_ms";
const ORIGINAL_PER_REQUEST: &str = "#tokens,first_token_time,completion_time,prompt_num_tokens,output_num_tokens,finish_reason,tokens_per_second,latency";

#[test]
fn repeats_leave_the_originals_files_as_the_original_writes_them() -> Result<()> {
    let f = Fixture::new()?;
    f.write_common(json!({ "repeat": 3 }))?;
    let out = f.bench(&[
        "multi-lora",
        "--workload",
        "uniform",
        "--batch-sizes",
        "1,3",
        "--json",
    ])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = report_dir(&f, &out)?;
    for series in ["no-lora", "uniform"] {
        let dir = report.join(series);
        let text = std::fs::read_to_string(dir.join("per_batch_latency.csv"))?;
        let lines: Vec<&str> = text.lines().collect();
        ensure!(lines[0] == ORIGINAL_PER_BATCH, "{series}: {text}");
        ensure!(lines.len() == 1 + 2, "{series}: one row per batch size: {text}");
        for b in [1usize, 3] {
            let text = std::fs::read_to_string(dir.join(format!("per_request_latency-{b}.csv")))?;
            let lines: Vec<&str> = text.lines().collect();
            ensure!(
                lines[0] == ORIGINAL_PER_REQUEST && lines.len() == 1 + b,
                "{series} {b}: {text}"
            );
            let steps = csv(&dir.join(format!("step_latency-{b}.csv")))?;
            ensure!(steps[0] == ["step_latency_ms"] && steps.iter().all(|r| r.len() == 1));
            // One run's steps: prefill then N − 1 decode steps.
            ensure!(steps.len() == 1 + 1 + NUM_TOKENS - 1, "{series} {b}: {steps:?}");
        }
    }
    // Every repeat in our own files.
    let runs = csv(&report.join("runs.csv"))?;
    ensure!(runs.len() == 1 + 2 * 2 * 3, "{runs:?}");
    let shown = runs
        .iter()
        .filter(|r| r.last().map(String::as_str) == Some("true"))
        .count();
    ensure!(
        shown == 2 * 2,
        "one run per point in the original's files: {runs:?}"
    );
    let requests = csv(&report.join("requests.csv"))?;
    ensure!(requests.len() == 1 + 2 * 3 * (1 + 3), "{}", requests.len());
    let summary = csv(&report.join("summary.csv"))?;
    ensure!(summary[1..].iter().all(|r| r[3] == "3"), "{summary:?}");
    Ok(())
}

#[test]
fn config_paths_resolve_beside_the_config_from_any_directory() -> Result<()> {
    let f = Fixture::new()?;
    let cfg = f.path("cfg");
    std::fs::create_dir(&cfg)?;
    std::fs::rename(f.path("prompts.json"), cfg.join("prompts.json"))?;
    std::fs::rename(f.path("adapters.json"), cfg.join("adapters.json"))?;
    // As users write them, relative to the config's folder.
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(f.path("common.json"))?)?;
    for (k, v) in [
        ("base_model_path", "../demo/model"),
        ("no_lora_prompts_path", "prompts.json"),
        ("lora_adapters_config_path", "adapters.json"),
        ("lora_adapters_path", "../demo/adapters"),
        ("report_dir", "../reports"),
    ] {
        c[k] = json!(v);
    }
    std::fs::write(cfg.join("common.json"), c.to_string())?;
    // The working directory sits one level down in a folder of its own, so the config's `../`
    // paths, tried against it too, cannot land on anything outside the test (a `/tmp/demo`).
    let outside = tempfile::tempdir()?;
    let elsewhere = outside.path().join("cwd");
    std::fs::create_dir(&elsewhere)?;
    let run = |extra: &[&str]| -> Result<Output> {
        Ok(Command::new(env!("CARGO_BIN_EXE_multilora"))
            .args([
                "bench",
                "multi-lora",
                "--workload",
                "distinct",
                "--batch-sizes",
                "1",
            ])
            .args(extra)
            .arg("--config")
            .arg(cfg.join("common.json"))
            .current_dir(&elsewhere)
            .output()?)
    };
    let out = run(&[])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The demo and the report where the config points, nothing in the working directory.
    ensure!(f.path("demo/model/config.json").is_file());
    ensure!(std::fs::read_dir(f.path("reports"))?.count() == 1);
    ensure!(std::fs::read_dir(&elsewhere)?.next().is_none());
    ensure!(
        std::fs::read_dir(outside.path())?.count() == 1,
        "only the working directory there"
    );

    // A path in neither place: the key, the file, the value and both places looked.
    c["no_lora_prompts_path"] = json!("nope/prompts.json");
    std::fs::write(cfg.join("common.json"), c.to_string())?;
    let out = run(&[])?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{e}");
    ensure!(
        e.contains("common.json: key \"no_lora_prompts_path\" is \"nope/prompts.json\", which is not at")
            && e.contains(&format!(
                "{} (beside the config)",
                cfg.join("nope/prompts.json").display()
            ))
            && e.contains(&format!(
                "{} (the working directory)",
                elsewhere.join("nope/prompts.json").display()
            )),
        "{e}"
    );
    // A wrong base_model_path names its key before anything is written.
    c["no_lora_prompts_path"] = json!("prompts.json");
    c["base_model_path"] = json!("../no-model");
    std::fs::write(cfg.join("common.json"), c.to_string())?;
    let e = String::from_utf8_lossy(&run(&[])?.stderr).into_owned();
    ensure!(e.contains("key \"base_model_path\" is \"../no-model\""), "{e}");
    Ok(())
}

#[test]
fn a_broken_adapter_fails_before_anything_is_measured() -> Result<()> {
    let f = Fixture::new()?;
    multilora_engine::demo::ensure_demo(&f.path("demo"), 0)?;
    // Truncated weights of an adapter first used at the last batch size.
    let weights = f.path("demo/adapters/demo-r16-003/adapter_model.safetensors");
    let len = std::fs::metadata(&weights)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)?
        .set_len(len / 2)?;
    let e = f.fails(&["multi-lora", "--workload", "distinct", "--batch-sizes", "1,4"])?;
    ensure!(
        e.contains("demo-r16-003") && e.contains("index 3 in the rank-16 group"),
        "{e}"
    );
    // Before the no-LoRA baseline: no progress line was printed.
    ensure!(!e.contains("[1/"), "{e}");
    Ok(())
}

/// Starts a long run, Ctrl-C's it after its first point, and resumes it.
#[test]
fn ctrl_c_keeps_every_measured_point_and_resume_finishes_the_report() -> Result<()> {
    let f = Fixture::new()?;
    // Long enough (seconds) that the interrupt lands mid-run.
    f.write_common(json!({ "max_model_len": 1024, "max_num_seqs": 8, "num_tokens": 300 }))?;
    let sizes = "1,2,3,4,5,6,7,8";
    let child = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["bench", "no-lora", "--batch-sizes", sizes, "--config"])
        .arg(f.path("common.json"))
        .current_dir(f.path(""))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let report = first_point::wait_for_first_point(&f.path("reports"))?;
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(kill.success());
    let out = child.wait_with_output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(130), "{:?}: {e}", out.status);
    ensure!(
        e.contains("interrupted: partial report") && e.contains("--resume"),
        "{e}"
    );
    // A valid report of what was measured, and a note of what is missing.
    let per_batch = csv(&report.join("no-lora/per_batch_latency.csv"))?;
    let num_done = per_batch.len() - 1;
    ensure!((1..8).contains(&num_done), "{per_batch:?}");
    ensure!(per_batch[0].join(",") == ORIGINAL_PER_BATCH);
    let run: Value = serde_json::from_str(&std::fs::read_to_string(report.join("run.json"))?)?;
    ensure!(run["status"] == "interrupted", "{}", run["status"]);
    ensure!(run["missing_points"].as_array().map(Vec::len) == Some(8 - num_done));
    let note = std::fs::read_to_string(report.join("INCOMPLETE.txt"))?;
    ensure!(
        note.contains("Missing: no-lora batch 8") || note.contains("no-lora batch 8."),
        "{note}"
    );

    // --resume measures only the rest, into the same folder.
    let out = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["bench", "no-lora", "--json", "--resume"])
        .arg(&report)
        .output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{e}");
    ensure!(
        e.contains(&format!("[{}/8]", num_done + 1)) && !e.contains("[1/8]"),
        "{e}"
    );
    let per_batch = csv(&report.join("no-lora/per_batch_latency.csv"))?;
    let sizes_written: Vec<&str> = per_batch[1..].iter().map(|r| r[0].as_str()).collect();
    ensure!(
        sizes_written == ["1", "2", "3", "4", "5", "6", "7", "8"],
        "{per_batch:?}"
    );
    ensure!(!report.join("INCOMPLETE.txt").exists());
    let run: Value = serde_json::from_str(&std::fs::read_to_string(report.join("run.json"))?)?;
    ensure!(run["status"] == "complete" && run["resumed"].as_array().map(Vec::len) == Some(1));
    ensure!(
        std::fs::read_dir(f.path("reports"))?.count() == 1,
        "no second report"
    );

    // A resume whose settings changed is refused, naming what changed.
    f.write_common(json!({ "max_model_len": 1024, "max_num_seqs": 8, "num_tokens": 7 }))?;
    let out = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["bench", "no-lora", "--resume"])
        .arg(&report)
        .output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && e.contains("num_tokens was 300, now 7"),
        "{e}"
    );
    // Settings come from the report, not from flags beside --resume.
    let out = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["bench", "no-lora", "--batch-sizes", "1", "--resume"])
        .arg(&report)
        .output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && e.contains("give only --resume DIR (and --json), not --batch-sizes"),
        "{e}"
    );
    Ok(())
}

#[test]
fn json_into_a_closed_pipe_ends_quietly() -> Result<()> {
    let f = Fixture::new()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["bench", "no-lora", "--batch-sizes", "1", "--json", "--config"])
        .arg(f.path("common.json"))
        .current_dir(f.path(""))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // As `| head` does once it has its lines: the reader goes away.
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "{:?}: {e}", out.status);
    ensure!(!e.contains("panicked") && !e.contains("Broken pipe"), "{e}");
    Ok(())
}

#[test]
fn no_lora_refuses_lora_flags_and_hides_them() -> Result<()> {
    let f = Fixture::new()?;
    let e = f.fails(&["no-lora", "--max-loras", "4"])?;
    ensure!(e.contains("--max-loras is a LoRA setting"), "{e}");
    let help = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["bench", "no-lora", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    ensure!(help.contains("--max-num-seqs"), "{help}");
    for flag in [
        "--max-loras",
        "--max-lora-rank",
        "--max-cpu-loras",
        "--workload",
        "--no-baseline",
    ] {
        ensure!(!help.contains(flag), "{flag}: {help}");
    }
    Ok(())
}

/// Flags of `help` (clap's output) with no description.
fn undescribed_flags(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        // `-h, --help` or `--flag`, not a possible value's `- name: ...`.
        let is_flag = t.starts_with('-')
            && t.chars()
                .nth(1)
                .is_some_and(|c| c == '-' || c.is_ascii_alphabetic());
        if !is_flag {
            continue;
        }
        let same_line = t.split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
        let next_line = lines
            .get(i + 1)
            .map(|n| n.trim_start())
            .is_some_and(|n| !n.is_empty() && !n.starts_with('-'));
        if !same_line && !next_line {
            out.push(t.to_string());
        }
    }
    out
}

#[test]
fn every_flag_has_a_description() -> Result<()> {
    let sample = "Options:\n      --bare <X>\n      --told\n          Told.\n  -h, --help  Print help\n";
    ensure!(undescribed_flags(sample) == ["--bare <X>"]);
    for cmd in [
        &["bench", "no-lora"][..],
        &["bench", "multi-lora"],
        &["bench", "serving"],
        &["generate"],
        &["adapters", "synth"],
        &["demo"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_multilora"))
            .args(cmd)
            .arg("--help")
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        let missing = undescribed_flags(&help);
        ensure!(missing.is_empty(), "{cmd:?}: {missing:?}");
    }
    Ok(())
}

#[test]
fn a_broken_adapter_config_fails_before_anything_is_measured() -> Result<()> {
    let f = Fixture::new()?;
    multilora_engine::demo::ensure_demo(&f.path("demo"), 0)?;
    // The third adapter is first needed at batch 3, after batch 1 would be measured.
    std::fs::write(
        f.path("demo/adapters/demo-r16-002/adapter_config.json"),
        "{ not json",
    )?;
    let e = f.fails(&[
        "multi-lora",
        "--workload",
        "distinct",
        "--batch-sizes",
        "1,3",
        "--no-baseline",
    ])?;
    ensure!(e.contains("demo-r16-002"), "{e}");
    Ok(())
}
