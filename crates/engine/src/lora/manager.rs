//! vLLM's LoRA semantics: a host cache of up to `max_cpu_loras` loaded adapters (LRU, filled
//! from disk on first use, never evicting an adapter a running request uses) and `max_loras`
//! device slots, filled from the host cache when a step needs an adapter that is not in one.

use std::collections::HashMap;
use std::sync::Arc;

use super::adapter::LoraAdapter;
use super::{AdapterId, LoraRequest, LoraSlot};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraConfig {
    pub max_loras: usize,
    pub max_lora_rank: usize,
    pub max_cpu_loras: usize,
}

/// Counters for reports and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraStats {
    pub cache_hits: u64,
    /// Loads from disk.
    pub cache_misses: u64,
    pub cache_evictions: u64,
    /// Copies from the host cache into a device slot.
    pub slot_loads: u64,
}

struct Cached {
    adapter: Arc<LoraAdapter>,
    last_used: u64,
}

pub struct LoraManager {
    cfg: LoraConfig,
    model: ModelConfig,
    /// Every adapter ever requested, so an evicted one can be reloaded.
    known: HashMap<AdapterId, LoraRequest>,
    cache: HashMap<AdapterId, Cached>,
    /// `[max_loras]`: which adapter each slot holds, and when it was last used
    slots: Vec<Option<(AdapterId, u64)>>,
    tick: u64,
    pub stats: LoraStats,
}

impl LoraManager {
    pub fn new(cfg: LoraConfig, model: &ModelConfig) -> Result<Self> {
        if cfg.max_loras == 0 {
            return Err(Error::InvalidConfig("max_loras must be at least 1".into()));
        }
        if cfg.max_lora_rank == 0 {
            return Err(Error::InvalidConfig("max_lora_rank must be at least 1".into()));
        }
        if cfg.max_cpu_loras < cfg.max_loras {
            return Err(Error::InvalidConfig(format!(
                "max_cpu_loras ({}) must be >= max_loras ({})",
                cfg.max_cpu_loras, cfg.max_loras
            )));
        }
        Ok(LoraManager {
            cfg,
            model: model.clone(),
            known: HashMap::new(),
            cache: HashMap::new(),
            slots: vec![None; cfg.max_loras],
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
        self.slots.iter().flatten().count()
    }

    pub fn known(&self) -> impl Iterator<Item = &LoraRequest> {
        self.known.values()
    }

    /// Registers a request's adapter and makes sure it loads: on first sight it is read from
    /// disk and validated, so a broken adapter fails `add_request` rather than a later step.
    /// `pinned` are adapters of running requests.
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
        }
        if self.cache.contains_key(&req.id) {
            return Ok(());
        }
        let adapter = self.load(req)?;
        self.known.insert(req.id, req.clone());
        self.insert(req.id, adapter, pinned);
        Ok(())
    }

    /// Forgets an adapter (vLLM's `unload_lora_adapter`): host copy and slot.
    pub fn remove(&mut self, id: AdapterId) -> bool {
        self.cache.remove(&id);
        for s in self.slots.iter_mut() {
            if s.is_some_and(|(a, _)| a == id) {
                *s = None;
            }
        }
        self.known.remove(&id).is_some()
    }

    fn load(&mut self, req: &LoraRequest) -> Result<Arc<LoraAdapter>> {
        self.stats.cache_misses += 1;
        let adapter = LoraAdapter::load(&req.name, &req.path, &self.model, self.cfg.max_lora_rank)?;
        tracing::debug!(adapter = %req.name, rank = adapter.rank, "loaded adapter from disk");
        Ok(Arc::new(adapter))
    }

    /// Inserts into the host cache, evicting the least recently used unpinned adapter when full.
    /// If every cached adapter is pinned the new one is not kept (it reloads when needed).
    fn insert(&mut self, id: AdapterId, adapter: Arc<LoraAdapter>, pinned: &[AdapterId]) {
        if self.cache.len() >= self.cfg.max_cpu_loras {
            let victim = self
                .cache
                .iter()
                .filter(|(k, _)| !pinned.contains(k))
                .min_by_key(|(_, c)| c.last_used)
                .map(|(&k, _)| k);
            match victim {
                Some(v) => {
                    self.cache.remove(&v);
                    self.stats.cache_evictions += 1;
                }
                None => return,
            }
        }
        self.tick += 1;
        self.cache.insert(
            id,
            Cached {
                adapter,
                last_used: self.tick,
            },
        );
    }

