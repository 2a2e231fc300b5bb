//! Adapter uploads off the step. A loader thread converts each adapter to the device's element
//! type and slot layout ([`DeviceAdapter`], in pinned host memory), so filling a slot is only
//! asynchronous copies, issued on a stream of their own ([`SlotUploads`]) and ordered with
//! events instead of host waits:
//!
//! - after a slot's copies, an event on the upload stream; the compute stream waits on it
//!   (`cuStreamWaitEvent`) before the next step, so no step reads a half-written slot;
//! - after each step, an event on the compute stream for every slot the step read; the upload
//!   stream waits on it before overwriting that slot, so no running step sees its weights change.
//!
//! Slot buffers never move: a captured decode graph holds their base pointers and reads the slot
//! of each token from a device input buffer, so uploads change what a slot holds, never where.
//! The waits are issued outside capture, on the stream the graph is launched into.

use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use super::elem::Elem;
use super::gpu::cuda_err;
use crate::backend::{AdapterPreparer, PreparedAdapter};
use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::{LoraSlot, LoraTarget};
use crate::ModelConfig;

/// A LoRA projection group (projections sharing their input), as every layer has it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct GroupSpec {
    pub targets: Vec<LoraTarget>,
    /// in features
    pub k: usize,
    /// out features of each target
    pub outs: Vec<usize>,
}

impl GroupSpec {
    pub fn new(cfg: &ModelConfig, targets: Vec<LoraTarget>) -> Self {
        GroupSpec {
            k: targets[0].shape(cfg).0,
            outs: targets.iter().map(|t| t.shape(cfg).1).collect(),
            targets,
        }
    }
}

/// How slots lay adapters out: the groups of each layer, device rank `r`, element type.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SlotLayout {
    pub num_layers: usize,
    pub groups: Vec<GroupSpec>,
    /// device rank: `max_lora_rank` rounded up to 8; smaller ranks are zero-padded to it
    pub r: usize,
    pub elem: Elem,
}

/// One projection of one layer of an adapter in device form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Part {
    /// 0: not targeted (the kernels read nothing else of it)
    pub rank: i32,
    pub scale: f32,
    /// Where its A `[r, k]` and B `[out, r]` (zero-padded past `rank`) start in the host data,
    /// in elements; `None` when not targeted.
    pub data: Option<(usize, usize)>,
}

const NO_PART: Part = Part {
    rank: 0,
    scale: 0.0,
    data: None,
};

impl SlotLayout {
    fn parts_per_layer(&self) -> usize {
        self.groups.iter().map(|g| g.targets.len()).sum()
    }

    /// Device memory one slot takes over all layers: A, B, rank and scale of every target.
    pub fn bytes_per_slot(&self) -> usize {
        let per_layer: usize = (self.groups.iter())
            .map(|g| g.targets.len() * (self.r * g.k * 2 + 8) + g.outs.iter().sum::<usize>() * self.r * 2)
            .sum();
        self.num_layers * per_layer
    }

    /// Index in [`DeviceAdapter::parts`] of target `z` of group `g` in `layer`.
    fn part_index(&self, layer: usize, g: usize, z: usize) -> usize {
        let before: usize = self.groups[..g].iter().map(|g| g.targets.len()).sum();
        layer * self.parts_per_layer() + before + z
    }

    /// Where each targeted projection goes in the host data, and its length in elements.
    /// Untargeted projections take no room: a slot that held them gets rank 0, no weights.
    pub fn plan(&self, adapter: &LoraAdapter) -> (Vec<Part>, usize) {
        let mut parts = Vec::with_capacity(self.num_layers * self.parts_per_layer());
        let mut len = 0;
        for layer in 0..self.num_layers {
            for g in &self.groups {
                for (&t, &out) in g.targets.iter().zip(&g.outs) {
                    let Some(m) = adapter.module(layer, t) else {
                        parts.push(NO_PART);
                        continue;
                    };
                    assert!(
                        m.rank <= self.r,
                        "adapter rank checked against max_lora_rank at load"
                    );
                    parts.push(Part {
                        rank: m.rank as i32,
                        scale: m.scale,
                        data: Some((len, len + self.r * g.k)),
                    });
                    len += self.r * (g.k + out);
                }
            }
        }
        (parts, len)
    }

