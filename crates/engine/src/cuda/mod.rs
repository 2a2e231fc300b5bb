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
//! are asked for.

pub mod elem;
pub mod gpu;
pub mod kernels;
mod lora;
pub mod model;
pub mod prefill;
pub mod sampling;
pub mod sgmv;
pub mod skinny;

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
use elem::Elem;
use gpu::{cuda_err, Gpu};
use model::{CudaModel, StepShape};
use sampling::DeviceSampler;

/// Bytes one KV block takes over all layers (K and V, 16-bit elements).
pub fn kv_bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
    2 * cfg.num_hidden_layers * block_size * cfg.kv_size() * 2
}

/// A captured decode step. The backend (and so its graphs) moves between threads but is used
/// by one at a time; the graph's launch binds the context to the calling thread.
struct Graph(CudaGraph);
// SAFETY: CUDA graph handles are not tied to the thread that created them.
unsafe impl Send for Graph {}

pub struct CudaBackend {
    // Field order is drop order: graphs and the device buffers before the context.
    /// Keyed by (bucket, LoRA mask, samples on the device)
    graphs: HashMap<(usize, u8, bool), Graph>,
    model: CudaModel,
    sampler: DeviceSampler,
    gpu: Gpu,
    enforce_eager: bool,
    /// Host copy of the step's inputs, laid out as the device arena.
    arena: Vec<u32>,
    logits: Vec<f32>,
    events: (CudaEvent, CudaEvent),
    last_device_time: Option<Duration>,
    /// The last step had more tokens than sequences, so it kept its residual stream whole
    /// ([`CudaModel::record_token_logits`] may read it).
    last_had_prompt_rows: bool,
}

impl CudaBackend {
    pub fn new(
        cfg: &ModelConfig,
        weights: &mut WeightSource,
        bc: &crate::backend::BackendConfig,
        elem: Elem,
    ) -> Result<Self> {
        if bc.tensor_parallel_size > 1 {
            return Err(Error::InvalidConfig(format!(
                "tensor_parallel_size {}: the CUDA backend runs on one GPU; set it to 1 (the CPU backend runs tensor-parallel ranks in one process)",
                bc.tensor_parallel_size
            )));
        }
        let gpu = Gpu::new(0, elem)?;
        let model = CudaModel::load(&gpu, cfg, weights, bc, bc.seed)?;
        let sampler = DeviceSampler::new(&gpu, bc.max_num_seqs)?;
        gpu.sync()?;
        let events = (gpu.timing_event()?, gpu.timing_event()?);
        Ok(CudaBackend {
            graphs: HashMap::new(),
            arena: vec![0; model.arena_len()],
            logits: Vec::new(),
            model,
            sampler,
            gpu,
            enforce_eager: bc.enforce_eager,
            events,
            last_device_time: None,
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
            num_att_tiles: 0,
        };
        self.model.pack_inputs(batch, &mut shape, &mut self.arena);
        self.model.upload_inputs(&self.gpu, &self.arena, shape)?;
        if sample {
            self.sampler.upload(&self.gpu, &batch.sampling, shape.num_seqs)?;
        }

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

    fn set_lora_slot(&mut self, slot: LoraSlot, adapter: Option<&LoraAdapter>) -> Result<()> {
        self.gpu.bind()?;
        self.model.set_lora_slot(&self.gpu, slot, adapter)
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
