//! `multilora serve` as users run it — the real binary on a loopback port — driven by a client
//! we did not write: the official `openai` Python package (`openai_client.py`).
//!
//! Python with `openai` is looked up in `$MULTILORA_TEST_PYTHON`, then `target/openai-venv`
//! (which `.ci/run` creates), then `python3`. Where none has it the test says so and passes,
//! unless `MULTILORA_REQUIRE_OPENAI=1` (set by `.ci/run`), where it fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn python_with_openai() -> Option<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("MULTILORA_TEST_PYTHON").map(PathBuf::from),
        Some(manifest.join("../../target/openai-venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    candidates.into_iter().flatten().find(|py| {
        Command::new(py)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Kills the server if the test fails before stopping it.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn openai_python_client_against_multilora_serve() -> TestResult {
    let Some(python) = python_with_openai() else {
        if std::env::var("MULTILORA_REQUIRE_OPENAI").is_ok_and(|v| v == "1") {
            return Err("MULTILORA_REQUIRE_OPENAI=1 but no Python with the openai package was found (set MULTILORA_TEST_PYTHON)".into());
        }
        eprintln!("SKIPPED: no Python with the openai package (run .ci/run, or set MULTILORA_TEST_PYTHON)");
        return Ok(());
    };
    let demo = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-openai-demo");
    multilora_engine::demo::ensure_demo(&demo, 0)?;
    let adapter = demo.join("adapters/demo-r8-000");
    let child = Command::new(env!("CARGO_BIN_EXE_multilora"))
        .arg("serve")
        .arg(demo.join("model"))
        .args([
            "--served-model-name",
            "demo",
            "--port",
            "0",
            "--api-key",
            "test-key",
        ])
        .args([
            "--max-model-len",
            "512",
            "--max-loras",
            "2",
            "--shutdown-timeout",
            "5",
        ])
        .arg("--lora-modules")
        .arg(format!("sql={}", adapter.display()))
        .arg(format!("chat={}", demo.join("adapters/demo-r16-000").display()))
        .stderr(Stdio::piped())
        .spawn()?;
    let mut server = ServerProcess(child);
    let stderr = server.0.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().ok_or("the server exited before listening")??;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().ok_or("no address")?.to_string();
        }
    };
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .args([&format!("http://{addr}/v1"), "test-key", "demo", "sql"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM: a clean stop with exit code 0.
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()?;
    assert!(status.success());
    let exit = server.0.wait()?;
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(exit.success(), "exit {exit:?}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    Ok(())
}
