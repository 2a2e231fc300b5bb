//! The original's two input files: `adapters.json` (groups of adapters by rank, each with an
//! optional prompt) and `prompts.json` (the no-LoRA prompts, `[{"prompt": ...}, ...]`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct AdapterEntry {
    pub name: String,
    pub prompt: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AdapterGroup {
    rank: usize,
    adapters: Vec<AdapterEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptEntry {
    Object { prompt: String },
    Text(String),
}

/// The adapters the benchmark draws from: the `adapters.json` group whose rank is
/// `max_lora_rank`, each with its prompt (its own, else the prompt at its index in
/// `prompts.json`) and folder.
#[derive(Debug, Clone)]
pub struct AdapterSet {
    pub file: PathBuf,
    pub rank: usize,
    pub names: Vec<String>,
    /// `None` where neither the entry nor `prompts.json` has one.
    pub prompts: Vec<Option<String>>,
    pub root: PathBuf,
}

impl AdapterSet {
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn path(&self, i: usize) -> PathBuf {
        self.root.join(&self.names[i])
    }
}

fn read<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: expected {what}", path.display()))
}

/// Reads `prompts.json`: a list of `{"prompt": "..."}` objects (plain strings are accepted too).
pub fn read_prompts(path: &Path) -> anyhow::Result<Vec<String>> {
    let entries: Vec<PromptEntry> = read(path, "a list of {\"prompt\": \"...\"} objects")?;
    Ok(entries
        .into_iter()
        .map(|e| match e {
            PromptEntry::Object { prompt } | PromptEntry::Text(prompt) => prompt,
        })
        .collect())
}

/// Reads `adapters.json` and picks the group of rank `max_lora_rank`.
pub fn read_adapters(
    path: &Path,
    max_lora_rank: usize,
    root: &Path,
    fallback_prompts: &[String],
) -> anyhow::Result<AdapterSet> {
    let groups: Vec<AdapterGroup> = read(
        path,
        "a list of groups [{\"rank\": R, \"adapters\": [{\"name\": ..., \"prompt\": ...}]}]",
    )?;
    let ranks: Vec<usize> = groups.iter().map(|g| g.rank).collect();
    let Some(group) = groups.into_iter().find(|g| g.rank == max_lora_rank) else {
        bail!(
            "{}: no group has rank {max_lora_rank} (max_lora_rank, which picks the group); its groups have ranks {ranks:?}",
            path.display()
        );
    };
    if group.adapters.is_empty() {
        bail!(
            "{}: the rank-{max_lora_rank} group lists no adapters",
            path.display()
        );
    }
    let prompts = group
        .adapters
        .iter()
        .enumerate()
        .map(|(i, a)| a.prompt.clone().or_else(|| fallback_prompts.get(i).cloned()))
        .collect();
    Ok(AdapterSet {
        file: path.to_path_buf(),
        rank: max_lora_rank,
        names: group.adapters.into_iter().map(|a| a.name).collect(),
        prompts,
        root: root.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_originals_files() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let prompts = dir.path().join("prompts.json");
        std::fs::write(&prompts, r#"[{"prompt": "one"}, {"prompt": "two"}, "three"]"#)?;
        let adapters = dir.path().join("adapters.json");
        std::fs::write(
            &adapters,
            r#"[{"rank": 8, "adapters": [{"name": "a8"}]},
                {"rank": 16, "adapters": [{"name": "sql-lora", "prompt": "SELECT"}, {"name": "b"}, {"name": "c"}, {"name": "d"}]}]"#,
        )?;
        let p = read_prompts(&prompts)?;
        assert_eq!(p, vec!["one", "two", "three"]);
        let set = read_adapters(&adapters, 16, Path::new("/loras"), &p)?;
        assert_eq!(set.names, vec!["sql-lora", "b", "c", "d"]);
        // Own prompt, else the prompt text at the same index (not the whole object).
        assert_eq!(
            set.prompts,
            vec![
                Some("SELECT".into()),
                Some("two".into()),
                Some("three".into()),
                None
            ]
        );
        assert_eq!(set.path(1), PathBuf::from("/loras/b"));
        Ok(())
    }

    #[test]
    fn a_missing_rank_names_the_ranks_there() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let adapters = dir.path().join("adapters.json");
        std::fs::write(&adapters, r#"[{"rank": 8, "adapters": [{"name": "a"}]}]"#)?;
        let e = format!("{:#}", read_adapters(&adapters, 16, dir.path(), &[]).unwrap_err());
        assert!(e.contains("no group has rank 16") && e.contains("[8]"), "{e}");
        std::fs::write(&adapters, r#"{"rank": 8}"#)?;
        let e = format!("{:#}", read_adapters(&adapters, 8, dir.path(), &[]).unwrap_err());
        assert!(e.contains("adapters.json: expected a list of groups"), "{e}");
        Ok(())
    }
}