    /// Writes the planned projections into `out` (`[len]` from [`Self::plan`]): A `[rank, k]`
    /// then zero rows to `r`; B `[out, rank]` rows widened to `r` with zeros.
    pub fn pack(&self, adapter: &LoraAdapter, parts: &[Part], out: &mut [u16]) {
        // The kernels read ranks in chunks of 8: the padding must be zeros.
        out.fill(0);
        let r = self.r;
        for layer in 0..self.num_layers {
            for (gi, g) in self.groups.iter().enumerate() {
                for (z, &t) in g.targets.iter().enumerate() {
                    let Some((a_at, b_at)) = parts[self.part_index(layer, gi, z)].data else {
                        continue;
                    };
                    let m = adapter.module(layer, t).expect("planned from this adapter");
                    for (dst, &v) in out[a_at..][..m.rank * g.k].iter_mut().zip(&m.a) {
                        *dst = self.elem.encode(v);
                    }
                    let b_rows = out[b_at..][..g.outs[z] * r].chunks_exact_mut(r);
                    for (dst, src) in b_rows.zip(m.b.chunks_exact(m.rank)) {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = self.elem.encode(v);
                        }
                    }
                }
            }
        }
    }
}

/// Host memory copies read from: pinned where the driver gave it (asynchronous DMA), else
/// pageable (the driver stages each copy before returning: correct, slower).
#[derive(Debug)]
enum HostData {
    Pinned(PooledPinned),
    Pageable(Vec<u16>),
}

/// Page-locked buffers recycled between adapters. Allocating page-locked memory is one of the
/// calls after which CUDA lets no two streams' work overlap, and freeing it waits for the device;
/// with adapters loaded and evicted every few steps (thousands of adapters, a host cache of
/// hundreds), doing either per adapter put a stall into running steps. So a buffer, once
/// allocated, goes back here when its adapter is dropped and serves the next adapter of about
/// its size: once the host cache has filled, loads allocate nothing.
#[derive(Debug)]
pub(super) struct PinnedPool {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<PinnedHostSlice<u16>>>,
}

/// Free buffers the pool keeps; past that it frees the smallest (only adapters of many
/// different sizes get there).
const POOL_MAX_FREE: usize = 64;

impl PinnedPool {
    pub fn new(ctx: Arc<CudaContext>) -> Arc<Self> {
        Arc::new(PinnedPool {
            ctx,
            free: Mutex::new(Vec::new()),
        })
    }

    /// A buffer of at least `len` elements: the smallest free one that is no more than twice
    /// that, else a new one.
    fn take(self: &Arc<Self>, len: usize) -> std::result::Result<PooledPinned, cudarc::driver::DriverError> {
        let len = len.max(1);
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = (free.iter().enumerate())
                .filter(|(_, b)| b.len() >= len && b.len() <= 2 * len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let buf = match reused {
            Some(b) => b,
            // SAFETY: the caller writes the `len` elements it uses before any read (`pack`
            // zero-fills them).
            None => unsafe { self.ctx.alloc_pinned::<u16>(len)? },
        };
        Ok(PooledPinned {
            buf: Some(buf),
            len,
            pool: Arc::clone(self),
        })
    }

    fn give_back(&self, buf: PinnedHostSlice<u16>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buf);
        if free.len() > POOL_MAX_FREE {
            let smallest = (free.iter().enumerate())
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
                .expect("not empty");
            drop(free.swap_remove(smallest));
        }
    }
}

/// A pool buffer lent to one adapter (its first `len` elements); back to the pool on drop. An
/// adapter is dropped only once no copy reads it any more ([`SlotUploads`] holds it until its
/// copies are done), so the next adapter may overwrite the buffer at once.
#[derive(Debug)]
struct PooledPinned {
    buf: Option<PinnedHostSlice<u16>>,
    len: usize,
    pool: Arc<PinnedPool>,
}

impl PooledPinned {
    fn as_slice(&self) -> std::result::Result<&[u16], cudarc::driver::DriverError> {
        Ok(&self.buf.as_ref().expect("held until drop").as_slice()?[..self.len])
    }

