//! The CUDA backend: the Llama-family decoder on one NVIDIA GPU, behind the same [`Backend`]
//! boundary as the CPU one. Weights, LoRA weights, GEMM inputs and the KV cache in bf16 or f16
//! ([`elem::Elem`], the engine's resolved dtype), f32 residual stream and accumulation.
//!
//! Libraries (driver, NVRTC, cuBLAS) are loaded at run time, so this compiles and its tests run
//! on machines without CUDA; asking for it there is an error, never a panic. Steps of up to 8
//! tokens use our tensor-core skinny GEMM ([`skinny`], the next elementwise op fused), larger
//! ones cuBLAS. Every kernel of ours is launched with programmatic dependent launch
//! ([`gpu::Gpu::launch`]): it may start while the kernel ahead drains, and loads what does not
//! depend on that kernel (weights, adapter rows, cached keys) before waiting for it.
//! LoRA is one shrink and one expand per projection group for any mix of adapters: BGMV for
//! decode (the expand fused into RoPE and RMSNorm), segmented SGMV for long prefills. Decode
//! steps are captured once per batch-size bucket as CUDA graphs (unless `enforce_eager`) over
//! persistent input buffers, and every step is timed with CUDA events. Tokens are sampled on the
//! device ([`sampling`]), inside the graph, so a step copies back only token ids unless logits
//! are asked for. Adapters reach their slots by asynchronous copies on an upload stream, fenced
//! with per-slot events (`cuda/upload.rs`).

pub mod elem;
pub mod gpu;
pub mod kernels;
pub mod launch;
mod lora;
pub mod model;
pub mod plan;
pub mod prefill;
pub mod sampling;
pub mod sgmv;
pub mod skinny;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph};

use crate::backend::{AdapterPreparer, Backend, KvCacheSize, StepBatch};
use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::LoraSlot;
use crate::weights::WeightSource;
use crate::ModelConfig;
use elem::Elem;
use gpu::{cuda_err, Gpu};
use model::{CudaModel, StepShape};
use sampling::DeviceSampler;
use upload::{CudaPreparer, DeviceAdapter, PinnedPool, SlotLayout, SlotUploads};

/// Bytes one KV block takes over all layers (K and V, 16-bit elements).
pub fn kv_bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
    2 * cfg.num_hidden_layers * block_size * cfg.kv_size() * 2
}

/// Memory kept free for what is allocated after the KV cache: CUDA graphs (captured per batch
/// size on first use) and the driver's own allocations.
pub const GRAPH_RESERVE_BYTES: usize = 512 << 20;

/// Bytes the KV cache may take on a card of `total` bytes with `free` left after loading, when
/// this process may use `utilization` of the card (vLLM's `gpu_memory_utilization`): that share
/// less what is already used (by us, or by anyone else on the card) and [`GRAPH_RESERVE_BYTES`].
pub fn kv_memory(total: usize, free: usize, utilization: f32) -> usize {
    let allowed = (total as f64 * utilization as f64) as usize;
    let used = total.saturating_sub(free);
    allowed.saturating_sub(used + GRAPH_RESERVE_BYTES)
}

/// A captured decode step. The backend (and so its graphs) moves between threads but is used
/// by one at a time; the graph's launch binds the context to the calling thread.
struct Graph(CudaGraph);
// SAFETY: CUDA graph handles are not tied to the thread that created them.
unsafe impl Send for Graph {}

/// Tuning switches of the CUDA backend (fields of the engine's config; the CLI maps
/// `MULTILORA_SKINNY_MAX_M`, `MULTILORA_PDL` and `MULTILORA_CACHE_DIR` onto them, for
/// comparisons). The defaults are what measured fastest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// Largest token count whose projections run on the skinny GEMM (at most
    /// [`skinny::SKINNY_MAX_M`]); cuBLAS above. 0: cuBLAS for every projection.
    pub skinny_max_m: usize,
    /// Programmatic dependent launch on sm_90+ ([`gpu::Gpu::launch`]).
    pub pdl: bool,
    /// Where compiled kernels are cached; `None`: `~/.cache/multilora`.
    pub kernel_cache_dir: Option<PathBuf>,
    /// Tests: the upload stream sleeps this many microseconds before each slot's copies, so a
    /// step that did not wait for its slots' copies would read them unwritten. 0: no delay.
    #[doc(hidden)]
    pub upload_delay_us: u32,
}

