//! vLLM's LoRA semantics: a host cache of up to `max_cpu_loras` loaded adapters (LRU, never
//! evicting an adapter a running request uses) and `max_loras` device slots, filled from the
//! host cache when a step needs an adapter that is not in one.
//!
//! Adapters are read, validated and converted off the engine step, on [`NUM_LOADER_THREADS`]
//! loader threads (std threads: the engine has no async runtime), so a step never waits for a
//! disk. The engine asks for loads ahead of need ([`LoraManager::prefetch`], in the waiting
//! queue's order), collects finished ones at the start of a step ([`LoraManager::poll`]), and the
//! scheduler admits a request only once its adapter is in host memory ([`LoraManager::is_ready`]).
//! A backend that keeps adapters in its own form (the CUDA backend: device element type and slot
//! layout, in pinned memory) converts them on the loader threads too ([`PreparingLoader`]), so
//! filling a device slot ([`LoraManager::activate`], in the step) is only a copy, which the CUDA
//! backend issues asynchronously on a stream of its own. Slots are picked by a [`SlotTable`]:
//! a step costs its own adapters, whatever `max_loras` is.
//!
//! The host cache never holds more than `max_cpu_loras` adapters counting the loads in flight:
//! a load reserves its entry when it starts (evicting then, not when it lands), so a finished
//! load always has room and is never thrown away.
//!
//! The first time an adapter is seen (`add_lora`, or `add_request` naming a new one) it is still
//! loaded synchronously, so that a broken adapter fails that call with a clear error, as vLLM's
//! `add_lora` does; register adapters up front (the server does) to keep that off serving.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::adapter::LoraAdapter;
use super::slots::SlotTable;
use super::{AdapterId, LoraRequest, LoraSlot, LoraTarget, LoraTargets};
use crate::backend::{AdapterPreparer, Backend};
use crate::error::{Error, Result};
use crate::ModelConfig;

/// Loads run in parallel up to this many: each is disk reads plus a conversion to f32, and a
/// few at once keep a disk busy without taking the cores the CPU backend computes on.
pub const NUM_LOADER_THREADS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraConfig {
    pub max_loras: usize,
    pub max_lora_rank: usize,
    pub max_cpu_loras: usize,
    /// The projections adapters may target (vLLM's `lora_target_modules`); an adapter that
    /// targets another fails to load, naming it.
    pub target_modules: LoraTargets,
}

/// Reads, validates and converts one adapter into host memory. Runs on a loader thread (and, for
/// an adapter's first load, on the caller's). [`DiskLoader`] reads PEFT files; tests inject a
/// slow or failing loader through `EngineConfig::adapter_loader`.
pub trait AdapterLoader: Send + Sync + std::fmt::Debug {
    fn load(&self, req: &LoraRequest, model: &ModelConfig, max_lora_rank: usize) -> Result<LoraAdapter>;
}

/// The loader of real adapters: `adapter_config.json` and `adapter_model.safetensors`.
#[derive(Debug, Default)]
pub struct DiskLoader;

impl AdapterLoader for DiskLoader {
    fn load(&self, req: &LoraRequest, model: &ModelConfig, max_lora_rank: usize) -> Result<LoraAdapter> {
        LoraAdapter::load(&req.name, &req.path, model, max_lora_rank)
    }
}

/// A loader that also converts each adapter into the backend's form, on the same thread (so
/// off the engine step), timed with the load.
#[derive(Debug)]
pub struct PreparingLoader {
    pub inner: Arc<dyn AdapterLoader>,
    pub preparer: Arc<dyn AdapterPreparer>,
}

impl AdapterLoader for PreparingLoader {
    fn load(&self, req: &LoraRequest, model: &ModelConfig, max_lora_rank: usize) -> Result<LoraAdapter> {
        let mut adapter = self.inner.load(req, model, max_lora_rank)?;
        let prepared = self.preparer.prepare(&adapter).map_err(|e| Error::AdapterLoad {
            name: req.name.clone(),
            path: req.path.clone(),
            msg: format!("preparing it for the device: {e}"),
        })?;
        adapter.prepared = Some(prepared);
        if self.preparer.replaces_host_weights() {
            adapter.drop_host_weights();
        }
        Ok(adapter)
    }
}