    fn as_mut_slice(&mut self) -> std::result::Result<&mut [u16], cudarc::driver::DriverError> {
        Ok(&mut self.buf.as_mut().expect("held until drop").as_mut_slice()?[..self.len])
    }
}

impl Drop for PooledPinned {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give_back(b);
        }
    }
}

/// An adapter converted for the slots of one [`SlotLayout`].
#[derive(Debug)]
pub(super) struct DeviceAdapter {
    layout: SlotLayout,
    /// `[num_layers, targets of every group]`
    parts: Vec<Part>,
    host: HostData,
}

impl DeviceAdapter {
    /// Converts `adapter`; into pinned memory from `pool` when given (and the driver has it).
    pub fn new(adapter: &LoraAdapter, layout: &SlotLayout, pool: Option<&Arc<PinnedPool>>) -> Result<Self> {
        if !adapter.has_host_weights() {
            return Err(Error::Backend(format!(
                "adapter {:?} was prepared for other LoRA slots and no longer holds its weights",
                adapter.name
            )));
        }
        let (parts, len) = layout.plan(adapter);
        let pinned = pool.map(|p| p.take(len));
        let host = match pinned {
            Some(Ok(mut p)) => {
                let out = p.as_mut_slice().map_err(|e| cuda_err("pinned host memory", e))?;
                layout.pack(adapter, &parts, &mut out[..len]);
                HostData::Pinned(p)
            }
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(adapter = %adapter.name, "no pinned host memory ({e:?}); its uploads are staged by the driver");
                }
                let mut v = vec![0u16; len];
                layout.pack(adapter, &parts, &mut v);
                HostData::Pageable(v)
            }
        };
        Ok(DeviceAdapter {
            layout: layout.clone(),
            parts,
            host,
        })
    }

    pub fn is_for(&self, layout: &SlotLayout) -> bool {
        self.layout == *layout
    }

    pub fn part(&self, layer: usize, g: usize, z: usize) -> &Part {
        &self.parts[self.layout.part_index(layer, g, z)]
    }

    /// The host data (pinned: waits for nothing, no copy reads it through cudarc).
    pub fn host(&self) -> Result<&[u16]> {
        match &self.host {
            HostData::Pinned(p) => p.as_slice().map_err(|e| cuda_err("pinned host memory", e)),
            HostData::Pageable(v) => Ok(v),
        }
    }
}

/// Converts adapters for the slots on the loader threads.
#[derive(Debug)]
pub(super) struct CudaPreparer {
    pub pool: Arc<PinnedPool>,
    pub layout: SlotLayout,
}

impl AdapterPreparer for CudaPreparer {
    fn prepare(&self, adapter: &LoraAdapter) -> Result<PreparedAdapter> {
        let d = DeviceAdapter::new(adapter, &self.layout, Some(&self.pool))?;
        Ok(PreparedAdapter(Arc::new(d)))
    }

    fn replaces_host_weights(&self) -> bool {
        true
    }
}

/// The upload stream and the events that order it with the compute stream, per slot.
pub(super) struct SlotUploads {
    pub stream: Arc<CudaStream>,
    /// `[max_loras]` recorded on the upload stream after a slot's copies
    ready: Vec<CudaEvent>,
    /// `[max_loras]` recorded on the compute stream after a step that read the slot
    read: Vec<CudaEvent>,
    /// Slots with copies the compute stream has not yet waited for.
    pending: Vec<usize>,
    /// `[max_loras]` what each slot's copies read from, kept alive until they are done
    held: Vec<Option<Arc<DeviceAdapter>>>,
    /// `[max_loras]` scratch: slots already marked read in this step
    marked: Vec<bool>,
    step_slots: Vec<usize>,
    /// Wait for every slot's copies before returning (the reference the events are tested
    /// against).
    sync: bool,
    /// See [`super::CudaOptions::upload_delay_us`].
    delay_us: u32,
}

impl SlotUploads {
    pub fn new(ctx: &Arc<CudaContext>, max_loras: usize, sync: bool, delay_us: u32) -> Result<Self> {
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating the upload stream", e))?;
        let event = || {
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
                .map_err(|e| cuda_err("creating an event", e))
        };
        Ok(SlotUploads {
            stream,
            ready: (0..max_loras).map(|_| event()).collect::<Result<_>>()?,
            read: (0..max_loras).map(|_| event()).collect::<Result<_>>()?,
            pending: Vec::new(),
            held: vec![None; max_loras],
            marked: vec![false; max_loras],
            step_slots: Vec::new(),
            sync,
            delay_us,
        })
    }

