//! Waiting for a running benchmark's first measured point, for tests that stop a run midway.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The report folder under `reports` once it holds a measured point (its `points.jsonl`).
pub fn wait_for_first_point(reports: &Path) -> std::io::Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let found = std::fs::read_dir(reports)
            .ok()
            .and_then(|mut d| d.next())
            .transpose()?
            .map(|e| e.path())
            .filter(|d| d.join("points.jsonl").exists());
        if let Some(d) = found {
            return Ok(d);
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other("no point measured in 300 s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
