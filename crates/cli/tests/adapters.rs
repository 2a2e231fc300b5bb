//! `multilora adapters synth` through the binary: adapters that fit a `config.json`-only base
//! model and load in the engine, the matching `adapters.json` group, and reruns that never
//! mix adapters of different shapes.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::ModelConfig;
use serde_json::Value;

fn synth(dir: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_multilora"))
        .args(["adapters", "synth", "--model", "model", "--out", "loras"])
        .args(args)
        .current_dir(dir)
        .output()?)
}

#[test]
fn synth_writes_loadable_adapters_and_their_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::create_dir(d.join("model"))?;
    std::fs::write(
        d.join("model/config.json"),
        multilora_engine::demo::demo_config_json().to_string(),
    )?;
    let out = synth(
        d,
        &[
            "--num",
            "3",
            "--rank",
            "4",
            "--target-modules",
            "q_proj,v_proj,down_proj",
        ],
    )?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let cfg = ModelConfig::from_dir(&d.join("model"))?;
    for i in 0..3 {
        let name = format!("lora-{i:03}");
        let a = LoraAdapter::load(&name, &d.join("loras").join(&name), &cfg, 16)?;
        ensure!(a.rank == 4, "rank {}", a.rank);
        ensure!(a.targets().iter().count() == 3, "{}", a.targets());
        let c: Value = serde_json::from_str(&std::fs::read_to_string(
            d.join("loras").join(&name).join("adapter_config.json"),
        )?)?;
        ensure!(c["lora_alpha"] == 8.0 && c["peft_type"] == "LORA", "{c}");
    }
    let groups: Value = serde_json::from_str(&std::fs::read_to_string(d.join("loras/adapters.json"))?)?;
    ensure!(
        groups[0]["rank"] == 4 && groups[0]["adapters"].as_array().map(Vec::len) == Some(3),
        "{groups}"
    );
    ensure!(groups[0]["adapters"][2]["name"] == "lora-002");

    // Another rank under another prefix adds a group beside the first.
    let out = synth(d, &["--num", "2", "--rank", "8", "--prefix", "r8"])?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let groups: Value = serde_json::from_str(&std::fs::read_to_string(d.join("loras/adapters.json"))?)?;
    let ranks: Vec<u64> = groups
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["rank"].as_u64())
        .collect();
    ensure!(ranks == [4, 8], "{ranks:?}");

    // The same names with another rank would list rank-4 folders as rank 8: refused.
    let out = synth(d, &["--num", "3", "--rank", "8"])?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && e.contains("lora-000 already holds an adapter with r 4"),
        "{e}"
    );
    Ok(())
}

/// Generated weights are readable by other users (a vLLM server running as another user) as
/// the umask allows: 0644 under umask 022, 0600 under 077.
#[test]
fn generated_files_follow_the_umask() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let bin = env!("CARGO_BIN_EXE_multilora");
    for (umask, mode) in [("022", 0o644), ("077", 0o600)] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask} && \"$0\" demo --dir demo-{umask} && \"$0\" adapters synth --model demo-{umask}/model --out synth-{umask} --num 1 --rank 4"
            ))
            .arg(bin)
            .current_dir(d)
            .output()?;
        ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for file in [
            format!("demo-{umask}/model/model.safetensors"),
            format!("demo-{umask}/model/config.json"),
            format!("demo-{umask}/adapters/demo-r16-000/adapter_model.safetensors"),
            format!("synth-{umask}/lora-000/adapter_model.safetensors"),
            format!("synth-{umask}/adapters.json"),
        ] {
            let got = std::fs::metadata(d.join(&file))?.permissions().mode() & 0o777;
            ensure!(
                got == mode,
                "{file}: {got:o} under umask {umask}, expected {mode:o}"
            );
        }
    }
    let out = synth(d, &["--rank", "0"])?;
    let e = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && e.contains("--rank must be at least 1"),
        "{e}"
    );
    Ok(())
}