    /// Before the copies into `slot`: the upload stream waits for the steps that read it, and
    /// the copies that last filled it are done (so what they read may be freed).
    pub fn begin(&mut self, slot: LoraSlot) -> Result<()> {
        let s = slot.index();
        self.stream
            .wait(&self.read[s])
            .map_err(|e| cuda_err("upload stream wait", e))?;
        if self.held[s].is_some() {
            self.ready[s]
                .synchronize()
                .map_err(|e| cuda_err("waiting for a slot's last upload", e))?;
            self.held[s] = None;
        }
        if self.delay_us > 0 {
            // The micro-second count travels as the callback's pointer-sized argument.
            let arg = self.delay_us as usize as *mut std::ffi::c_void;
            // SAFETY: a host function that only sleeps (it calls no CUDA API), ordered on the
            // upload stream; its argument is a plain integer, not dereferenced.
            unsafe { cudarc::driver::sys::cuLaunchHostFunc(self.stream.cu_stream(), Some(sleep_us), arg) }
                .result()
                .map_err(|e| cuda_err("delaying the upload stream (tests)", e))?;
        }
        Ok(())
    }

    /// After the copies into `slot` (which read from `adapter`): the event the compute stream
    /// will wait on, or, synchronous, the wait itself.
    pub fn end(&mut self, slot: LoraSlot, adapter: Option<Arc<DeviceAdapter>>) -> Result<()> {
        let s = slot.index();
        self.ready[s]
            .record(&self.stream)
            .map_err(|e| cuda_err("event record", e))?;
        if self.sync {
            self.stream
                .synchronize()
                .map_err(|e| cuda_err("upload stream synchronize", e))?;
        } else if !self.pending.contains(&s) {
            self.pending.push(s);
        }
        self.held[s] = adapter;
        Ok(())
    }

    /// Before a step on `compute`: it waits for the slots filled since the last step.
    pub fn before_step(&mut self, compute: &CudaStream) -> Result<()> {
        for s in self.pending.drain(..) {
            compute
                .wait(&self.ready[s])
                .map_err(|e| cuda_err("compute stream wait", e))?;
        }
        Ok(())
    }

    /// After a step on `compute` whose tokens used `token_lora`: marks those slots read.
    /// Costs the step's tokens, not `max_loras`.
    pub fn after_step(&mut self, compute: &CudaStream, token_lora: &[Option<LoraSlot>]) -> Result<()> {
        self.step_slots.clear();
        for s in token_lora.iter().flatten().map(|s| s.index()) {
            if !self.marked[s] {
                self.marked[s] = true;
                self.step_slots.push(s);
            }
        }
        for &s in &self.step_slots {
            self.marked[s] = false;
            self.read[s]
                .record(compute)
                .map_err(|e| cuda_err("event record", e))?;
        }
        Ok(())
    }
}

impl Drop for SlotUploads {
    fn drop(&mut self) {
        // The held host memory may be freed only once no copy reads it.
        let _ = self.stream.synchronize();
    }
}

