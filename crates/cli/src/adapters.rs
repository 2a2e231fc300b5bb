//! `multilora adapters synth`: PEFT adapters that fit a base model, for benchmarks over many
//! distinct adapters without downloads.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use multilora_engine::demo::{synth_adapter, SynthSpec};
use multilora_engine::lora::LoraTarget;
use multilora_engine::ModelConfig;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write N random PEFT adapters and the matching adapters.json group.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Base model directory (config.json is enough).
    #[arg(long)]
    model: PathBuf,
    /// Folder the adapters go into, one subfolder each (the config's lora_adapters_path).
    #[arg(long)]
    out: PathBuf,
    /// How many adapters to write.
    #[arg(long, default_value_t = 32)]
    num: usize,
    /// LoRA rank r of every adapter.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Defaults to 2 × rank.
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Comma-separated projections the adapters modify (PEFT's target_modules).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,o_proj")]
    target_modules: Vec<String>,
    /// Scale by lora_alpha / sqrt(r) instead of lora_alpha / r (PEFT's use_rslora).
    #[arg(long)]
    use_rslora: bool,
    /// Seed of the random weights (adapter i gets its own stream).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Adapter folder names are PREFIX-000, PREFIX-001, ...
    #[arg(long, default_value = "lora")]
    prefix: String,
    /// adapters.json to write (or add this rank's group to); default OUT/adapters.json.
    #[arg(long)]
    adapters_json: Option<PathBuf>,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Synth(a) = cmd;
    let targets = a
        .target_modules
        .iter()
        .map(|t| LoraTarget::from_name(t.trim()).with_context(|| format!("--target-modules: unknown module {t:?}; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.num == 0 {
        bail!("--num must be at least 1");
    }
    if a.rank == 0 {
        bail!("--rank must be at least 1");
    }
    let cfg = ModelConfig::from_dir(&a.model)?;
    let json_path = a
        .adapters_json
        .clone()
        .unwrap_or_else(|| a.out.join("adapters.json"));
    let mut groups: Vec<serde_json::Value> = if json_path.exists() {
        let text = std::fs::read_to_string(&json_path)
            .with_context(|| format!("reading {}", json_path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a list of rank groups", json_path.display()))?
    } else {
        Vec::new()
    };
    let base = std::fs::canonicalize(&a.model).unwrap_or(a.model.clone());
    let mut entries = Vec::new();
    let bar = indicatif::ProgressBar::new(a.num as u64);
    for i in 0..a.num {
        let name = format!("{}-{i:03}", a.prefix);
        let dir = a.out.join(&name);
        let spec = SynthSpec {
            rank: a.rank,
            lora_alpha: a.lora_alpha.unwrap_or(2.0 * a.rank as f32),
            targets: targets.clone(),
            use_rslora: a.use_rslora,
            seed: a.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        };
        if dir.exists() {
            // Kept, so a rerun is cheap, but only if it is what this run would write.
            check_existing(&dir, &spec)?;
        } else {
            synth_adapter(&dir, &cfg, &base.to_string_lossy(), &spec)?;
        }
        entries.push(serde_json::json!({"name": name}));
        bar.inc(1);
    }
    bar.finish_and_clear();
    groups.retain(|g| g.get("rank").and_then(|r| r.as_u64()) != Some(a.rank as u64));
    groups.push(serde_json::json!({"rank": a.rank, "adapters": entries}));
    let text = serde_json::to_string_pretty(&groups)? + "\n";
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    crate::generate::write_file_atomically(&json_path, text.as_bytes())?;
    eprintln!(
        "wrote {} rank-{} adapters under {} and {}",
        a.num,
        a.rank,
        a.out.display(),
        json_path.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// An adapter folder left by an earlier run must have this run's rank, alpha and targets;
/// otherwise the `adapters.json` group would list adapters of another shape.
fn check_existing(dir: &Path, spec: &SynthSpec) -> anyhow::Result<()> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} exists but is not an adapter; remove it or choose another --out or --prefix",
            dir.display()
        )
    })?;
    let c: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let mut want: Vec<&str> = spec.targets.iter().map(|t| t.name()).collect();
    want.sort_unstable();
    let mut have: Vec<&str> = c["target_modules"]
        .as_array()
        .map(|v| v.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    have.sort_unstable();
    let same = c["r"].as_u64() == Some(spec.rank as u64)
        && c["lora_alpha"].as_f64() == Some(f64::from(spec.lora_alpha))
        && have == want;
    if !same {
        bail!(
            "{} already holds an adapter with r {}, lora_alpha {}, target_modules {}; this run asks for r {}, lora_alpha {}, {:?}: remove it or choose another --out or --prefix",
            dir.display(),
            c["r"],
            c["lora_alpha"],
            c["target_modules"],
            spec.rank,
            spec.lora_alpha,
            want
        );
    }
    Ok(())
}