impl CudaOptions {
    /// Sets the switches named by variables (`get` reads one; the CLI passes the environment):
    /// `MULTILORA_SKINNY_MAX_M=N` (the skinny GEMM up to N tokens, 0: cuBLAS only),
    /// `MULTILORA_PDL=0` (plain launches), `MULTILORA_CACHE_DIR` (the kernel cache). A value
    /// that does not parse is an error naming it.
    pub fn apply_vars(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        let bad = |k: &str, v: &str, want: &str| Error::InvalidConfig(format!("{k}={v:?}: expected {want}"));
        if let Some(v) = get("MULTILORA_SKINNY_MAX_M") {
            let max = skinny::SKINNY_MAX_M;
            match v.trim().parse::<usize>() {
                Ok(n) if n <= max => self.skinny_max_m = n,
                _ => {
                    return Err(bad(
                        "MULTILORA_SKINNY_MAX_M",
                        &v,
                        &format!("a token count from 0 to {max}"),
                    ))
                }
            }
        }
        if let Some(v) = get("MULTILORA_PDL") {
            self.pdl = match v.trim() {
                "0" | "false" => false,
                "1" | "true" => true,
                _ => return Err(bad("MULTILORA_PDL", &v, "0 or 1")),
            };
        }
        if let Some(v) = get("MULTILORA_CACHE_DIR").filter(|v| !v.is_empty()) {
            self.kernel_cache_dir = Some(PathBuf::from(v));
        }
        Ok(())
    }
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            skinny_max_m: skinny::SKINNY_DEFAULT_M,
            pdl: true,
            kernel_cache_dir: None,
            upload_delay_us: 0,
        }
    }
}

pub struct CudaBackend {
    // Field order is drop order: graphs and the device buffers before the context.
    /// Keyed by (bucket, LoRA mask, samples on the device)
    graphs: HashMap<(usize, u8, bool), Graph>,
    /// Holds the host memory of copies in flight: dropped (after waiting for them) before the
    /// slots they write and the context.
    uploads: Option<SlotUploads>,
    /// Page-locked buffers the loader threads convert adapters into, recycled.
    pinned: Arc<PinnedPool>,
    model: CudaModel,
    sampler: DeviceSampler,
    gpu: Gpu,
    enforce_eager: bool,
    /// Host copy of the step's inputs, laid out as the device arena.
    arena: Vec<u32>,
    logits: Vec<f32>,
    events: (CudaEvent, CudaEvent),
    last_device_time: Option<Duration>,
    /// How the slots lay adapters out; `None` without LoRA.
    lora_layout: Option<SlotLayout>,
    kv_size: KvCacheSize,
    /// The last step had more tokens than sequences, so it kept its residual stream whole
    /// ([`CudaModel::record_token_logits`] may read it).
    last_had_prompt_rows: bool,
}