/// Upper bounds (seconds) of the load time histogram's buckets, Prometheus style.
pub const LOAD_TIME_BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// How long loads took. `counts[i]` is the number of loads that took at most
/// `LOAD_TIME_BUCKETS_S[i]` and more than the bound before (not cumulative); the last count is
/// the loads above every bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadTimeHistogram {
    pub counts: [u64; LOAD_TIME_BUCKETS_S.len() + 1],
    pub sum: Duration,
}

impl LoadTimeHistogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LOAD_TIME_BUCKETS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LOAD_TIME_BUCKETS_S.len());
        self.counts[i] += 1;
        self.sum += d;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Counters for reports and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraStats {
    pub cache_hits: u64,
    /// Loads from disk (first loads and reloads of evicted adapters).
    pub cache_misses: u64,
    pub cache_evictions: u64,
    /// Copies from the host cache into a device slot.
    pub slot_loads: u64,
    /// Loads on the loader threads that failed (their requests were aborted).
    pub num_load_failures: u64,
    /// Loads on the loader threads now (a gauge).
    pub num_loads_in_flight: usize,
    /// Time of each load, on whichever thread ran it.
    pub load_time: LoadTimeHistogram,
}

struct Cached {
    adapter: Arc<LoraAdapter>,
    last_used: u64,
    /// When it arrived in host memory; a request that arrived before waited for it.
    ready_at: Instant,
}

struct Job {
    id: AdapterId,
    ticket: u64,
    req: LoraRequest,
}

struct Done {
    id: AdapterId,
    ticket: u64,
    result: Result<LoraAdapter>,
    load_time: Duration,
}

pub struct LoraManager {
    cfg: LoraConfig,
    model: ModelConfig,
    loader: Arc<dyn AdapterLoader>,
    /// Every adapter ever requested, so an evicted one can be reloaded.
    known: HashMap<AdapterId, LoraRequest>,
    cache: HashMap<AdapterId, Cached>,
    /// Loads in flight and the ticket of each: a result whose ticket no longer matches (the
    /// adapter was removed meanwhile) is dropped.
    loading: HashMap<AdapterId, u64>,
    next_ticket: u64,
    jobs: Sender<Job>,
    done: Receiver<Done>,
    /// The adapters the last [`Self::prefetch`] wanted, in queue order, and as a set:
    /// eviction spares them.
    wanted: Vec<AdapterId>,
    wanted_set: HashSet<AdapterId>,
    slots: SlotTable,
    tick: u64,
    pub stats: LoraStats,
}

/// Runs loads until the manager (the only sender of jobs) is dropped. A panicking loader fails
/// its adapter rather than the thread, so no load is left in flight forever.
fn loader_thread(
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    loader: Arc<dyn AdapterLoader>,
    model: ModelConfig,
    cfg: LoraConfig,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(Job { id, ticket, req }) = job else {
            return;
        };
        let start = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| loader.load(&req, &model, cfg.max_lora_rank)))
            .unwrap_or_else(|_| {
                Err(Error::AdapterLoad {
                    name: req.name.clone(),
                    path: req.path.clone(),
                    msg: "the adapter loader panicked".into(),
                })
            })
            .and_then(|a| cfg.check_targets(&req, a));
        let load_time = start.elapsed();
        let sent = done.send(Done {
            id,
            ticket,
            result,
            load_time,
        });
        if sent.is_err() {
            return;
        }
    }
}

impl LoraConfig {
    pub fn check(&self) -> Result<()> {
        if self.max_loras == 0 {
            return Err(Error::InvalidConfig("max_loras must be at least 1".into()));
        }
        if self.max_lora_rank == 0 {
            return Err(Error::InvalidConfig("max_lora_rank must be at least 1".into()));
        }
        if self.max_cpu_loras < self.max_loras {
            return Err(Error::InvalidConfig(format!(
                "max_cpu_loras ({}) must be >= max_loras ({})",
                self.max_cpu_loras, self.max_loras
            )));
        }
        Ok(())
    }

    /// `adapter` if it targets only `target_modules`, else the load error naming what it
    /// targets beyond them.
    fn check_targets(&self, req: &LoraRequest, adapter: LoraAdapter) -> Result<LoraAdapter> {
        let outside: Vec<&str> = (adapter.targets().iter())
            .filter(|&t| !self.target_modules.contains(t))
            .map(LoraTarget::name)
            .collect();
        if outside.is_empty() {
            return Ok(adapter);
        }
        Err(Error::AdapterLoad {
            name: req.name.clone(),
            path: req.path.clone(),
            msg: format!(
                "it targets {}, which lora_target_modules ({}) leaves out",
                outside.join(", "),
                self.target_modules
            ),
        })
    }
}

