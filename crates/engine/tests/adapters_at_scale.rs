//! Many adapters, few slots: loads happen off the engine step, requests whose adapters are in
//! host memory go first, nobody is passed over more than `max_times_passed_over` steps, and
//! none of it changes what a request generates.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{case_dir, synth_adapters};
use multilora_engine::lora::adapter::LoraAdapter;
use multilora_engine::lora::manager::{AdapterLoader, DiskLoader};
use multilora_engine::{
    AdapterId, EngineConfig, FinishReason, LLMEngine, LoraRequest, ModelConfig, Prompt, RequestOutput,
    SamplingParams,
};
use rand::{Rng, SeedableRng};

fn config(max_loras: usize, max_cpu_loras: usize) -> EngineConfig {
    let mut cfg = EngineConfig::new(case_dir("llama").join("model"));
    cfg.enable_lora = true;
    cfg.max_loras = max_loras;
    cfg.max_cpu_loras = Some(max_cpu_loras);
    cfg.max_lora_rank = 16;
    cfg.max_model_len = Some(64);
    cfg.max_num_seqs = 16;
    cfg.block_size = 4;
    cfg
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    }
}

/// Loads from disk, but the gated adapter's reloads (every load after its first) wait until
/// the test opens the gate.
#[derive(Debug)]
struct GatedLoader {
    gated: AdapterId,
    num_gated_loads: AtomicUsize,
    is_open: Mutex<bool>,
    opened: Condvar,
}

impl GatedLoader {
    fn new(gated: AdapterId) -> Self {
        GatedLoader {
            gated,
            num_gated_loads: AtomicUsize::new(0),
            is_open: Mutex::new(false),
            opened: Condvar::new(),
        }
    }