impl CudaBackend {
    pub fn new(
        cfg: &ModelConfig,
        weights: &mut WeightSource,
        bc: &crate::backend::BackendConfig,
    ) -> Result<Self> {
        if bc.tensor_parallel_size > 1 {
            return Err(Error::InvalidConfig(format!(
                "tensor_parallel_size {}: the CUDA backend runs on one GPU; set it to 1 (the CPU backend runs tensor-parallel ranks in one process)",
                bc.tensor_parallel_size
            )));
        }
        // Weights, activations and the KV cache are 16-bit here: float32 runs as bfloat16.
        let elem = Elem::from_dtype(&bc.dtype, cfg.torch_dtype.as_deref()).unwrap_or_else(|| {
            let wanted = match bc.dtype.as_str() {
                "auto" => cfg.torch_dtype.as_deref().unwrap_or("auto"),
                d => d,
            };
            tracing::warn!(
                "the CUDA backend keeps weights, activations and the KV cache in bfloat16 or float16; dtype {wanted} is run as bfloat16"
            );
            Elem::Bf16
        });
        let gpu = Gpu::with_options(0, elem, &bc.cuda)?;
        let mut model = CudaModel::load(&gpu, cfg, weights, bc, bc.seed)?;
        let sampler = DeviceSampler::new(&gpu, bc.max_num_seqs)?;
        gpu.sync()?;
        // The KV cache takes what the weights, adapter slots and buffers left of the share of
        // the card gpu_memory_utilization allows.
        let (free, total) =
            cudarc::driver::result::mem_get_info().map_err(|e| cuda_err("reading free memory", e))?;
        let bytes_per_block = kv_bytes_per_block(cfg, bc.block_size);
        let available = kv_memory(total, free, bc.kv.gpu_memory_utilization);
        let num_blocks = bc.kv.blocks(bytes_per_block, available);
        model.alloc_kv(&gpu, num_blocks)?;
        let kv_size = KvCacheSize {
            num_blocks,
            bytes_per_block,
        };
        let events = (gpu.timing_event()?, gpu.timing_event()?);
        let lora_layout = model.lora_layout(elem);
        if let Some(l) = &lora_layout {
            let mib = (l.bytes_per_slot() * bc.max_loras) as f64 / f64::from(1 << 20);
            tracing::info!(
                max_loras = bc.max_loras,
                device_rank = l.r,
                "LoRA slots take {mib:.0} MiB of device memory"
            );
        }
        let uploads = lora_layout
            .as_ref()
            .map(|_| {
                SlotUploads::new(
                    &gpu.ctx,
                    bc.max_loras,
                    bc.sync_lora_uploads,
                    bc.cuda.upload_delay_us,
                )
            })
            .transpose()?;
        Ok(CudaBackend {
            graphs: HashMap::new(),
            uploads,
            pinned: PinnedPool::new(gpu.ctx.clone()),
            lora_layout,
            arena: vec![0; model.arena_len()],
            logits: Vec::new(),
            model,
            sampler,
            gpu,
            enforce_eager: bc.enforce_eager,
            events,
            last_device_time: None,
            kv_size,
            last_had_prompt_rows: false,
        })
    }

    /// The graph bucket a decode step of `num_seqs` sequences pads to, if any.
    fn bucket(&self, num_seqs: usize) -> Option<usize> {
        let b = if num_seqs <= 8 {
            num_seqs.next_power_of_two()
        } else {
            num_seqs.div_ceil(8) * 8
        };
        (b <= self.model.max_graph_tokens()).then_some(b)
    }

    /// Enqueues (or replays) the step's kernels, sampling on the device with `sample`, between
    /// the timing events.
    fn run(&mut self, batch: &StepBatch, sample: bool) -> Result<()> {
        self.gpu.bind()?;
        let num_tokens = batch.num_tokens();
        let num_seqs = batch.num_seqs();
        let is_decode = num_tokens == num_seqs;
        self.last_had_prompt_rows = !is_decode;
        let lora_mask = if batch.has_lora() {
            self.model.lora_mask()
        } else {
            0
        };
        let bucket = (!self.enforce_eager && is_decode)
            .then(|| self.bucket(num_seqs))
            .flatten();
        let mut shape = StepShape {
            num_tokens: bucket.unwrap_or(num_tokens),
            num_seqs: bucket.unwrap_or(num_seqs),
            lora_mask,
            num_lora_segments: 0,
            att_tiles: prefill::Packed::default(),
        };
        self.model.pack_inputs(batch, &mut shape, &mut self.arena);
        self.model.upload_inputs(&self.gpu, &self.arena, shape)?;
        if sample {
            self.sampler.upload(&self.gpu, &batch.sampling, shape.num_seqs)?;
        }

        if let Some(u) = self.uploads.as_mut() {
            // Outside the timed span, as the host copies before this design were.
            u.before_step(&self.gpu.stream)?;
        }
        let launched = self.launch(bucket, lora_mask, sample, shape);
        if launched.is_err() {
            // Kernels queued before the failure may still read adapter slots, and the step's
            // reads are fenced only after a launch that succeeds: let them finish before any
            // upload may overwrite a slot.
            let _ = self.gpu.stream.synchronize();
        }
        launched?;
        match self.uploads.as_mut() {
            Some(u) if lora_mask != 0 => u.after_step(&self.gpu.stream, &batch.token_lora),
            _ => Ok(()),
        }
    }

