//! Facts about a run for `run.json` and the report folder's name: UTC timestamps (no time-zone
//! database needed) and the git revision of the source the binary was built from.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// UTC time as `2026-11-29T14:33:20Z` and as `20261129-143320` (for folder names).
pub fn utc(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    let (h, mi, se) = (s / 3600, s % 3600 / 60, s % 60);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{se:02}Z"),
        format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{se:02}"),
    )
}

/// `git rev-parse HEAD` of the source tree this binary was built from, else of the working
/// directory (a copy of the tree moved to another machine), plus whether it had uncommitted
/// changes; `"unknown"` where neither is a git checkout.
pub fn git_revision() -> (String, Option<bool>) {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = if built_from.exists() {
        built_from
    } else {
        Path::new(".")
    };
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(rev) if !rev.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
            (rev, dirty)
        }
        _ => ("unknown".into(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_utc() {
        assert_eq!(utc(UNIX_EPOCH).0, "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_962_800);
        assert_eq!(utc(t), ("2026-11-29T14:33:20Z".into(), "20261129-143320".into()));
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc(leap).0, "2000-02-29T00:00:00Z");
    }
}
