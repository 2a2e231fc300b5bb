//! Set-up shared by the fuzz targets: the demo model, written once per process, and a copy
//! of one of its adapters whose files a target overwrites.

use std::path::PathBuf;
use std::sync::OnceLock;

use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::{Error, ModelConfig};

pub struct Demo {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub model: ModelConfig,
    /// A writable copy of a demo adapter.
    pub adapter: PathBuf,
}

pub fn demo() -> &'static Demo {
    static DEMO: OnceLock<Demo> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let root = dir.path().to_path_buf();
        multilora_engine::demo::ensure_demo(&root, 0).expect("the demo model");
        let model = ModelConfig::from_dir(&root.join("model")).expect("the demo config");
        let adapter = root.join("fuzzed-adapter");
        std::fs::create_dir_all(&adapter).expect("a folder");
        for e in std::fs::read_dir(root.join("adapters/demo-r8-000")).expect("demo adapter") {
            let e = e.expect("an entry");
            std::fs::copy(e.path(), adapter.join(e.file_name())).expect("a copy");
        }
        Demo {
            _dir: dir,
            root,
            model,
            adapter,
        }
    })
}

/// Writes `data` as `file` of the adapter copy and loads it: errors are fine, only adapter
/// errors are, and a panic is what the fuzzer looks for.
pub fn load_with(file: &str, data: &[u8]) {
    let d = demo();
    let original = std::fs::read(d.adapter.join(file)).expect("the adapter file");
    std::fs::write(d.adapter.join(file), data).expect("a write");
    let result = LoraAdapter::load("fuzz", &d.adapter, &d.model, 16);
    std::fs::write(d.adapter.join(file), original).expect("a restore");
    if let Err(e) = result {
        assert!(
            matches!(e, Error::AdapterLoad { .. } | Error::AdapterRankTooLarge { .. }),
            "not an adapter error: {e}"
        );
    }
}