    /// Records (or replays, for a decode bucket) the step between the timing events.
    fn launch(&mut self, bucket: Option<usize>, lora_mask: u8, sample: bool, shape: StepShape) -> Result<()> {
        let (start, end) = &self.events;
        start
            .record(&self.gpu.stream)
            .map_err(|e| cuda_err("event record", e))?;
        match bucket {
            Some(b) => {
                let key = (b, lora_mask, sample);
                if !self.graphs.contains_key(&key) {
                    let stream = &self.gpu.stream;
                    stream
                        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                        .map_err(|e| cuda_err("begin graph capture", e))?;
                    let recorded = self.record(shape, sample);
                    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
                    recorded?;
                    let graph = graph
                        .map_err(|e| cuda_err("end graph capture", e))?
                        .ok_or_else(|| Error::Backend("graph capture produced no graph".into()))?;
                    self.graphs.insert(key, Graph(graph));
                }
                self.graphs[&key]
                    .0
                    .launch()
                    .map_err(|e| cuda_err("graph launch", e))?;
            }
            None => self.record(shape, sample)?,
        }
        end.record(&self.gpu.stream)
            .map_err(|e| cuda_err("event record", e))
    }

    /// The model's kernels, then the sampler's over the (padded) rows.
    fn record(&self, shape: StepShape, sample: bool) -> Result<()> {
        self.model.record_forward(&self.gpu, shape)?;
        if sample {
            let vocab = self.model.vocab_size();
            let logits = self.model.logits_ptr();
            self.sampler.record(&self.gpu, logits, shape.num_seqs, vocab)?;
        }
        Ok(())
    }

    /// Copies the first `num_seqs` rows of logits to the host (waits for the step).
    fn download_logits(&mut self, num_seqs: usize) -> Result<()> {
        let vocab = self.model.vocab_size();
        self.logits.resize(num_seqs * vocab, 0.0);
        self.gpu.dtoh(&mut self.logits, self.model.logits_ptr())
    }

    /// Reads the step's device time (after the step completed).
    fn finish_timing(&mut self) -> Result<()> {
        let (start, end) = &self.events;
        let ms = start.elapsed_ms(end).map_err(|e| cuda_err("event elapsed", e))?;
        self.last_device_time = Some(Duration::from_secs_f64(ms as f64 / 1e3));
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn device_name(&self) -> String {
        format!("cuda ({}, {} SMs)", self.gpu.name, self.gpu.num_sms)
    }

    fn kv_cache(&self) -> KvCacheSize {
        self.kv_size
    }

    fn dtype(&self) -> &'static str {
        self.gpu.elem.name()
    }

    fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) -> Result<()> {
        self.gpu.bind()?;
        let (Some(layout), Some(uploads)) = (&self.lora_layout, self.uploads.as_mut()) else {
            return Err(Error::Backend("set_lora_slot with LoRA disabled".into()));
        };
        // The form the loader thread made; else (an adapter that bypassed the loader) made now.
        let prepared = adapter.and_then(|a| a.prepared.as_ref()).and_then(|p| {
            let d = p.0.clone().downcast::<DeviceAdapter>().ok()?;
            d.is_for(layout).then_some(d)
        });
        let device = match (adapter, prepared) {
            (Some(_), Some(d)) => Some(d),
            (Some(a), None) => Some(Arc::new(DeviceAdapter::new(a, layout, None)?)),
            (None, _) => None,
        };
        self.model.set_lora_slot(uploads, slot, device)
    }

    fn adapter_preparer(&self) -> Option<Arc<dyn AdapterPreparer>> {
        let layout = self.lora_layout.clone()?;
        Some(Arc::new(CudaPreparer {
            pool: self.pinned.clone(),
            layout,
        }))
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<&[f32]> {
        self.run(batch, false)?;
        self.download_logits(batch.num_seqs())?;
        self.finish_timing()?;
        Ok(&self.logits)
    }

    fn token_logits(&mut self, rows: &[u32]) -> Result<&[f32]> {
        // Only rows a prefill or mixed step asked for: a decode step's every row is a
        // sequence's last and came back from `forward` (and a decode step may split its norms,
        // leaving no residual stream to read).
        if !self.last_had_prompt_rows {
            return Err(Error::Backend(
                "token logits asked of a step with no prompt chunk longer than one token".into(),
            ));
        }
        self.gpu.bind()?;
        self.model.record_token_logits(&self.gpu, rows)?;
        self.download_logits(rows.len())?;
        Ok(&self.logits)
    }

    fn can_sample(&self, batch: &StepBatch) -> bool {
        self.sampler.fits(&batch.sampling)
    }

    fn forward_sample(&mut self, batch: &StepBatch, with_logits: bool) -> Result<(&[u32], Option<&[f32]>)> {
        let num_seqs = batch.num_seqs();
        assert_eq!(batch.sampling.rows.len(), num_seqs, "a sampling row per sequence");
        self.run(batch, true)?;
        if with_logits {
            self.download_logits(num_seqs)?;
        }
        let vocab = self.model.vocab_size();
        self.sampler.download_ids(&self.gpu, num_seqs)?;
        self.finish_timing()?;
        let ids = self.sampler.ids();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::Backend(format!(
                "the device sampler returned token id {bad}, outside the vocabulary ({vocab})"
            )));
        }
        Ok((ids, with_logits.then_some(&self.logits[..])))
    }

    fn last_device_time(&self) -> Option<Duration> {
        self.last_device_time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
    }

    #[test]
    fn the_kv_cache_gets_the_allowed_share_less_what_is_used() {
        const GIB: usize = 1 << 30;
        // 141 GiB card, 0.9 allowed, 14 GiB used by weights and buffers.
        let got = kv_memory(141 * GIB, 127 * GIB, 0.9);
        let allowed = (141.0 * GIB as f64 * 0.9f32 as f64) as usize;
        assert_eq!(got, allowed - 14 * GIB - GRAPH_RESERVE_BYTES);
        // Another process's memory on the card counts as used too (117 GiB of it here): nothing
        // left is 0, not an underflow.
        assert_eq!(kv_memory(141 * GIB, 10 * GIB, 0.9), 0);
        assert_eq!(kv_memory(141 * GIB, 141 * GIB, 0.0), 0);
    }

    #[test]
    fn switches_come_from_variables_and_bad_values_are_refused() {
        let mut o = CudaOptions::default();
        o.apply_vars(vars(&[])).unwrap();
        assert_eq!(o, CudaOptions::default());
        let set = [
            ("MULTILORA_SKINNY_MAX_M", "0"),
            ("MULTILORA_PDL", "0"),
            ("MULTILORA_CACHE_DIR", "/tmp/k"),
        ];
        o.apply_vars(vars(&set)).unwrap();
        assert_eq!((o.skinny_max_m, o.pdl), (0, false));
        assert_eq!(o.kernel_cache_dir, Some(PathBuf::from("/tmp/k")));
        for bad in [
            ("MULTILORA_SKINNY_MAX_M", "64"),
            ("MULTILORA_SKINNY_MAX_M", "x"),
            ("MULTILORA_PDL", "no"),
        ] {
            let err = o.apply_vars(vars(&[bad])).unwrap_err().to_string();
            assert!(err.contains(bad.0) && err.contains(bad.1), "{err}");
        }
    }
}