impl LoraManager {
    pub fn new(cfg: LoraConfig, model: &ModelConfig, loader: Arc<dyn AdapterLoader>) -> Result<Self> {
        cfg.check()?;
        let (jobs, job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for i in 0..NUM_LOADER_THREADS {
            let (job_rx, done_tx, loader) = (job_rx.clone(), done_tx.clone(), loader.clone());
            let model = model.clone();
            // Detached: a thread ends after its current load once the manager is gone.
            std::thread::Builder::new()
                .name(format!("lora-loader-{i}"))
                .spawn(move || loader_thread(job_rx, done_tx, loader, model, cfg))
                .map_err(|e| Error::Backend(format!("starting an adapter loader thread: {e}")))?;
        }
        Ok(LoraManager {
            cfg,
            model: model.clone(),
            loader,
            known: HashMap::new(),
            cache: HashMap::new(),
            loading: HashMap::new(),
            next_ticket: 0,
            jobs,
            done,
            wanted: Vec::new(),
            wanted_set: HashSet::new(),
            slots: SlotTable::new(cfg.max_loras),
            tick: 0,
            stats: LoraStats::default(),
        })
    }

    pub fn config(&self) -> LoraConfig {
        self.cfg
    }

    pub fn num_cached(&self) -> usize {
        self.cache.len()
    }

    pub fn num_in_slots(&self) -> usize {
        self.slots.num_filled()
    }

    pub fn num_loading(&self) -> usize {
        self.loading.len()
    }

    pub fn known(&self) -> impl Iterator<Item = &LoraRequest> {
        self.known.values()
    }

    /// In host memory: a step may use it.
    pub fn is_ready(&self, id: AdapterId) -> bool {
        self.cache.contains_key(&id)
    }

    /// When a ready adapter arrived in host memory.
    pub fn ready_at(&self, id: AdapterId) -> Option<Instant> {
        self.cache.get(&id).map(|c| c.ready_at)
    }

    /// Registers a request's adapter. On first sight it is loaded now and validated, so a broken
    /// adapter fails `add_request`/`add_lora` rather than a later step; a known adapter that was
    /// evicted is reloaded in the background when the engine prefetches it. `pinned` are
    /// adapters of running requests.
    pub fn register(&mut self, req: &LoraRequest, pinned: &[AdapterId]) -> Result<()> {
        if req.id.0 == 0 {
            return Err(Error::InvalidConfig(format!(
                "adapter {:?}: lora_int_id must be > 0",
                req.name
            )));
        }
        if let Some(k) = self.known.get(&req.id) {
            if k.path != req.path {
                return Err(Error::InvalidConfig(format!(
                    "adapter id {} is already {:?} at {}; {:?} at {} needs another id",
                    req.id.0,
                    k.name,
                    k.path.display(),
                    req.name,
                    req.path.display()
                )));
            }
            return Ok(());
        }
        self.stats.cache_misses += 1;
        let start = Instant::now();
        let adapter = self.loader.load(req, &self.model, self.cfg.max_lora_rank)?;
        let adapter = self.cfg.check_targets(req, adapter)?;
        self.stats.load_time.observe(start.elapsed());
        tracing::debug!(adapter = %req.name, rank = adapter.rank, "loaded adapter from disk");
        self.known.insert(req.id, req.clone());
        if self.make_room(pinned) {
            self.insert(req.id, Arc::new(adapter));
        }
        Ok(())
    }

    /// Forgets an adapter (vLLM's `unload_lora_adapter`): host copy, slot, and any load in
    /// flight (its result is dropped when it lands).
    pub fn remove(&mut self, id: AdapterId) -> bool {
        self.cache.remove(&id);
        self.loading.remove(&id);
        self.stats.num_loads_in_flight = self.loading.len();
        self.slots.remove(id);
        self.known.remove(&id).is_some()
    }

    /// Makes room for one more adapter in the host cache (counting loads in flight), evicting
    /// the least recently used one that no running request uses (`pinned`) and the waiting queue
    /// does not want. False if there is none.
    fn make_room(&mut self, pinned: &[AdapterId]) -> bool {
        if self.cache.len() + self.loading.len() < self.cfg.max_cpu_loras {
            return true;
        }
        let victim = (self.cache.iter())
            .filter(|(k, _)| !pinned.contains(k) && !self.wanted_set.contains(k))
            .min_by_key(|(_, c)| c.last_used)
            .map(|(&k, _)| k);
        let Some(v) = victim else {
            return false;
        };
        self.cache.remove(&v);
        self.stats.cache_evictions += 1;
        true
    }

    fn insert(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>) {
        self.tick += 1;
        let cached = Cached {
            adapter,
            last_used: self.tick,
            ready_at: Instant::now(),
        };
        self.cache.insert(id, cached);
    }

    /// Starts background loads for the adapters the waiting queue will need, `wanted` in queue
    /// order (repeats allowed): the first `max_cpu_loras - pinned` distinct ones that no running
    /// request uses (`pinned`, distinct), as far as the cache has room. Eviction spares running adapters and all of
    /// these, so what the queue's head needs is never evicted for what its tail needs; the window
    /// is small enough that each of them has room once earlier loads land.
    pub fn prefetch(&mut self, wanted: impl Iterator<Item = AdapterId>, pinned: &[AdapterId]) {
        let window = self.cfg.max_cpu_loras.saturating_sub(pinned.len());
        self.wanted.clear();
        self.wanted_set.clear();
        for a in wanted {
            if self.wanted.len() >= window {
                break;
            }
            if !pinned.contains(&a) && self.wanted_set.insert(a) {
                self.wanted.push(a);
            }
        }
        for i in 0..self.wanted.len() {
            let id = self.wanted[i];
            if self.cache.contains_key(&id) || self.loading.contains_key(&id) {
                continue;
            }
            let Some(req) = self.known.get(&id).cloned() else {
                continue;
            };
            if !self.make_room(pinned) {
                // Held by loads of adapters no longer wanted; retried once they land.
                break;
            }
            self.next_ticket += 1;
            let ticket = self.next_ticket;
            self.stats.cache_misses += 1;
            if self.jobs.send(Job { id, ticket, req }).is_err() {
                // Every loader thread is gone, which only a bug can do.
                panic!("the adapter loader threads have stopped");
            }
            self.loading.insert(id, ticket);
        }
        self.stats.num_loads_in_flight = self.loading.len();
    }

    /// Takes the loads that finished into the host cache; returns the adapters whose load
    /// failed, with the error, so the engine aborts their requests. With `wait`, and loads in
    /// flight, blocks up to that long for the first one (the engine has nothing to run).
    pub fn poll(&mut self, wait: Option<Duration>) -> Vec<(AdapterId, Error)> {
        let mut failed = Vec::new();
        let mut next = match wait {
            Some(t) if !self.loading.is_empty() => match self.done.recv_timeout(t) {
                Ok(d) => Some(d),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => panic!("the adapter loader threads have stopped"),
            },
            _ => None,
        };
        loop {
            let d = match next.take() {
                Some(d) => d,
                None => match self.done.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                },
            };
            if self.loading.get(&d.id) != Some(&d.ticket) {
                continue;
            }
            self.loading.remove(&d.id);
            self.stats.load_time.observe(d.load_time);
            match d.result {
                Ok(adapter) => {
                    tracing::debug!(adapter = %adapter.name, rank = adapter.rank, load_time = ?d.load_time, "loaded adapter");
                    // Its room was reserved when the load started.
                    self.insert(d.id, Arc::new(adapter));
                }
                Err(e) => {
                    self.stats.num_load_failures += 1;
                    failed.push((d.id, e));
                }
            }
        }
        self.stats.num_loads_in_flight = self.loading.len();
        failed
    }

