#![no_main]
//! Any bytes as a completion or chat body: never a 5xx, never a panic.

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::Request;
use multilora_engine::EngineConfig;
use multilora_server::{Server, ServerConfig};
use tower::ServiceExt;

struct Harness {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    _server: Server,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let demo = multilora_server_fuzz::demo();
        let mut engine = EngineConfig::new(demo.root.join("model"));
        engine.enable_lora = true;
        engine.max_model_len = Some(256);
        engine.max_num_seqs = 8;
        let mut config = ServerConfig::new("demo");
        config.lora_modules = vec![("lora-0".into(), demo.root.join("adapters/demo-r8-000"))];
        let server = Server::start(engine, config).expect("the demo server");
        let app = server.router();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        Harness {
            rt,
            app,
            _server: server,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let h = harness();
    let path = match data.first() {
        Some(b) if b % 2 == 0 => "/v1/chat/completions",
        _ => "/v1/completions",
    };
    let body = data.get(1..).unwrap_or_default().to_vec();
    let req = Request::post(path).body(Body::from(body)).expect("a request");
    let status = h
        .rt
        .block_on(h.app.clone().oneshot(req))
        .expect("the router is infallible")
        .status();
    assert!(!status.is_server_error(), "{status}");
});
