//! The CUDA backend: the Llama-family decoder on one NVIDIA GPU, behind the same [`Backend`]
//! boundary as the CPU one. bf16 weights and KV cache, f32 residual stream and accumulation.
//!
//! Libraries (driver, NVRTC, cuBLAS) are loaded at run time, so this compiles and its tests run
//! on machines without CUDA; asking for it there is an error, never a panic. Projections use our
//! own weight-streaming GEMV for up to [`kernels::GEMV_MAX_M`] tokens and cuBLAS above; LoRA is
//! one shrink and one expand per projection group for any mix of adapters (BGMV for decode,
//! segmented SGMV for prefill). Decode steps are captured once per batch-size bucket as CUDA
//! graphs (unless `enforce_eager`) over persistent input buffers, and every step is timed with
//! CUDA events.

pub mod gpu;
pub mod kernels;
pub mod model;
pub mod sgmv;

use std::collections::HashMap;
use std::time::Duration;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph};

use crate::backend::{Backend, StepBatch};
use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::LoraSlot;
use crate::weights::WeightSource;
use crate::ModelConfig;
use gpu::{cuda_err, Gpu};
use model::{CudaModel, StepShape};

/// Bytes one KV block takes over all layers (K and V, bf16).
pub fn kv_bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
    2 * cfg.num_hidden_layers * block_size * cfg.kv_size() * 2
}

/// A captured decode step. The backend (and so its graphs) moves between threads but is used
/// by one at a time; the graph's launch binds the context to the calling thread.
struct Graph(CudaGraph);
// SAFETY: CUDA graph handles are not tied to the thread that created them.
unsafe impl Send for Graph {}

pub struct CudaBackend {
    // Field order is drop order: graphs and the model's buffers before the context.
    graphs: HashMap<(usize, u8), Graph>,
    model: CudaModel,
    gpu: Gpu,
    enforce_eager: bool,
    /// Host copy of the step's inputs, laid out as the device arena.
    arena: Vec<u32>,
    logits: Vec<f32>,
    events: (CudaEvent, CudaEvent),
    last_device_time: Option<Duration>,
    /// An error from `set_lora_slot` (which cannot return one), reported by the next forward.
    pending: Option<Error>,
}

impl CudaBackend {
    pub fn new(
        cfg: &ModelConfig,
        weights: &mut WeightSource,
        bc: &crate::backend::BackendConfig,
    ) -> Result<Self> {
        let gpu = Gpu::new(0)?;
        let model = CudaModel::load(&gpu, cfg, weights, bc, bc.seed)?;
        gpu.sync()?;
        let events = (gpu.timing_event()?, gpu.timing_event()?);
        Ok(CudaBackend {
            graphs: HashMap::new(),
            arena: vec![0; model.arena_len()],
            logits: Vec::new(),
            model,
            gpu,
            enforce_eager: bc.enforce_eager,
            events,
            last_device_time: None,
            pending: None,
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
}

impl Backend for CudaBackend {
    fn device_name(&self) -> String {
        format!("cuda ({}, {} SMs)", self.gpu.name, self.gpu.num_sms)
    }

    fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) {
        let done = self
            .gpu
            .bind()
            .and_then(|_| self.model.set_lora_slot(&self.gpu, slot, adapter));
        if let Err(e) = done {
            self.pending.get_or_insert(e);
        }
    }

    fn forward(&mut self, batch: &StepBatch) -> Result<&[f32]> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        self.gpu.bind()?;
        let num_tokens = batch.num_tokens();
        let num_seqs = batch.num_seqs();
        let is_decode = num_tokens == num_seqs;
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
        };
        shape.num_lora_segments = self.model.pack_inputs(batch, shape, &mut self.arena);
        self.model.upload_inputs(&self.gpu, &self.arena)?;

        let (start, end) = &self.events;
        start
            .record(&self.gpu.stream)
            .map_err(|e| cuda_err("event record", e))?;
        match bucket {
            Some(b) => {
                let key = (b, lora_mask);
                if !self.graphs.contains_key(&key) {
                    let stream = &self.gpu.stream;
                    stream
                        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                        .map_err(|e| cuda_err("begin graph capture", e))?;
                    let recorded = self.model.record_forward(&self.gpu, shape);
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
            None => self.model.record_forward(&self.gpu, shape)?,
        }
        end.record(&self.gpu.stream)
            .map_err(|e| cuda_err("event record", e))?;

        let vocab = self.model.vocab_size();
        self.logits.resize(num_seqs * vocab, 0.0);
        self.gpu.dtoh(&mut self.logits, self.model.logits_ptr())?;
        let ms = start.elapsed_ms(end).map_err(|e| cuda_err("event elapsed", e))?;
        self.last_device_time = Some(Duration::from_secs_f64(ms as f64 / 1e3));
        Ok(&self.logits)
    }

    fn last_device_time(&self) -> Option<Duration> {
        self.last_device_time
    }
}