    /// Makes the step's adapters (at most `max_loras`, distinct, all ready) resident in device
    /// slots, and returns the slot of each.
    pub fn activate(
        &mut self,
        step: &[AdapterId],
        backend: &mut dyn Backend,
        slots_out: &mut Vec<LoraSlot>,
    ) -> Result<()> {
        assert!(
            step.len() <= self.cfg.max_loras,
            "the scheduler keeps a step within max_loras"
        );
        slots_out.clear();
        let needed: HashSet<AdapterId> = step.iter().copied().collect();
        for &id in step {
            self.tick += 1;
            let tick = self.tick;
            let cached = self.cache.get_mut(&id).expect(
                "the scheduler admits a request once its adapter is ready, and a running one's stays",
            );
            cached.last_used = tick;
            self.stats.cache_hits += 1;
            if let Some(s) = self.slots.touch(id, tick) {
                slots_out.push(s);
                continue;
            }
            let adapter = cached.adapter.clone();
            let s = (self.slots)
                .victim(|a| needed.contains(&a))
                .expect("fewer step adapters than slots");
            if let Err(e) = backend.set_lora_slot(s, Some(&adapter)) {
                // The slot's contents are unknown now: nothing may take it as resident.
                self.slots.clear(s);
                return Err(e);
            }
            self.stats.slot_loads += 1;
            self.slots.assign(s, id, tick);
            slots_out.push(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::StepBatch;
    use std::path::Path;

    /// Records which adapter each slot holds.
    #[derive(Default)]
    struct FakeBackend {
        slots: HashMap<u32, String>,
        loads: usize,
    }

    impl Backend for FakeBackend {
        fn device_name(&self) -> String {
            "fake".into()
        }
        fn kv_cache(&self) -> crate::backend::KvCacheSize {
            NO_KV_CACHE
        }
        fn dtype(&self) -> &'static str {
            "float32"
        }
        fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) -> Result<()> {
            self.loads += 1;
            match adapter {
                Some(a) => self.slots.insert(slot.0, a.name.clone()),
                None => self.slots.remove(&slot.0),
            };
            Ok(())
        }
        fn forward(&mut self, _: &StepBatch) -> Result<&[f32]> {
            unreachable!()
        }
        fn token_logits(&mut self, _: &[u32]) -> Result<&[f32]> {
            unreachable!()
        }
    }

    /// Fails every load after the first of each adapter (a file gone after registration), or
    /// panics, as asked.
    #[derive(Debug, Default)]
    struct FlakyLoader {
        seen: Mutex<Vec<AdapterId>>,
        panics: bool,
    }

    impl AdapterLoader for FlakyLoader {
        fn load(&self, req: &LoraRequest, model: &ModelConfig, max_lora_rank: usize) -> Result<LoraAdapter> {
            let mut seen = self.seen.lock().unwrap();
            if !seen.contains(&req.id) {
                seen.push(req.id);
                return DiskLoader.load(req, model, max_lora_rank);
            }
            assert!(!self.panics, "a loader bug");
            Err(Error::AdapterLoad {
                name: req.name.clone(),
                path: req.path.clone(),
                msg: "gone".into(),
            })
        }
    }

    fn setup_with(
        max_loras: usize,
        max_cpu_loras: usize,
        loader: Arc<dyn AdapterLoader>,
    ) -> (LoraManager, Vec<LoraRequest>) {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama");
        let cfg = ModelConfig::from_dir(&golden.join("model")).unwrap();
        let m = LoraManager::new(
            LoraConfig {
                max_loras,
                max_lora_rank: 16,
                max_cpu_loras,
                target_modules: LoraTargets::ALL,
            },
            &cfg,
            loader,
        )
        .unwrap();
        let reqs = ["a_r8_all", "b_r4_qv_regex", "c_r16_rslora", "d_pattern"]
            .iter()
            .enumerate()
            .map(|(i, n)| LoraRequest {
                name: n.to_string(),
                id: AdapterId(i as u32 + 1),
                path: golden.join("adapters").join(n),
            })
            .collect();
        (m, reqs)
    }

    fn setup(max_loras: usize, max_cpu_loras: usize) -> (LoraManager, Vec<LoraRequest>) {
        setup_with(max_loras, max_cpu_loras, Arc::new(DiskLoader))
    }

    /// Waits for every load in flight; returns the failures.
    fn settle(m: &mut LoraManager) -> Vec<AdapterId> {
        let mut failed = Vec::new();
        while m.num_loading() > 0 {
            failed.extend(m.poll(Some(Duration::from_secs(1))).into_iter().map(|(a, _)| a));
        }
        failed
    }

    #[test]
    fn host_cache_is_lru_and_never_evicts_pinned() {
        let (mut m, r) = setup(1, 2);
        m.register(&r[0], &[]).unwrap();
        m.register(&r[1], &[]).unwrap();
        // full: registering c evicts the LRU unpinned one; a (pinned) survives
        m.register(&r[2], &[r[0].id]).unwrap();
        assert!(m.is_ready(r[0].id) && !m.is_ready(r[1].id));
        assert_eq!(m.stats.cache_evictions, 1);
        // everything pinned: d is validated but not kept
        m.register(&r[3], &[r[0].id, r[2].id]).unwrap();
        assert_eq!(m.num_cached(), 2);
        assert!(!m.is_ready(r[3].id));
        assert_eq!(m.stats.cache_misses, 4);
        assert_eq!(m.stats.load_time.count(), 4);
    }

    #[test]
    fn slots_are_reused_and_evicted_adapters_reload_in_the_background() {
        let (mut m, r) = setup(2, 2);
        let mut be = FakeBackend::default();
        let mut out = Vec::new();
        for req in &r {
            m.register(req, &[]).unwrap();
        }
        // c and d evicted a and b
        assert!(!m.is_ready(r[0].id) && !m.is_ready(r[1].id));
        m.activate(&[r[2].id, r[3].id], &mut be, &mut out).unwrap();
        assert_eq!(be.loads, 2);
        // same adapters again: no copies
        m.activate(&[r[3].id, r[2].id], &mut be, &mut out).unwrap();
        assert_eq!(be.loads, 2);
        assert_eq!(be.slots[&out[0].0], "d_pattern");
        // a is wanted while c runs: d (the LRU one not running) makes room, a loads off-step
        let misses = m.stats.cache_misses;
        m.prefetch([r[0].id, r[0].id].into_iter(), &[r[2].id]);
        assert_eq!(m.num_loading(), 1);
        assert_eq!(m.num_cached(), 1, "the load reserved d's entry");
        assert!(settle(&mut m).is_empty());
        assert_eq!(m.stats.cache_misses, misses + 1);
        m.activate(&[r[0].id, r[2].id], &mut be, &mut out).unwrap();
        assert_eq!(be.slots[&out[0].0], "a_r8_all");
        assert_eq!(m.stats.num_loads_in_flight, 0);
    }

    #[test]
    fn prefetch_window_spares_running_and_the_queue_head() {
        let (mut m, r) = setup(1, 3);
        m.register(&r[0], &[]).unwrap();
        m.register(&r[1], &[]).unwrap();
        m.register(&r[2], &[]).unwrap();
        m.register(&r[3], &[]).unwrap(); // evicts a
                                         // a runs... no: b runs; the queue wants a, d, c: the window is 3 - 1 = 2 adapters (a, d)
        m.prefetch([r[0].id, r[3].id, r[2].id].into_iter(), &[r[1].id]);
        // a needed room: c, outside the window, was evicted, not b (running) or d (wanted)
        assert_eq!(m.num_loading(), 1);
        assert!(m.is_ready(r[1].id) && m.is_ready(r[3].id) && !m.is_ready(r[2].id));
        settle(&mut m);
        assert_eq!(m.num_cached(), 3);
        assert!(m.is_ready(r[0].id));
    }

    #[test]
    fn failed_and_panicking_loads_are_reported_not_lost() {
        for panics in [false, true] {
            let loader = Arc::new(FlakyLoader {
                panics,
                ..Default::default()
            });
            let (mut m, r) = setup_with(1, 1, loader);
            m.register(&r[0], &[]).unwrap();
            m.register(&r[1], &[]).unwrap(); // evicts a
            m.prefetch([r[0].id].into_iter(), &[]);
            assert_eq!(settle(&mut m), vec![r[0].id]);
            assert_eq!(m.stats.num_load_failures, 1);
            assert!(!m.is_ready(r[0].id));
            // still known: a later request tries again
            assert!(m.known().any(|k| k.id == r[0].id));
        }
    }

    /// Prepares adapters as a number (how many it prepared before), or fails.
    #[derive(Debug, Default)]
    struct CountingPreparer {
        num_prepared: Mutex<usize>,
        fails: bool,
        replaces: bool,
    }

    impl AdapterPreparer for CountingPreparer {
        fn prepare(&self, _: &LoraAdapter) -> Result<crate::backend::PreparedAdapter> {
            if self.fails {
                return Err(Error::Backend("out of pinned memory".into()));
            }
            let mut n = self.num_prepared.lock().unwrap();
            *n += 1;
            Ok(crate::backend::PreparedAdapter(Arc::new(*n)))
        }

        fn replaces_host_weights(&self) -> bool {
            self.replaces
        }
    }

    #[test]
    fn preparing_loader_converts_on_the_loading_thread_and_names_failures() {
        let preparer = Arc::new(CountingPreparer::default());
        let loader = Arc::new(PreparingLoader {
            inner: Arc::new(DiskLoader),
            preparer: preparer.clone(),
        });
        let (mut m, r) = setup_with(1, 1, loader.clone());
        m.register(&r[0], &[]).unwrap();
        m.register(&r[1], &[]).unwrap(); // evicts a
        m.prefetch([r[0].id].into_iter(), &[]);
        assert!(settle(&mut m).is_empty());
        // The first load (here) and the reload (a loader thread) were both prepared.
        assert_eq!(*preparer.num_prepared.lock().unwrap(), 3);
        let a = m.cache[&r[0].id].adapter.clone();
        let n = a
            .prepared
            .as_ref()
            .and_then(|p| p.0.downcast_ref::<usize>().copied());
        assert_eq!(n, Some(3));
        assert!(a.has_host_weights());

        // A form that replaces the weights: the host cache keeps only it.
        let replacing = Arc::new(PreparingLoader {
            inner: Arc::new(DiskLoader),
            preparer: Arc::new(CountingPreparer {
                replaces: true,
                ..Default::default()
            }),
        });
        let (mut m, r) = setup_with(1, 1, replacing);
        m.register(&r[0], &[]).unwrap();
        let a = &m.cache[&r[0].id].adapter;
        assert!(!a.has_host_weights() && a.prepared.is_some() && a.rank == 8);

        let failing = Arc::new(PreparingLoader {
            inner: Arc::new(DiskLoader),
            preparer: Arc::new(CountingPreparer {
                fails: true,
                ..Default::default()
            }),
        });
        let (mut m, r) = setup_with(1, 1, failing);
        let err = m.register(&r[0], &[]).unwrap_err().to_string();
        assert!(
            err.contains("a_r8_all")
                && err.contains("preparing it for the device: ")
                && err.contains("out of pinned memory"),
            "{err}"
        );
    }

    /// Fails every slot copy.
    struct BrokenBackend;

    /// The fakes hold no KV cache.
    const NO_KV_CACHE: crate::backend::KvCacheSize = crate::backend::KvCacheSize {
        num_blocks: 0,
        bytes_per_block: 0,
    };

    impl Backend for BrokenBackend {
        fn device_name(&self) -> String {
            "broken".into()
        }
        fn kv_cache(&self) -> crate::backend::KvCacheSize {
            NO_KV_CACHE
        }
        fn dtype(&self) -> &'static str {
            "float32"
        }
        fn set_lora_slot(&mut self, _: LoraSlot, _: Option<&LoraAdapter>) -> Result<()> {
            Err(Error::Backend("copy failed".into()))
        }
        fn token_logits(&mut self, _: &[u32]) -> Result<&[f32]> {
            unreachable!()
        }
        fn forward(&mut self, _: &StepBatch) -> Result<&[f32]> {
            unreachable!()
        }
    }

