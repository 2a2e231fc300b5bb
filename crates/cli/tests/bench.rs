//! `multilora bench` end to end, through the built binary on the demo model: every output file
//! with its columns and row counts, decode steps numbering exactly N − 1 per batch, and each
//! error a user will meet failing with a clear message, a non-zero exit and no report left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

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
    // What ran, after dtype resolution: the CPU computes in f32.
    ensure!(run["backends"]["multi-lora"]["resolved"]["dtype"] == "float32");
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
/// steps; the run still measures, and its notes say so.
#[test]
fn chunked_prefill_is_noted() -> Result<()> {
    let f = Fixture::new()?;
    f.write_common(json!({ "max_num_batched_tokens": 8 }))?;
    let out = f.bench(&[
        "no-lora",
        "--batch-sizes",
        "2",
        "--warmup-num-tokens",
        "0",
        "--json",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bench failed: {stderr}");
    let result: Value = serde_json::from_slice(&out.stdout).context("--json prints JSON")?;
    let notes = result["summary"][0]["notes"].to_string();
    ensure!(notes.contains("prefill chunked"), "{notes}");
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
    ensure!(e.contains("above max_model_len 24"), "{e}");
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
    f.write_common(json!({ "max_loras": "many", "surprise": 1 }))?;
    let e = f.fails(&["multi-lora"])?;
    ensure!(
        e.contains("common.json: key \"max_loras\" must be a positive integer, got \"many\""),
        "{e}"
    );
    ensure!(e.contains("unknown key \"surprise\""), "{e}");
    Ok(())
}

#[test]
fn a_broken_adapter_mid_run_leaves_no_report() -> Result<()> {
    let f = Fixture::new()?;
    multilora_engine::demo::ensure_demo(&f.path("demo"), 0)?;
    // The third adapter is first needed at batch 3, after batch 1 was measured.
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