    /// Makes sure a registered adapter is in the host cache, reloading it from disk if it was
    /// evicted. `pinned`: adapters that must not be evicted to make room.
    pub fn ensure_cached(&mut self, id: AdapterId, pinned: &[AdapterId]) -> Result<()> {
        if self.cache.contains_key(&id) {
            return Ok(());
        }
        let req = self
            .known
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::InvalidConfig(format!("adapter id {} was never registered", id.0)))?;
        let adapter = self.load(&req)?;
        self.insert(id, adapter, pinned);
        Ok(())
    }

    /// Makes the step's adapters (at most `max_loras`, distinct) resident in device slots,
    /// reloading from disk any the host cache evicted, and returns the slot of each.
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
        for &id in step {
            self.tick += 1;
            let tick = self.tick;
            if let Some(s) = self.slots.iter().position(|s| s.is_some_and(|(a, _)| a == id)) {
                self.slots[s] = Some((id, tick));
                if let Some(c) = self.cache.get_mut(&id) {
                    c.last_used = tick;
                }
                self.stats.cache_hits += 1;
                slots_out.push(LoraSlot(s as u32));
                continue;
            }
            let adapter = match self.cache.get_mut(&id) {
                Some(c) => {
                    c.last_used = tick;
                    self.stats.cache_hits += 1;
                    c.adapter.clone()
                }
                None => {
                    let req = self.known.get(&id).cloned().ok_or_else(|| {
                        Error::InvalidConfig(format!("adapter id {} was never registered", id.0))
                    })?;
                    let adapter = self.load(&req)?;
                    self.insert(id, adapter.clone(), step);
                    adapter
                }
            };
            // A free slot, else the least recently used one this step does not need.
            let s = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_none_or(|(a, _)| !step.contains(&a)))
                .min_by_key(|(_, s)| s.map_or(0, |(_, t)| t))
                .map(|(i, _)| i)
                .expect("fewer step adapters than slots");
            backend.set_lora_slot(LoraSlot(s as u32), Some(&adapter));
            self.stats.slot_loads += 1;
            self.slots[s] = Some((id, tick));
            slots_out.push(LoraSlot(s as u32));
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
        fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) {
            self.loads += 1;
            match adapter {
                Some(a) => self.slots.insert(slot.0, a.name.clone()),
                None => self.slots.remove(&slot.0),
            };
        }
        fn forward(&mut self, _: &StepBatch) -> Result<&[f32]> {
            unreachable!()
        }
    }

    fn setup(max_loras: usize, max_cpu_loras: usize) -> (LoraManager, Vec<LoraRequest>) {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama");
        let cfg = ModelConfig::from_dir(&golden.join("model")).unwrap();
        let m = LoraManager::new(
            LoraConfig {
                max_loras,
                max_lora_rank: 16,
                max_cpu_loras,
            },
            &cfg,
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

    #[test]
    fn host_cache_is_lru_and_never_evicts_pinned() {
        let (mut m, r) = setup(1, 2);
        m.register(&r[0], &[]).unwrap();
        m.register(&r[1], &[]).unwrap();
        // full: registering c evicts the LRU unpinned one; a (pinned) survives
        m.register(&r[2], &[r[0].id]).unwrap();
        assert!(m.cache.contains_key(&r[0].id) && !m.cache.contains_key(&r[1].id));
        assert_eq!(m.stats.cache_evictions, 1);
        // everything pinned: d is validated but not kept
        m.register(&r[3], &[r[0].id, r[2].id]).unwrap();
        assert_eq!(m.num_cached(), 2);
        assert!(!m.cache.contains_key(&r[3].id));
        assert_eq!(m.stats.cache_misses, 4);
    }

    #[test]
    fn slots_are_reused_and_evicted_adapters_reload() {
        let (mut m, r) = setup(2, 2);
        let mut be = FakeBackend::default();
        let mut out = Vec::new();
        for req in &r {
            m.register(req, &[]).unwrap();
        }
        m.activate(&[r[0].id, r[1].id], &mut be, &mut out).unwrap();
        assert_eq!(be.loads, 2);
        // same adapters again: no copies
        m.activate(&[r[1].id, r[0].id], &mut be, &mut out).unwrap();
        assert_eq!(be.loads, 2);
        assert_eq!(be.slots[&out[0].0], "b_r4_qv_regex");
        // a was evicted from the host cache by c and d: it reloads from disk into a slot
        m.activate(&[r[2].id], &mut be, &mut out).unwrap();
        m.activate(&[r[3].id, r[2].id], &mut be, &mut out).unwrap();
        let misses = m.stats.cache_misses;
        m.activate(&[r[0].id], &mut be, &mut out).unwrap();
        assert_eq!(m.stats.cache_misses, misses + 1);
        assert_eq!(be.slots[&out[0].0], "a_r8_all");
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
            },
            &cfg,
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