    #[test]
    fn a_failed_slot_copy_fails_activation_and_frees_the_slot() {
        let (mut m, r) = setup(1, 2);
        m.register(&r[0], &[]).unwrap();
        m.register(&r[1], &[]).unwrap();
        let (mut be, mut out) = (FakeBackend::default(), Vec::new());
        m.activate(&[r[0].id], &mut be, &mut out).unwrap();
        // b's copy over a's slot fails: the slot holds neither now.
        let err = m.activate(&[r[1].id], &mut BrokenBackend, &mut out).unwrap_err();
        assert!(err.to_string().contains("copy failed"), "{err}");
        assert_eq!(m.num_in_slots(), 0);
        // So a is copied again rather than taken as resident.
        m.activate(&[r[0].id], &mut be, &mut out).unwrap();
        assert_eq!(be.loads, 2);
    }

    #[test]
    fn rejects_bad_limits_and_id_reuse() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama/model");
        let cfg = ModelConfig::from_dir(&golden).unwrap();
        let bad = LoraManager::new(
            LoraConfig {
                max_loras: 4,
                max_lora_rank: 16,
                max_cpu_loras: 3,
                target_modules: LoraTargets::ALL,
            },
            &cfg,
            Arc::new(DiskLoader),
        );
        assert!(bad.is_err());
        let (mut m, r) = setup(1, 1);
        m.register(&r[0], &[]).unwrap();
        let clash = LoraRequest {
            id: r[0].id,
            ..r[1].clone()
        };
        assert!(m
            .register(&clash, &[])
            .unwrap_err()
            .to_string()
            .contains("needs another id"));
    }
}