    fn open(&self) {
        *self.is_open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl AdapterLoader for GatedLoader {
    fn load(
        &self,
        req: &LoraRequest,
        model: &ModelConfig,
        max_lora_rank: usize,
    ) -> multilora_engine::Result<LoraAdapter> {
        if req.id == self.gated && self.num_gated_loads.fetch_add(1, Ordering::SeqCst) >= 1 {
            let mut is_open = self.is_open.lock().unwrap();
            while !*is_open {
                is_open = self.opened.wait(is_open).unwrap();
            }
        }
        DiskLoader.load(req, model, max_lora_rank)
    }
}

fn golden_lora(name: &str, id: u32) -> LoraRequest {
    LoraRequest {
        name: name.into(),
        id: AdapterId(id),
        path: case_dir("llama").join("adapters").join(name),
    }
}

/// Runs one request on an engine with nothing else in it; its output tokens.
fn run_alone(
    engine: &mut LLMEngine,
    prompt: &[u32],
    max_tokens: usize,
    lora: Option<&LoraRequest>,
) -> Vec<u32> {
    assert!(!engine.has_unfinished_requests());
    let p = Prompt::TokenIds(prompt.to_vec());
    engine.add_request("alone", p, greedy(max_tokens), lora).unwrap();
    let mut out = None;
    for _ in 0..10_000 {
        if !engine.has_unfinished_requests() {
            break;
        }
        for o in engine.step().unwrap() {
            if o.is_finished() {
                out = Some(o.output_token_ids);
            }
        }
    }
    out.expect("the request finished")
}

#[test]
fn running_sequences_keep_stepping_while_an_adapter_loads() {
    let (a, b, c) = (
        golden_lora("a_r8_all", 1),
        golden_lora("b_r4_qv_regex", 2),
        golden_lora("c_r16_rslora", 3),
    );
    let loader = Arc::new(GatedLoader::new(a.id));
    let mut cfg = config(2, 2);
    cfg.adapter_loader = Some(loader.clone());
    let mut engine = LLMEngine::new(cfg).unwrap();
    for l in [&a, &b, &c] {
        engine.add_lora(l).unwrap();
    }
    // Two adapters fit the host cache: a, the least recently used, was evicted.
    assert!(!engine.lora_manager().unwrap().is_ready(a.id));
    let prompt_late = [5, 6, 7];
    engine
        .add_request("run", Prompt::TokenIds(vec![9, 10]), greedy(30), Some(&b))
        .unwrap();
    assert_eq!(engine.step().unwrap().len(), 1);
    engine
        .add_request(
            "late",
            Prompt::TokenIds(prompt_late.to_vec()),
            greedy(4),
            Some(&a),
        )
        .unwrap();
    // a's reload is held at the gate: "run" keeps producing a token every step meanwhile.
    const NUM_STEPS_DURING_LOAD: usize = 5;
    for step in 0..NUM_STEPS_DURING_LOAD {
        let out = engine.step().unwrap();
        let ids: Vec<&str> = out.iter().map(|o| &*o.request_id).collect();
        assert_eq!(ids, ["run"], "step {step}");
        assert_eq!((engine.num_waiting(), engine.num_waiting_for_adapter()), (1, 1));
        assert_eq!(engine.lora_stats().unwrap().num_loads_in_flight, 1);
    }
    // The reload runs on a loader thread, which a busy machine may start only after those
    // (fast) steps: wait for it, rather than race it.
    let waited = std::time::Instant::now();
    while loader.num_gated_loads.load(Ordering::SeqCst) < 2 && waited.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        loader.num_gated_loads.load(Ordering::SeqCst),
        2,
        "the reload started"
    );
    loader.open();
    let mut late: Vec<RequestOutput> = Vec::new();
    let mut num_run_tokens = 1 + NUM_STEPS_DURING_LOAD;
    for _ in 0..10_000 {
        if !engine.has_unfinished_requests() {
            break;
        }
        for o in engine.step().unwrap() {
            match &*o.request_id {
                "late" => late.push(o),
                _ => num_run_tokens += 1,
            }
        }
    }
    assert_eq!(num_run_tokens, 30);
    let last = late.last().expect("late ran");
    assert_eq!(last.finish_reason, Some(FinishReason::Length));
    assert!(last.metrics.adapter_wait > Duration::ZERO);
    let stats = engine.lora_stats().unwrap();
    assert_eq!((stats.num_loads_in_flight, stats.num_load_failures), (0, 0));
    let mut alone = LLMEngine::new(config(2, 2)).unwrap();
    assert_eq!(
        last.output_token_ids,
        run_alone(&mut alone, &prompt_late, 4, Some(&a))
    );
}

struct Req {
    prompt: Vec<u32>,
    max_tokens: usize,
    lora: Option<usize>,
}

/// 200 adapters through 8 host entries and 4 slots, requests arriving a few a step with a
/// skewed mix of adapters (and some without): every request finishes with the tokens it gets
/// alone, none waits forever, and none is passed over more than `max_times_passed_over` steps.
#[test]
fn thrash_200_adapters_through_8_host_entries_and_4_slots() {
    const NUM_ADAPTERS: usize = 200;
    const NUM_REQUESTS: usize = 240;
    const MAX_TIMES_PASSED_OVER: u32 = 6;
    let tmp = tempfile::tempdir().unwrap();
    let loras = synth_adapters(tmp.path(), NUM_ADAPTERS);
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let reqs: Vec<Req> = (0..NUM_REQUESTS)
        .map(|_| {
            let len = rng.random_range(1..12);
            Req {
                prompt: (0..len).map(|_| rng.random_range(3..384)).collect(),
                max_tokens: rng.random_range(1..8),
                // Half the requests on 8 popular adapters, a few on none, the rest anywhere.
                lora: match rng.random_range(0..10) {
                    0 => None,
                    1..=5 => Some(rng.random_range(0..8)),
                    _ => Some(rng.random_range(0..NUM_ADAPTERS)),
                },
            }
        })
        .collect();

    let mut cfg = config(4, 8);
    cfg.max_times_passed_over = MAX_TIMES_PASSED_OVER;
    let mut engine = LLMEngine::new(cfg).unwrap();
    for l in &loras {
        engine.add_lora(l).unwrap();
    }
    let mut finished: HashMap<usize, RequestOutput> = HashMap::new();
    let (mut next, mut num_steps) = (0, 0);
    while next < reqs.len() || engine.has_unfinished_requests() {
        for _ in 0..3 {
            if let Some(r) = reqs.get(next) {
                let p = Prompt::TokenIds(r.prompt.clone());
                let lora = r.lora.map(|i| &loras[i]);
                engine
                    .add_request(&next.to_string(), p, greedy(r.max_tokens), lora)
                    .unwrap();
                next += 1;
            }
        }
        num_steps += 1;
        let m = engine.lora_manager().unwrap();
        // Generous: a step that runs nothing waits for a load, so stuck means stuck.
        assert!(
            num_steps < 20_000,
            "requests stuck: {} waiting, {} running, {} loading, {} cached, {:?}",
            engine.num_waiting(),
            engine.num_running(),
            m.num_loading(),
            m.num_cached(),
            m.stats
        );
        for o in engine.step().unwrap() {
            if o.is_finished() {
                assert!(finished.insert(o.request_id.parse().unwrap(), o).is_none());
            }
        }
    }
    assert_eq!(finished.len(), NUM_REQUESTS, "nothing lost");
    let max_passed = finished.values().map(|o| o.metrics.num_times_passed_over).max();
    assert!(max_passed <= Some(MAX_TIMES_PASSED_OVER), "{max_passed:?}");
    assert!(
        max_passed > Some(0),
        "the workload makes requests wait for their adapters"
    );
    let stats = engine.lora_stats().unwrap();
    let num_at_bound = (finished.values())
        .filter(|o| o.metrics.num_times_passed_over == MAX_TIMES_PASSED_OVER)
        .count();
    eprintln!(
        "{num_steps} steps, passed over at most {max_passed:?}, {num_at_bound} at the bound, {stats:?}"
    );
    assert!(num_at_bound > 0, "the bound is reached, and holds");
    assert!(
        stats.cache_misses > NUM_ADAPTERS as u64 + 20,
        "adapters reloaded: {stats:?}"
    );
    assert_eq!((stats.num_load_failures, stats.num_loads_in_flight), (0, 0));

    let mut alone = LLMEngine::new(config(4, 8)).unwrap();
    for (i, r) in reqs.iter().enumerate() {
        let o = &finished[&i];
        assert_eq!(o.finish_reason, Some(FinishReason::Length), "request {i}");
        let expected = run_alone(&mut alone, &r.prompt, r.max_tokens, r.lora.map(|l| &loras[l]));
        assert_eq!(o.output_token_ids, expected, "request {i} (adapter {:?})", r.lora);
    }
}

/// Adapters whose files break after registration — one truncated, one deleted — end their own
/// requests with the load error when they are reloaded; the other requests finish.
#[test]
fn a_load_failing_half_way_aborts_only_its_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let loras = synth_adapters(tmp.path(), 4);
    let mut engine = LLMEngine::new(config(1, 1)).unwrap();
    for l in &loras {
        engine.add_lora(l).unwrap();
    }
    // Only the last stayed in the host cache; break 1 and 2 on disk.
    let weights = loras[1].path.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_dir_all(&loras[2].path).unwrap();
    let requests = [
        ("ok0", Some(0)),
        ("trunc", Some(1)),
        ("gone", Some(2)),
        ("base", None),
        ("trunc2", Some(1)),
    ];
    for (id, l) in requests {
        let lora = l.map(|i| &loras[i]);
        engine
            .add_request(id, Prompt::TokenIds(vec![5, 6]), greedy(3), lora)
            .unwrap();
    }
    let mut finished = HashMap::new();
    for _ in 0..10_000 {
        if !engine.has_unfinished_requests() {
            break;
        }
        for o in engine.step().unwrap() {
            if o.is_finished() {
                finished.insert(o.request_id.to_string(), o);
            }
        }
    }
    assert_eq!(finished.len(), requests.len());
    for id in ["ok0", "base"] {
        assert_eq!(finished[id].finish_reason, Some(FinishReason::Length), "{id}");
        assert_eq!(finished[id].output_token_ids.len(), 3);
    }
    for (id, name) in [("trunc", "lora-1"), ("trunc2", "lora-1"), ("gone", "lora-2")] {
        let o = &finished[id];
        assert_eq!(
            (o.finish_reason, o.token_id),
            (Some(FinishReason::Abort), None),
            "{id}"
        );
        let err = o.error.as_deref().unwrap_or_default();
        assert!(err.contains(&format!("adapter \"{name}\"")), "{id}: {err}");
    }
    assert!(finished["gone"]
        .error
        .as_deref()
        .unwrap()
        .contains("does not exist"));
    assert_eq!(engine.lora_stats().unwrap().num_load_failures, 2);
}