/// A stream-ordered sleep of `arg` microseconds (see [`SlotUploads::begin`]).
unsafe extern "C" fn sleep_us(arg: *mut std::ffi::c_void) {
    std::thread::sleep(std::time::Duration::from_micros(arg as usize as u64));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::adapter::LoraModule;

    fn model() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llama/model");
        ModelConfig::from_dir(&dir).unwrap()
    }

    fn module(rank: usize, k: usize, n: usize, seed: f32) -> LoraModule {
        LoraModule {
            rank,
            scale: 0.5 * seed,
            a: (0..rank * k).map(|i| seed + i as f32).collect(),
            b: (0..n * rank).map(|i| -seed - i as f32).collect(),
        }
    }

    /// Ranks below the device rank are padded with zeros in both A's rows and B's columns,
    /// untargeted projections take no room, and each part finds its own weights.
    #[test]
    fn mixed_ranks_pack_padded_and_in_place() {
        let cfg = model();
        let layout = SlotLayout {
            num_layers: cfg.num_hidden_layers,
            groups: vec![
                GroupSpec::new(
                    &cfg,
                    vec![LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj],
                ),
                GroupSpec::new(&cfg, vec![LoraTarget::OProj]),
            ],
            r: 16,
            elem: Elem::F16,
        };
        let (h, q, kv) = (cfg.hidden_size, cfg.q_size(), cfg.kv_size());
        // Layer 0: q at rank 4, v at rank 16 (no k); the last layer: o at rank 8.
        let last = cfg.num_hidden_layers - 1;
        let mut modules = vec![None; cfg.num_hidden_layers * LoraTarget::ALL.len()];
        modules[LoraTarget::QProj.index()] = Some(module(4, h, q, 1.0));
        modules[LoraTarget::VProj.index()] = Some(module(16, h, kv, 2.0));
        modules[last * LoraTarget::ALL.len() + LoraTarget::OProj.index()] = Some(module(8, q, h, 3.0));
        let adapter = LoraAdapter::from_modules("t", cfg.num_hidden_layers, modules);
        let (parts, len) = layout.plan(&adapter);
        assert_eq!(len, 16 * (h + q) + 16 * (h + kv) + 16 * (q + h));
        let mut out = vec![0xffffu16; len];
        layout.pack(&adapter, &parts, &mut out);
        let dev = DeviceAdapter {
            layout: layout.clone(),
            parts,
            host: HostData::Pageable(out),
        };
        let host = dev.host().unwrap();
        let f = |i: usize| Elem::F16.decode(host[i]);

        let pq = *dev.part(0, 0, 0);
        assert_eq!((pq.rank, pq.scale), (4, 0.5));
        let (a, b) = pq.data.unwrap();
        assert_eq!(
            (f(a), f(a + h + 1), f(a + 3 * h + h - 1)),
            (1.0, 1.0 + (h + 1) as f32, (4 * h) as f32)
        );
        assert!(
            (4 * h..16 * h).all(|i| f(a + i) == 0.0),
            "A rows past the rank are zero"
        );
        // B row o holds the rank-4 row o, then 12 zeros.
        for o in [0, 1, q - 1] {
            for j in 0..16 {
                let want = if j < 4 { -1.0 - (o * 4 + j) as f32 } else { 0.0 };
                assert_eq!(f(b + o * 16 + j), want, "B[{o}, {j}]");
            }
        }
        assert_eq!(*dev.part(0, 0, 1), NO_PART, "k is not targeted");
        let pv = *dev.part(0, 0, 2);
        assert_eq!(pv.rank, 16);
        assert_eq!(f(pv.data.unwrap().1 + 16 * kv - 1), -2.0 - (16 * kv - 1) as f32);
        assert_eq!(*dev.part(0, 1, 0), NO_PART);
        assert_eq!(*dev.part(last, 0, 0), NO_PART);
        let po = *dev.part(last, 1, 0);
        assert_eq!((po.rank, po.scale), (8, 1.5));
        assert_eq!(po.data.unwrap().0, 16 * (h + q) + 16 * (h + kv));
        assert_eq!(f(po.data.unwrap().0), 3.0);
        // Per layer: q/k/v A 3·16·64 and B (64+32+32)·16, o A and B 16·64 each, 16-bit; 4 ranks
        // and scales of 4 bytes.
        let per_layer = 2 * (3 * 16 * h + (q + 2 * kv) * 16 + 16 * q + h * 16) + 4 * 8;
        assert_eq!(layout.bytes_per_slot(), cfg.num_hidden_layers * per_layer);
        assert!(dev.is_for(&layout));
        assert!(!dev.is_for(&SlotLayout {
            r: 8,
            ..layout.clone()
        }));
        // Once its weights are dropped (the host cache keeps only this form), it cannot be
        // converted again: an error, not an empty adapter.
        let mut dropped = adapter;
        dropped.drop_host_weights();
        let err = DeviceAdapter::new(&dropped, &layout, None).unwrap_err();
        assert!(err.to_string().contains("no longer holds its weights"), "{err}");
    }
}
