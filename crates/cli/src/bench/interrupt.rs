//! Ctrl-C during a benchmark: the first one lets the run in progress finish and the report be
//! written with what was measured; a second one exits at once (the report on disk is valid
//! either way, since it is rewritten whole after every point).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Starts listening for Ctrl-C (once per process); the flag says whether one came.
pub fn install() -> &'static AtomicBool {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let listen = || -> std::io::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                loop {
                    tokio::signal::ctrl_c().await?;
                    if INTERRUPTED.swap(true, Ordering::Relaxed) {
                        std::process::exit(130);
                    }
                    eprintln!(
                        "\ninterrupted: finishing the run in progress, then writing the report (Ctrl-C again to quit now)"
                    );
                }
            })
        };
        // Without a listener Ctrl-C keeps its default (exit at once); the report written so far
        // stays valid.
        let spawned = std::thread::Builder::new()
            .name("ctrl-c".into())
            .spawn(move || {
                if let Err(e) = listen() {
                    eprintln!("warning: cannot listen for Ctrl-C: {e}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("warning: cannot listen for Ctrl-C: {e}");
        }
    });
    &INTERRUPTED
}
