//! `multilora serve` as users run it — the real binary on a loopback port — driven by a client
//! we did not write: the official `openai` Python package (`openai_client.py`).
//!
//! Python with `openai` is looked up in `$MULTILORA_TEST_PYTHON`, then `target/openai-venv`
//! (which `.ci/run` creates), then `python3`. Where none has it the test says so and passes,
//! unless `MULTILORA_REQUIRE_OPENAI=1` (set by `.ci/run`), where it fails.

mod server_process;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use server_process::ServerProcess;

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

/// transformers' loglikelihoods on the demo model (`scripts/make_golden_logprobs.py`).
fn golden_loglikelihood() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/golden/demo_loglikelihood.json")
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
    let sql = format!("sql={}", adapter.display());
    let chat = format!("chat={}", demo.join("adapters/demo-r16-000").display());
    let model = demo.join("model");
    let server = ServerProcess::start(
        &demo,
        &[
            &model.to_string_lossy(),
            "--served-model-name",
            "demo",
            "--api-key",
            "test-key",
            "--max-model-len",
            "512",
            "--max-loras",
            "2",
            "--shutdown-timeout",
            "5",
            // Long enough that only the shutdown timeout can end the slow client below.
            "--header-timeout",
            "600",
            "--lora-modules",
            &sql,
            &chat,
        ],
    )?;
    let addr = &server.addr;
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py"))
        .args([&format!("http://{addr}/v1"), "test-key", "demo", "sql"])
        .arg(golden_loglikelihood())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "openai client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SIGTERM: a clean stop with exit code 0, which a client that never finishes its headers
    // does not hold past --shutdown-timeout (5 s) by much; without the bound it would be held
    // until the header timeout (600 s).
    let mut slow = std::net::TcpStream::connect(addr)?;
    std::io::Write::write_all(&mut slow, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")?;
    let stopping = std::time::Instant::now();
    let (exit, rest) = server.terminate()?;
    let took = stopping.elapsed();
    assert!(exit.success(), "exit {exit:?}: {rest:?}");
    assert!(
        took < std::time::Duration::from_secs(60),
        "the process took {took:?} to stop"
    );
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
    Ok(())
}
