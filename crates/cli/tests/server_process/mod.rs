//! `multilora serve` as a child process on a free loopback port, for tests that drive the
//! real binary; killed when dropped if the test did not stop it.

use std::io::{BufRead, BufReader, Lines};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};

pub struct ServerProcess {
    child: Child,
    stderr: Lines<BufReader<ChildStderr>>,
    /// `host:port` it listens on.
    pub addr: String,
}

impl ServerProcess {
    /// Starts `multilora serve ARGS --port 0` in `dir` and waits until it listens. Runtime
    /// adapter loading is on, as the benchmark's client mode needs (it loads the adapters a
    /// server does not list), through vLLM's variable, so that its spelling is tested too.
    pub fn start(dir: &Path, args: &[&str]) -> Result<Self, Box<dyn std::error::Error>> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_multilora"))
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .env("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
            .current_dir(dir)
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut server = ServerProcess {
            child,
            stderr: BufReader::new(stderr).lines(),
            addr: String::new(),
        };
        server.addr = loop {
            let line = server
                .stderr
                .next()
                .ok_or("the server exited before listening")??;
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().ok_or("no address")?.to_string();
            }
        };
        Ok(server)
    }

    /// SIGTERM, then waits; returns the exit status and what it wrote to stderr since.
    pub fn terminate(mut self) -> Result<(ExitStatus, Vec<String>), Box<dyn std::error::Error>> {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        if !killed.success() {
            return Err("kill -TERM failed".into());
        }
        let status = self.child.wait()?;
        let rest = self.stderr.by_ref().map_while(Result::ok).collect();
        Ok((status, rest))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
