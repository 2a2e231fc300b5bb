//! The Llama-family decoder on the device: weights (q/k/v and gate/up fused along the output
//! dimension, so one GEMM streams them), the paged KV cache, LoRA slots, activation buffers, and
//! the kernel sequence of one step. Every buffer is allocated at load for the largest step, so
//! a step allocates nothing and can be captured in a CUDA graph.

use cudarc::driver::sys::CUdeviceptr;

use super::elem::Elem;
use super::gpu::{cfg, DevBuf, Gpu};
use super::kernels::{self, DECODE_ATT_MAX_PARTS, MAX_HEAD_DIM};
use super::launch;
use super::lora::LoraGroup;
use super::plan::{
    norm_threads, uses_sgmv, AddLora, AddProj, Attention, Caps, Gemm, LoraRun, Mlp, NormAfter, Qkv, QkvLora,
    Rope, StepPlan, NORM_SPLIT_MAX_TOKENS,
};
use super::prefill;
use super::sgmv;
use super::skinny::{Epilogue, NormIo, SKINNY_MAX_M, SKINNY_THREADS};
use super::upload::{DeviceAdapter, GroupSpec, SlotLayout, SlotUploads};
use crate::backend::BackendConfig;
use crate::backend::StepBatch;
use crate::error::{Error, Result};
use crate::lora::LoraSlot;
use crate::models::spec::{self, ProjGroup};
use crate::weights::WeightSource;
use crate::ModelConfig;

/// Launches kernel `$name` through its typed launcher (`cuda/launch.rs`).
macro_rules! launch {
    ($gpu:expr, $name:ident, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let gpu: &Gpu = $gpu;
        // SAFETY: every pointer passed is a live buffer of this model (weights, caches, step
        // buffers, the input arena), allocated at load for the largest step, so it holds what
        // the kernel reads or writes for this grid.
        unsafe { launch::$name(gpu, $cfg, $($arg),*) }
    }};
}

/// What a step's kernel sequence depends on (and a captured graph is keyed by).
#[derive(Debug, Clone, Copy)]
pub struct StepShape {
    pub num_tokens: usize,
    pub num_seqs: usize,
    /// Bit g set: LoRA group g runs. 0: no LoRA kernels at all.
    pub lora_mask: u8,
    /// LoRA segments of a step run with SGMV ([`uses_sgmv`]); 0 for the others, which use BGMV.
    pub num_lora_segments: usize,
    /// Query tiles (and merges of split tiles) of a step whose attention runs
    /// `prefill_attention` ([`prefill::pack_tiles`]); none for decode steps and for shapes that
    /// kernel does not take.
    pub att_tiles: prefill::Packed,
}

/// `y[T, N] = x[T, K] · Wᵀ (+ b)`, weights `[N, K]` of the element type.
struct Linear {
    w: DevBuf,
    bias: Option<DevBuf>,
    n: usize,
    k: usize,
}

struct Layer {
    qkv_proj: Linear,
    o_proj: Linear,
    gate_up_proj: Linear,
    down_proj: Linear,
    input_layernorm: DevBuf,
    post_attention_layernorm: DevBuf,
    q_norm: Option<DevBuf>,
    k_norm: Option<DevBuf>,
    /// `[4]`: qkv, o, gate_up, down; empty when LoRA is disabled
    lora: Vec<LoraGroup>,
}

/// Offsets (in u32 elements) of the step inputs in the device arena.
#[derive(Debug, Clone, Copy)]
struct Arena {
    token_ids: usize,
    positions: usize,
    slot_mapping: usize,
    token_seq: usize,
    token_slot: usize,
    last_rows: usize,
    block_tables: usize,
    /// The number of LoRA segments of a prefill step, then `[max_tokens, 3]` segments (start,
    /// end, slot), then prefill attention tiles `[max_tokens + max_pieces, 4]` and merges
    /// `[max_pieces / 2, 4]`: last, so a step uploads only the ones it has.
    num_lora_segments: usize,
    lora_segments: usize,
    att_tiles: usize,
    att_merges: usize,
    len: usize,
}

/// The model on the device: its weights, adapter slots, KV cache and workspace, and what the
/// step plan needs to know of the device.
pub struct CudaModel {
    cfg: ModelConfig,
    max_tokens: usize,
    max_seqs: usize,
    max_blocks_per_seq: usize,
    block_size: usize,
    max_loras: usize,
    /// Largest token count the skinny GEMM takes; cuBLAS above ([`super::CudaOptions`]).
    skinny_max_m: usize,
    /// The tensor-core attention kernel of prefill and mixed steps ([`prefill::kernel`]); `None`
    /// for head sizes it does not take (then `paged_attention`).
    prefill_attention: Option<prefill::Kernel>,
    /// When prefill attention splits long tiles' keys (into `Workspace::att_pieces`).
    att_split: Option<prefill::Split>,
    num_sms: usize,
    /// device LoRA rank: max_lora_rank rounded up to 8 (16-byte rows)
    lora_rank: usize,
    /// Bit g set: LoRA group g holds an adapter in some slot (updated by `set_lora_slot`).
    lora_mask: u8,
    w: Weights,
    kv: KvCache,
    ws: Workspace,
}

/// The checkpoint's tensors (and the RoPE tables) on the device; each layer's adapter slots
/// with it.
struct Weights {
    embed_tokens: DevBuf,
    lm_head: Option<DevBuf>,
    norm: DevBuf,
    layers: Vec<Layer>,
    rope_cos: DevBuf, // [max_model_len, head_dim / 2] f32
    rope_sin: DevBuf,
}

/// The paged KV cache, allocated last ([`CudaModel::alloc_kv`]): it takes the memory left.
#[derive(Default)]
struct KvCache {
    k: Vec<DevBuf>, // per layer [(num_blocks + 1) * block_size, kv_size] elem
    v: Vec<DevBuf>,
    /// KV slot that padded graph rows write to (an extra block past the engine's)
    scratch_slot: u32,
}

/// Step inputs and activations, allocated at load for the largest step, so a step allocates
/// nothing and can be captured in a CUDA graph.
struct Workspace {
    arena_layout: Arena,
    arena: DevBuf,       // u32, see Arena
    hidden: DevBuf,      // [T, hidden] f32 residual stream
    normed: DevBuf,      // [T, hidden] elem
    qkv: DevBuf,         // [T, q + 2 kv] f32
    attn: DevBuf,        // [T, q] elem
    gate_up: DevBuf,     // [T, 2 * intermediate] f32
    act: DevBuf,         // [T, intermediate] elem
    lora_tmp: DevBuf,    // [3, T, R] f32
    last_normed: DevBuf, // [S, hidden] elem
    norm_ss: DevBuf,     // [2 * layers + 1, NORM_SPLIT_MAX_TOKENS] f32, zero from each step's embed
    att_part: DevBuf,    // [S, heads, DECODE_ATT_MAX_PARTS, head_dim + 2] f32
    att_count: DevBuf,   // [S * heads] u32, zero between steps
    att_pieces: DevBuf,  // [pieces * nkv, Kernel::piece_len] f32: split prefill-attention tiles
    logits: DevBuf,      // [S, vocab] f32
    token_rows: DevBuf,  // [S] u32, the tokens `record_token_logits` takes
}

/// Fills weights: from the checkpoint (widened to f32 by `WeightSource`, narrowed here), or
/// random on the device for `load_format: dummy`.
struct Loader<'a> {
    gpu: &'a Gpu,
    weights: &'a mut WeightSource,
    seed: u64,
    counter: u64,
}

impl Loader<'_> {
    fn is_dummy(&self) -> bool {
        matches!(self.weights, WeightSource::Dummy { .. })
    }

    /// Writes tensor `name` of `shape` (in the device's element type) at `dst`.
    fn fill(&mut self, name: &str, shape: &[usize], dst: CUdeviceptr) -> Result<()> {
        let n: usize = shape.iter().product();
        if self.is_dummy() {
            self.counter += 1;
            let grid = (n.div_ceil(256).min(65536) as u32, 1, 1);
            if name.ends_with("norm.weight") {
                launch!(self.gpu, fill, cfg(grid, 256), dst, n as u64, 1.0f32)
            } else {
                let bound = 1.0 / (shape.last().copied().unwrap_or(1) as f32).sqrt();
                let seed = self
                    .seed
                    .wrapping_add(self.counter.wrapping_mul(0x2545F4914F6CDD1D));
                launch!(self.gpu, fill_uniform, cfg(grid, 256), dst, n as u64, seed, bound)
            }
        } else {
            let v = self.weights.get(name, shape)?;
            self.gpu.htod(dst, &self.gpu.elem.encode_all(&v))
        }
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<DevBuf> {
        let buf = self.gpu.alloc(shape.iter().product::<usize>() * 2)?;
        self.fill(name, shape, buf.ptr)?;
        Ok(buf)
    }

    /// Layer `layer`'s projections of group `g` (and their biases), concatenated along the
    /// output dimension.
    fn group(&mut self, cfg: &ModelConfig, layer: usize, g: ProjGroup) -> Result<Linear> {
        let targets = g.targets();
        let k = targets[0].shape(cfg).0;
        let n: usize = targets.iter().map(|t| t.shape(cfg).1).sum();
        let bias = spec::has_bias(targets[0], cfg);
        let w = self.gpu.alloc(n * k * 2)?;
        let b = if bias { Some(self.gpu.alloc(n * 2)?) } else { None };
        let mut off = 0;
        for &t in targets {
            let rows = t.shape(cfg).1;
            let name = spec::proj_tensor(layer, t, "weight");
            self.fill(&name, &[rows, k], w.at::<u16>(off * k))?;
            if let Some(b) = &b {
                self.fill(&spec::proj_tensor(layer, t, "bias"), &[rows], b.at::<u16>(off))?;
            }
            off += rows;
        }
        Ok(Linear { w, bias: b, n, k })
    }
}

impl CudaModel {
    pub fn load(
        gpu: &Gpu,
        cfg: &ModelConfig,
        weights: &mut WeightSource,
        bc: &BackendConfig,
        seed: u64,
    ) -> Result<Self> {
        let (h, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim);
        let (qs, kvs, inter) = (cfg.q_size(), cfg.kv_size(), cfg.intermediate_size);
        if hd > MAX_HEAD_DIM || hd % 2 != 0 {
            return Err(Error::Backend(format!(
                "head_dim {hd} is not supported by the CUDA backend (even, at most {MAX_HEAD_DIM})"
            )));
        }
        let mut ld = Loader {
            gpu,
            weights,
            seed,
            counter: 0,
        };
        let embed_tokens = ld.tensor(spec::EMBED_TOKENS, &[v, h])?;
        let lora_rank = bc.max_lora_rank.div_ceil(8) * 8;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            // Filled in this order (dummy weights draw from one counter: the order is the seed's).
            let qkv_proj = ld.group(cfg, i, ProjGroup::Qkv)?;
            let o_proj = ld.group(cfg, i, ProjGroup::O)?;
            let gate_up_proj = ld.group(cfg, i, ProjGroup::GateUp)?;
            let down_proj = ld.group(cfg, i, ProjGroup::Down)?;
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(ld.tensor(&spec::layer_tensor(i, "self_attn.q_norm.weight"), &[hd])?),
                    Some(ld.tensor(&spec::layer_tensor(i, "self_attn.k_norm.weight"), &[hd])?),
                )
            } else {
                (None, None)
            };
            let mut lora = Vec::new();
            if bc.max_loras > 0 {
                for g in ProjGroup::ALL {
                    lora.push(LoraGroup::new(
                        gpu,
                        cfg,
                        g.targets().to_vec(),
                        bc.max_loras,
                        lora_rank,
                    )?);
                }
            }
            layers.push(Layer {
                qkv_proj,
                o_proj,
                gate_up_proj,
                down_proj,
                input_layernorm: ld.tensor(&spec::layer_tensor(i, "input_layernorm.weight"), &[h])?,
                post_attention_layernorm: ld
                    .tensor(&spec::layer_tensor(i, "post_attention_layernorm.weight"), &[h])?,
                q_norm,
                k_norm,
                lora,
            });
        }
        let norm = ld.tensor(spec::FINAL_NORM, &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ld.tensor(spec::LM_HEAD, &[v, h])?)
        };

        // RoPE tables exactly as the CPU backend builds them.
        let (cos, sin) = crate::models::rope::tables(cfg, bc.max_model_len);
        let rope_cos = gpu.alloc(cos.len() * 4)?;
        let rope_sin = gpu.alloc(sin.len() * 4)?;
        gpu.htod(rope_cos.ptr, &cos)?;
        gpu.htod(rope_sin.ptr, &sin)?;

        let (t, s) = (bc.max_num_batched_tokens.max(bc.max_num_seqs), bc.max_num_seqs);
        let max_blocks_per_seq = bc.max_model_len.div_ceil(bc.block_size);
        // Split-context prefill attention: aim at two blocks an SM (the head_dim 128 kernel's
        // shared memory allows two), with room for pieces of twice that many blocks.
        let prefill_attention = prefill::kernel(hd, cfg.num_attention_heads / cfg.num_key_value_heads);
        let att_split = prefill_attention.map(|_| prefill::Split {
            nkv: cfg.num_key_value_heads,
            target_blocks: 2 * gpu.num_sms as usize,
            max_pieces: 4 * gpu.num_sms as usize / cfg.num_key_value_heads,
        });
        let max_pieces = att_split.map_or(0, |sp| sp.max_pieces);
        let att_pieces = match prefill_attention {
            Some(k) if max_pieces > 0 => {
                gpu.alloc(max_pieces * cfg.num_key_value_heads * k.piece_len() * 4)?
            }
            _ => gpu.alloc(4)?,
        };
        let mut off = 0;
        let mut take = |n: usize| {
            let o = off;
            off += n;
            o
        };
        let arena_layout = Arena {
            token_ids: take(t),
            positions: take(t),
            slot_mapping: take(t),
            token_seq: take(t),
            token_slot: take(t),
            last_rows: take(s),
            block_tables: take(s * max_blocks_per_seq),
            num_lora_segments: take(1),
            lora_segments: take(3 * t),
            att_tiles: take(4 * (t + max_pieces)),
            att_merges: take(2 * max_pieces),
            len: 0,
        };
        let arena_layout = Arena {
            len: off,
            ..arena_layout
        };
        Ok(CudaModel {
            max_tokens: t,
            max_seqs: s,
            max_blocks_per_seq,
            block_size: bc.block_size,
            max_loras: bc.max_loras,
            skinny_max_m: bc.cuda.skinny_max_m.min(SKINNY_MAX_M),
            prefill_attention,
            att_split: att_split.filter(|sp| sp.max_pieces > 0),
            num_sms: gpu.num_sms as usize,
            lora_rank,
            lora_mask: 0,
            w: Weights {
                embed_tokens,
                lm_head,
                norm,
                layers,
                rope_cos,
                rope_sin,
            },
            kv: KvCache::default(),
            ws: Workspace {
                arena: gpu.alloc(arena_layout.len * 4)?,
                arena_layout,
                hidden: gpu.alloc(t * h * 4)?,
                normed: gpu.alloc(t * h * 2)?,
                qkv: gpu.alloc(t * (qs + 2 * kvs) * 4)?,
                attn: gpu.alloc(t * qs * 2)?,
                gate_up: gpu.alloc(t * 2 * inter * 4)?,
                act: gpu.alloc(t * inter * 2)?,
                lora_tmp: gpu.alloc(3 * t * lora_rank.max(1) * 4)?,
                last_normed: gpu.alloc(s * h * 2)?,
                norm_ss: gpu.alloc((2 * cfg.num_hidden_layers + 1) * NORM_SPLIT_MAX_TOKENS * 4)?,
                att_part: gpu.alloc(s * cfg.num_attention_heads * DECODE_ATT_MAX_PARTS * (hd + 2) * 4)?,
                att_count: gpu.alloc(s * cfg.num_attention_heads * 4)?,
                att_pieces,
                logits: gpu.alloc(s * v * 4)?,
                token_rows: gpu.alloc(s * 4)?,
            },
            cfg: cfg.clone(),
        })
    }

    /// Allocates the paged KV cache: `num_blocks` blocks for the engine and one more that padded
    /// graph rows write to. Called once, after everything else is loaded (the cache takes what
    /// memory is left).
    pub fn alloc_kv(&mut self, gpu: &Gpu, num_blocks: usize) -> Result<()> {
        let num_slots = (num_blocks + 1) * self.block_size;
        // Slots are u32 in the step's slot mapping (as the CPU backend's are).
        if u32::try_from(num_slots).is_err() {
            return Err(Error::InvalidConfig(format!(
                "a KV cache of {num_blocks} blocks of {} tokens has more slots than the step's 32-bit slot mapping addresses; lower num_gpu_blocks_override or block_size",
                self.block_size
            )));
        }
        let kvs = self.cfg.kv_size();
        for _ in 0..self.cfg.num_hidden_layers {
            self.kv.k.push(gpu.alloc(num_slots * kvs * 2)?);
            self.kv.v.push(gpu.alloc(num_slots * kvs * 2)?);
        }
        self.kv.scratch_slot = (num_blocks * self.block_size) as u32;
        Ok(())
    }

    pub fn arena_len(&self) -> usize {
        self.ws.arena_layout.len
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    pub fn logits_ptr(&self) -> CUdeviceptr {
        self.ws.logits.ptr
    }

    /// Largest decode batch a graph bucket may pad to.
    pub fn max_graph_tokens(&self) -> usize {
        self.max_seqs.min(self.max_tokens).min(512)
    }

    /// Which LoRA groups hold any adapter, as a bit mask.
    pub fn lora_mask(&self) -> u8 {
        self.lora_mask
    }

    /// How the slots lay adapters out (what [`DeviceAdapter`]s are made for); `None` without
    /// LoRA.
    pub(super) fn lora_layout(&self, elem: Elem) -> Option<SlotLayout> {
        let groups = &self.w.layers.first()?.lora;
        (!groups.is_empty()).then(|| SlotLayout {
            num_layers: self.w.layers.len(),
            groups: groups
                .iter()
                .map(|g| GroupSpec::new(&self.cfg, g.targets.clone()))
                .collect(),
            r: self.lora_rank,
            elem,
        })
    }

    /// Queues the copies that fill (or, with `None`, clear) `slot` on the upload stream,
    /// between `uploads.begin` and `uploads.end`, which order them with the steps.
    pub(super) fn set_lora_slot(
        &mut self,
        uploads: &mut SlotUploads,
        slot: LoraSlot,
        adapter: Option<std::sync::Arc<DeviceAdapter>>,
    ) -> Result<()> {
        assert!(self.max_loras > 0, "set_lora_slot with LoRA disabled");
        uploads.begin(slot)?;
        let mut copied = Ok(());
        'layers: for (li, layer) in self.w.layers.iter_mut().enumerate() {
            for (g, group) in layer.lora.iter_mut().enumerate() {
                let a = adapter.as_deref();
                copied = group.upload(&uploads.stream, li, g, slot, a, self.max_loras, self.lora_rank);
                if copied.is_err() {
                    break 'layers;
                }
            }
        }
        // Even after a failed copy: the copies already queued are recorded and their pinned
        // source kept alive until they complete (the manager frees the slot on the error).
        let ended = uploads.end(slot, adapter);
        // Slots change rarely, steps often: the mask is kept, not recomputed per step.
        self.lora_mask = 0;
        for layer in &self.w.layers {
            for (g, group) in layer.lora.iter().enumerate() {
                if group.is_active() {
                    self.lora_mask |= 1 << g;
                }
            }
        }
        copied.and(ended)
    }

    /// Writes the step's inputs into `arena` (host), padded to `shape` for graph buckets:
    /// padded tokens write their K/V to the scratch slot and have no adapter. Sets the shape's
    /// LoRA segments (a step that runs SGMV, [`uses_sgmv`]) and prefill attention tiles.
    pub fn pack_inputs(&self, batch: &StepBatch, shape: &mut StepShape, arena: &mut [u32]) {
        let a = self.ws.arena_layout;
        let (t, s) = (batch.num_tokens(), batch.num_seqs());
        assert!(shape.num_tokens >= t && shape.num_tokens <= self.max_tokens);
        assert!(shape.num_seqs >= s && shape.num_seqs <= self.max_seqs);
        assert_eq!(batch.max_blocks_per_seq, self.max_blocks_per_seq);
        let pad = shape.num_tokens;
        arena[a.token_ids..][..t].copy_from_slice(&batch.token_ids);
        arena[a.positions..][..t].copy_from_slice(&batch.positions);
        arena[a.slot_mapping..][..t].copy_from_slice(&batch.slot_mapping);
        for i in 0..t {
            arena[a.token_slot + i] = batch.token_lora[i].map_or(u32::MAX, |s| s.0);
        }
        for seq in 0..s {
            let (lo, hi) = (
                batch.query_start[seq] as usize,
                batch.query_start[seq + 1] as usize,
            );
            arena[a.token_seq + lo..a.token_seq + hi].fill(seq as u32);
            arena[a.last_rows + seq] = hi as u32 - 1;
        }
        for i in t..pad {
            arena[a.token_ids + i] = 0;
            arena[a.positions + i] = 0;
            arena[a.slot_mapping + i] = self.kv.scratch_slot;
            arena[a.token_slot + i] = u32::MAX;
            // Padding only happens for decode steps, where token i is sequence i.
            arena[a.token_seq + i] = i as u32;
        }
        for seq in s..shape.num_seqs {
            arena[a.last_rows + seq] = seq as u32;
        }
        let mb = self.max_blocks_per_seq;
        arena[a.block_tables..][..s * mb].copy_from_slice(&batch.block_tables[..s * mb]);
        arena[a.block_tables + s * mb..][..(shape.num_seqs - s) * mb].fill(0);
        // Segments only for the steps `lora` runs SGMV on.
        let num_segments = if uses_sgmv(t, s) && self.max_loras > 0 {
            let segs = &mut arena[a.lora_segments..][..3 * self.max_tokens];
            sgmv::pack_lora_segments(&batch.token_lora, segs)
        } else {
            0
        };
        arena[a.num_lora_segments] = num_segments as u32;
        shape.num_lora_segments = num_segments;
        shape.att_tiles = match self.prefill_attention {
            Some(k) if t > s => {
                let per = k.tokens_per_tile(self.cfg.num_attention_heads / self.cfg.num_key_value_heads);
                let (tiles, merges) = arena[a.att_tiles..].split_at_mut(a.att_merges - a.att_tiles);
                let merges = &mut merges[..a.len - a.att_merges];
                prefill::pack_tiles(
                    &batch.query_start,
                    &batch.positions,
                    per,
                    k.keys,
                    self.att_split,
                    tiles,
                    merges,
                )
            }
            _ => prefill::Packed::default(),
        };
    }

    /// Copies the packed inputs to the device: LoRA segments and attention tiles only for a
    /// step that has them (from [`Self::pack_inputs`]).
    pub fn upload_inputs(&self, gpu: &Gpu, arena: &[u32], shape: StepShape) -> Result<()> {
        let a = self.ws.arena_layout;
        let len = match shape.num_lora_segments {
            0 => a.num_lora_segments,
            n => a.lora_segments + 3 * n,
        };
        gpu.htod(self.ws.arena.ptr, &arena[..len])?;
        let att = shape.att_tiles;
        if att.tiles > 0 {
            gpu.htod(self.input(a.att_tiles), &arena[a.att_tiles..][..4 * att.tiles])?;
        }
        if att.merges > 0 {
            gpu.htod(self.input(a.att_merges), &arena[a.att_merges..][..4 * att.merges])?;
        }
        Ok(())
    }

    fn input(&self, offset: usize) -> CUdeviceptr {
        self.ws.arena.at::<u32>(offset)
    }

    /// The device's side of a step's plan.
    pub fn caps(&self, gpu: &Gpu) -> Caps {
        Caps {
            elem: gpu.elem,
            skinny_max_m: self.skinny_max_m,
            num_sms: self.num_sms,
            prefill_attention: self.prefill_attention.is_some(),
        }
    }

    /// Enqueues the kernels of one step on the stream (also what a graph captures): the step's
    /// plan ([`StepPlan`]), walked layer by layer.
    pub fn record_forward(&self, gpu: &Gpu, shape: StepShape) -> Result<()> {
        let plan = StepPlan::new(&self.cfg, &self.caps(gpu), &shape);
        let c = &self.cfg;
        let h = c.hidden_size;
        let (t, s, a) = (shape.num_tokens, shape.num_seqs, self.ws.arena_layout);
        let split = plan.split_norms;
        // With split norms embed zeroes their sums of squares; its own norm is never split.
        let zero = if split {
            (self.ws.norm_ss.ptr, self.ws.norm_ss.bytes / 4)
        } else {
            (0, 0)
        };
        launch!(
            gpu,
            embed,
            cfg((t as u32, 1, 1), (h.div_ceil(32) * 32).min(1024) as u32),
            self.ws.hidden.ptr,
            self.w.embed_tokens.ptr,
            self.input(a.token_ids),
            h as i32,
            self.w
                .layers
                .first()
                .map_or(self.w.norm.ptr, |l| l.input_layernorm.ptr),
            self.ws.normed.ptr,
            c.rms_norm_eps,
            zero.0,
            zero.1 as i32
        )?;
        let lp = &plan.layer;
        for (li, layer) in self.w.layers.iter().enumerate() {
            self.qkv(
                gpu,
                layer,
                li,
                &shape,
                lp.qkv,
                self.norm_in(split && li > 0, 2 * li),
            )?;
            self.attention(gpu, li, &shape, lp.attention)?;
            let post = layer.post_attention_layernorm.ptr;
            let o = (&layer.o_proj, layer.lora.get(ProjGroup::O as usize));
            self.add_proj(gpu, o, &lp.o, self.ws.attn.ptr, &shape, (2 * li + 1, post))?;
            self.mlp(gpu, layer, lp.mlp, &shape, self.norm_in(split, 2 * li + 1))?;
            // The next layer's input norm, or the final norm after the last layer.
            let next = self
                .w
                .layers
                .get(li + 1)
                .map_or(self.w.norm.ptr, |l| l.input_layernorm.ptr);
            let down = (&layer.down_proj, layer.lora.get(ProjGroup::Down as usize));
            self.add_proj(gpu, down, &lp.down, self.ws.act.ptr, &shape, (2 * li + 2, next))?;
        }
        // Split norms: every token of a decode step is its sequence's last, and the last
        // down_proj wrote them unscaled into `normed`. Else the final norm (already applied to
        // every row by the last layer) is recomputed on the rows that need logits.
        let (x_last, lm_norm) = if split {
            (self.ws.normed.ptr, self.norm_in(true, 2 * self.w.layers.len()))
        } else {
            let rows = (s, self.input(a.last_rows), plan.last_norm_threads);
            self.rms_norm(gpu, rows, self.w.norm.ptr, self.ws.last_normed.ptr, NO_LORA)?;
            (self.ws.last_normed.ptr, NormIo::NONE)
        };
        self.lm_head(gpu, plan.lm_head, x_last, s, lm_norm)
    }

    /// `logits[n, vocab] = x[n, hidden] · lm_headᵀ` with the planned `gemm` (`norm`: x is a
    /// split norm's unscaled output).
    fn lm_head(&self, gpu: &Gpu, gemm: Gemm, x: CUdeviceptr, n: usize, norm: NormIo) -> Result<()> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let lm_head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed_tokens);
        let y = (self.ws.logits.ptr, n, v);
        run_gemm(
            gpu,
            gemm,
            Epilogue::Store,
            (lm_head.ptr, None, v, h),
            x,
            y,
            0,
            norm,
        )
    }

    /// Logits of chosen tokens of the step just run into the logits buffer, `[rows.len(),
    /// vocab]` (`rows` index the step's tokens, at most `max_seqs`): the final norm and the LM
    /// head over those rows of the residual stream. Only after a step that did not split its
    /// norms (a decode step, whose every row already had its logits), since a split step leaves
    /// the last layer's output outside `hidden`.
    pub fn record_token_logits(&self, gpu: &Gpu, rows: &[u32]) -> Result<()> {
        assert!(rows.len() <= self.max_seqs, "at most max_seqs rows a call");
        if rows.is_empty() {
            return Ok(());
        }
        gpu.htod(self.ws.token_rows.ptr, rows)?;
        let (n, caps) = (rows.len(), self.caps(gpu));
        let threads = norm_threads(&caps, self.cfg.hidden_size, n);
        let (w, out) = (self.w.norm.ptr, self.ws.last_normed.ptr);
        self.rms_norm(gpu, (n, self.ws.token_rows.ptr, threads), w, out, NO_LORA)?;
        let gemm = Gemm::new(
            &caps,
            Epilogue::Store,
            self.cfg.vocab_size,
            self.cfg.hidden_size,
            n,
            false,
        );
        self.lm_head(gpu, gemm, out, n, NormIo::NONE)
    }

    /// `y[m, ldy] (=, +=) x · Wᵀ` of `lin` as the plan's `gemm` says.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        gpu: &Gpu,
        gemm: Gemm,
        epi: Epilogue,
        lin: &Linear,
        x: CUdeviceptr,
        y: (CUdeviceptr, usize, usize),
        norm: NormIo,
    ) -> Result<()> {
        let w = (lin.w.ptr, lin.bias.as_ref().map(|b| b.ptr), lin.n, lin.k);
        run_gemm(gpu, gemm, epi, w, x, y, self.ws.gate_up.ptr, norm)
    }

    /// Layer `li`'s q/k/v: the GEMM (with RoPE and the K/V cache write as its epilogue, or
    /// followed by its LoRA, Qwen3's q/k norms and a RoPE kernel).
    fn qkv(
        &self,
        gpu: &Gpu,
        layer: &Layer,
        li: usize,
        shape: &StepShape,
        plan: Qkv,
        norm: NormIo,
    ) -> Result<()> {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let qkv_n = layer.qkv_proj.n;
        let t = shape.num_tokens;
        let (gemm, lora, qk_norm, rope) = match plan {
            Qkv::FusedRope { kernel, blocks } => {
                return self.qkv_rope(gpu, layer, li, t, norm, (kernel, blocks))
            }
            Qkv::Gemm {
                gemm,
                lora,
                qk_norm,
                rope,
            } => (gemm, lora, qk_norm, rope),
        };
        let y = (self.ws.qkv.ptr, t, qkv_n);
        self.gemm(
            gpu,
            gemm,
            Epilogue::Store,
            &layer.qkv_proj,
            self.ws.normed.ptr,
            y,
            norm,
        )?;
        let group = layer.lora.get(ProjGroup::Qkv as usize);
        let fused = match (lora, group) {
            (QkvLora::None, _) => NO_LORA,
            (QkvLora::Run(run), Some(g)) => {
                self.lora(gpu, g, run, self.ws.normed.ptr, y, shape)?;
                NO_LORA
            }
            (QkvLora::ExpandInRope(sh), Some(g)) => {
                self.bgmv_shrink(gpu, g, self.ws.normed.ptr, t, sh.wide)?;
                (self.ws.lora_tmp.ptr, g.b.ptr, g.ranks.ptr)
            }
            (_, None) => return Err(internal("q/k/v LoRA planned without adapter slots")),
        };
        if qk_norm {
            let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) else {
                return Err(internal("q/k norms planned for a model without them"));
            };
            launch!(
                gpu,
                qk_norm,
                cfg((t as u32, (nh + nkv) as u32, 1), 32),
                self.ws.qkv.ptr,
                qkv_n as i32,
                nh as i32,
                hd as i32,
                qn.ptr,
                kn.ptr,
                c.rms_norm_eps
            )?;
        }
        let [cos, sin, pos, slots, kc, vc] = self.rope_args(li);
        match rope {
            Rope::Rows if fused == NO_LORA => launch!(
                gpu,
                rope_kv_write_rows,
                cfg((t as u32, 1, 1), 256),
                self.ws.qkv.ptr,
                qkv_n as i32,
                nh as i32,
                nkv as i32,
                hd as i32,
                cos,
                sin,
                pos,
                slots,
                kc,
                vc
            ),
            Rope::Rows => Err(internal("a LoRA expand planned into rope_kv_write_rows")),
            Rope::PerHead => {
                let (l_tmp, l_b, l_ranks) = fused;
                launch!(
                    gpu,
                    rope_kv_write,
                    cfg(
                        (t as u32, (nh + 2 * nkv) as u32, 1),
                        (hd / 2).div_ceil(32) as u32 * 32
                    ),
                    self.ws.qkv.ptr,
                    qkv_n as i32,
                    nh as i32,
                    nkv as i32,
                    hd as i32,
                    cos,
                    sin,
                    pos,
                    slots,
                    kc,
                    vc,
                    l_tmp,
                    l_b,
                    l_ranks,
                    self.input(self.ws.arena_layout.token_slot),
                    t as i32,
                    self.lora_rank as i32,
                    self.max_loras as i32
                )
            }
        }
    }

    /// Decode, layer `li`: q/k/v with RoPE and the K/V cache write in the GEMM's epilogue.
    fn qkv_rope(
        &self,
        gpu: &Gpu,
        layer: &Layer,
        li: usize,
        t: usize,
        norm: NormIo,
        (kernel, blocks): (&'static str, u32),
    ) -> Result<()> {
        let c = &self.cfg;
        let lin = &layer.qkv_proj;
        let [cos, sin, positions, slots, k_cache, v_cache] = self.rope_args(li);
        let [m, n, k, nh, nkv, hd] = [
            t,
            lin.n,
            lin.k,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        ]
        .map(|v| v as i32);
        // SAFETY: the model's buffers, sized for the step; n = (nh + 2 nkv) hd rows in whole
        // heads, hd a multiple of 16 (the plan's rule for this fusion).
        unsafe {
            launch::skinny_rope(
                gpu,
                kernel,
                cfg((blocks, 1, 1), SKINNY_THREADS),
                self.ws.normed.ptr,
                lin.w.ptr,
                lin.bias.as_ref().map_or(0, |b| b.ptr),
                self.ws.qkv.ptr,
                m,
                n,
                k,
                n,
                norm.in_ss,
                norm.eps,
                norm.gamma,
                norm.out,
                norm.out_ss,
                cos,
                sin,
                positions,
                slots,
                k_cache,
                v_cache,
                nh,
                nkv,
                hd,
            )
        }
    }

    /// Layer `li`'s attention over the paged cache, as the plan says.
    fn attention(&self, gpu: &Gpu, li: usize, shape: &StepShape, plan: Attention) -> Result<()> {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let qkv_n = c.q_size() + 2 * c.kv_size();
        let (t, a) = (shape.num_tokens, self.ws.arena_layout);
        match plan {
            Attention::Decode { parts, wide } => {
                let (name, threads) = match wide {
                    true => ("decode_attention_wide", kernels::DECODE_ATT_WIDE_THREADS),
                    false => ("decode_attention", kernels::DECODE_ATT_THREADS),
                };
                // SAFETY: the model's buffers, sized for its limits (att_part and att_count for
                // max_num_seqs × heads × DECODE_ATT_MAX_PARTS).
                unsafe {
                    launch::decode_attention(
                        gpu,
                        name,
                        cfg((t as u32, nh as u32, parts), threads),
                        self.ws.qkv.ptr,
                        qkv_n as i32,
                        self.ws.attn.ptr,
                        self.kv.k[li].ptr,
                        self.kv.v[li].ptr,
                        self.input(a.positions),
                        self.input(a.block_tables),
                        self.max_blocks_per_seq as i32,
                        self.block_size as i32,
                        nh as i32,
                        nkv as i32,
                        hd as i32,
                        1.0 / (hd as f32).sqrt(),
                        self.ws.att_part.ptr,
                        self.ws.att_count.ptr,
                    )
                }
            }
            Attention::Prefill => {
                let k = self
                    .prefill_attention
                    .ok_or_else(|| internal("prefill attention planned without a kernel"))?;
                let inputs = prefill::Inputs {
                    qkv: self.ws.qkv.ptr,
                    ld: qkv_n,
                    out: self.ws.attn.ptr,
                    k_cache: self.kv.k[li].ptr,
                    v_cache: self.kv.v[li].ptr,
                    tiles: self.input(a.att_tiles),
                    merges: self.input(a.att_merges),
                    packed: shape.att_tiles,
                    part: self.ws.att_pieces.ptr,
                    token_seq: self.input(a.token_seq),
                    positions: self.input(a.positions),
                    block_tables: self.input(a.block_tables),
                    max_blocks: self.max_blocks_per_seq,
                    block_size: self.block_size,
                };
                prefill::launch(gpu, k, &inputs, nh, nkv, hd)
            }
            Attention::Paged => launch!(
                gpu,
                paged_attention,
                cfg((t as u32, nh as u32, 1), kernels::ATT_THREADS),
                self.ws.qkv.ptr,
                qkv_n as i32,
                self.ws.attn.ptr,
                self.kv.k[li].ptr,
                self.kv.v[li].ptr,
                self.input(a.token_seq),
                self.input(a.positions),
                self.input(a.block_tables),
                self.max_blocks_per_seq as i32,
                self.block_size as i32,
                nh as i32,
                nkv as i32,
                hd as i32,
                1.0f32 / (hd as f32).sqrt()
            ),
        }
    }

    /// o_proj or down_proj (`lin`, LoRA `group`) adding `x · Wᵀ` into the residual stream, its
    /// LoRA, then the RMSNorm after it (`norm` = split-norm index and weight) into `normed`.
    fn add_proj(
        &self,
        gpu: &Gpu,
        (lin, group): (&Linear, Option<&LoraGroup>),
        plan: &AddProj,
        x: CUdeviceptr,
        shape: &StepShape,
        (b, gamma): (usize, u64),
    ) -> Result<()> {
        let (t, h) = (shape.num_tokens, self.cfg.hidden_size);
        let norm = match plan.norm {
            NormAfter::Split => self.norm_out(true, b, gamma),
            NormAfter::Kernel { .. } => NormIo::NONE,
        };
        let y = (self.ws.hidden.ptr, t, h);
        self.gemm(gpu, plan.gemm, Epilogue::Add, lin, x, y, norm)?;
        let fused = match (plan.lora, group) {
            (AddLora::None, _) => NO_LORA,
            (AddLora::Run(run), Some(g)) => {
                self.lora(gpu, g, run, x, y, shape)?;
                NO_LORA
            }
            (AddLora::ExpandInNorm(sh), Some(g)) => {
                self.bgmv_shrink(gpu, g, x, t, sh.wide)?;
                (self.ws.lora_tmp.ptr, g.b.ptr, g.ranks.ptr)
            }
            (_, None) => return Err(internal("a LoRA planned without adapter slots")),
        };
        match plan.norm {
            NormAfter::Kernel { threads } => {
                self.rms_norm(gpu, (t, 0, threads), gamma, self.ws.normed.ptr, fused)
            }
            NormAfter::Split if fused == NO_LORA => Ok(()),
            NormAfter::Split => Err(internal("a LoRA expand planned into a split norm")),
        }
    }

    /// gate/up and SiLU·mul into `act`: fused in the GEMM, or with the LoRA added in between.
    fn mlp(&self, gpu: &Gpu, layer: &Layer, plan: Mlp, shape: &StepShape, norm: NormIo) -> Result<()> {
        let (t, inter) = (shape.num_tokens, self.cfg.intermediate_size);
        match plan {
            Mlp::FusedSilu(gemm) => {
                let y = (self.ws.act.ptr, t, inter);
                self.gemm(
                    gpu,
                    gemm,
                    Epilogue::SiluMul,
                    &layer.gate_up_proj,
                    self.ws.normed.ptr,
                    y,
                    norm,
                )
            }
            Mlp::ThenSilu { gemm, lora } => {
                let g = layer
                    .lora
                    .get(ProjGroup::GateUp as usize)
                    .ok_or_else(|| internal("gate/up LoRA planned without adapter slots"))?;
                let y = (self.ws.gate_up.ptr, t, 2 * inter);
                self.gemm(
                    gpu,
                    gemm,
                    Epilogue::Store,
                    &layer.gate_up_proj,
                    self.ws.normed.ptr,
                    y,
                    norm,
                )?;
                self.lora(gpu, g, lora, self.ws.normed.ptr, y, shape)?;
                silu_mul(gpu, self.ws.gate_up.ptr, self.ws.act.ptr, inter, t)
            }
        }
    }

    /// BGMV shrink of one group: `lora_tmp[z, t, :] = scale · x[t] · A[z, slot(t)]ᵀ`; a block per
    /// token and SHRINK_ROWS rank rows (more parallelism for few tokens), or with `wide` a warp
    /// per row (fewer, fuller blocks).
    fn bgmv_shrink(&self, gpu: &Gpu, g: &LoraGroup, x: CUdeviceptr, t: usize, wide: bool) -> Result<()> {
        let w = g.weights(self.lora_rank, self.max_loras);
        let slots = self.input(self.ws.arena_layout.token_slot);
        sgmv::bgmv_shrink(gpu, &w, slots, x, self.ws.lora_tmp.ptr, t, wide)
    }

    /// LoRA shrink + expand of one group, added into `y` = (buffer, tokens, ldy).
    fn lora(
        &self,
        gpu: &Gpu,
        g: &LoraGroup,
        run: LoraRun,
        x: CUdeviceptr,
        (y, t, ldy): (CUdeviceptr, usize, usize),
        shape: &StepShape,
    ) -> Result<()> {
        let w = g.weights(self.lora_rank, self.max_loras);
        match run {
            LoraRun::Sgmv => {
                let segs = sgmv::Segments {
                    segs: self.input(self.ws.arena_layout.lora_segments),
                    num_segs: self.input(self.ws.arena_layout.num_lora_segments),
                    max_segs: shape.num_lora_segments,
                };
                sgmv::shrink(gpu, &w, &segs, x, self.ws.lora_tmp.ptr, t)?;
                sgmv::expand(gpu, &w, &segs, self.ws.lora_tmp.ptr, y, t, ldy)
            }
            LoraRun::Bgmv { wide_shrink } => {
                self.bgmv_shrink(gpu, g, x, t, wide_shrink)?;
                let slots = self.input(self.ws.arena_layout.token_slot);
                sgmv::bgmv_expand(gpu, &w, slots, self.ws.lora_tmp.ptr, y, t, ldy)
            }
        }
    }

    /// RMSNorm of `n` rows of the residual stream into `out` (elem), `threads` a row: row i is
    /// `rows[i]` (a device `u32` array), or i where `rows` is 0. `lora` fuses a decode step's
    /// LoRA expand into it first (the shrink's output, B, ranks; or [`NO_LORA`]).
    fn rms_norm(
        &self,
        gpu: &Gpu,
        (n, rows, threads): (usize, u64, u32),
        w: u64,
        out: u64,
        lora: (u64, u64, u64),
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        let (l_tmp, l_b, l_ranks) = lora;
        launch!(
            gpu,
            add_rms_norm,
            cfg((n as u32, 1, 1), threads),
            self.ws.hidden.ptr,
            rows,
            w,
            out,
            h as i32,
            self.cfg.rms_norm_eps,
            l_tmp,
            l_b,
            l_ranks,
            self.input(self.ws.arena_layout.token_slot),
            self.lora_rank as i32
        )
    }

    /// What RoPE and the cache write read, for layer `li`: cos and sin tables, each token's
    /// position and cache slot, the layer's K and V caches.
    fn rope_args(&self, li: usize) -> [u64; 6] {
        let a = self.ws.arena_layout;
        [
            self.w.rope_cos.ptr,
            self.w.rope_sin.ptr,
            self.input(a.positions),
            self.input(a.slot_mapping),
            self.kv.k[li].ptr,
            self.kv.v[li].ptr,
        ]
    }

    /// Split norm `b`'s per-token sums of squares: b = 2·li + 1 after layer li's o_proj,
    /// 2·li + 2 after its down_proj (the next layer's input norm, or the final norm).
    fn norm_ss_at(&self, b: usize) -> u64 {
        self.ws.norm_ss.at::<f32>(b * NORM_SPLIT_MAX_TOKENS)
    }

    /// A GEMM reading split norm `b`'s unscaled output (`on`), or a plain GEMM.
    fn norm_in(&self, on: bool, b: usize) -> NormIo {
        match on {
            true => NormIo {
                in_ss: self.norm_ss_at(b),
                eps: self.cfg.rms_norm_eps,
                ..NormIo::NONE
            },
            false => NormIo::NONE,
        }
    }

    /// A residual add writing split norm `b` (weight `gamma`) into `normed` (`on`), or a plain add.
    fn norm_out(&self, on: bool, b: usize, gamma: u64) -> NormIo {
        match on {
            true => NormIo {
                gamma,
                out: self.ws.normed.ptr,
                out_ss: self.norm_ss_at(b),
                ..NormIo::NONE
            },
            false => NormIo::NONE,
        }
    }
}

/// `x[m, k] · W[n, k]ᵀ (+ bias)` into `y[m, ldy]` as `epi` says, on the skinny GEMM (epilogue
/// fused) for up to `skinny_max_m` tokens, cuBLAS and an elementwise kernel above ([`Gemm::new`]
/// decides). For [`Epilogue::SiluMul`], W is `[gate; up]` (n = 2I), `y` is elem `[m, I]`, and the
/// cuBLAS path goes through `scratch` (f32 `[m, n]`). `norm`, either end of an RMSNorm split
/// across two GEMMs ([`NormIo`]), needs the skinny GEMM.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    gpu: &Gpu,
    skinny_max_m: usize,
    epi: Epilogue,
    w: CUdeviceptr,
    bias: Option<CUdeviceptr>,
    n: usize,
    k: usize,
    x: CUdeviceptr,
    y: CUdeviceptr,
    m: usize,
    ldy: usize,
    scratch: CUdeviceptr,
    norm: NormIo,
) -> Result<()> {
    let caps = Caps {
        elem: gpu.elem,
        skinny_max_m,
        num_sms: gpu.num_sms as usize,
        prefill_attention: false,
    };
    let gemm = Gemm::new(&caps, epi, n, k, m, norm.out != 0);
    run_gemm(gpu, gemm, epi, (w, bias, n, k), x, (y, m, ldy), scratch, norm)
}

/// Runs a planned GEMM: weight `(W, bias, n, k)`, output `(y, m, ldy)`, as [`linear`] says.
#[allow(clippy::too_many_arguments)]
fn run_gemm(
    gpu: &Gpu,
    gemm: Gemm,
    epi: Epilogue,
    (w, bias, n, k): (CUdeviceptr, Option<CUdeviceptr>, usize, usize),
    x: CUdeviceptr,
    (y, m, ldy): (CUdeviceptr, usize, usize),
    scratch: CUdeviceptr,
    norm: NormIo,
) -> Result<()> {
    if let Gemm::Skinny {
        kernel,
        threads,
        blocks,
        split_k,
    } = gemm
    {
        // A SiLU·mul kernel's N is its output rows (I of the 2I weight rows).
        let rows = if epi == Epilogue::SiluMul { n / 2 } else { n };
        let [m, rows, k, ldy] = [m, rows, k, ldy].map(|v| v as i32);
        // SAFETY: the caller's buffers hold x [m, k], W [n, k], y [m, ldy] (and the split
        // norm's), the grid and threads are the ones `Gemm::new` chose for this kernel.
        return unsafe {
            launch::skinny(
                gpu,
                kernel,
                cfg((blocks, split_k, 1), threads),
                x,
                w,
                bias.unwrap_or(0),
                y,
                m,
                rows,
                k,
                ldy,
                norm.in_ss,
                norm.eps,
                norm.gamma,
                norm.out,
                norm.out_ss,
            )
        };
    }
    if norm != NormIo::NONE {
        return Err(internal(&format!(
            "an RMSNorm split across GEMMs needs the skinny GEMM ({m} tokens, {n} x {k})"
        )));
    }
    let (out, ld, beta) = match epi {
        Epilogue::Store => (y, ldy, 0.0),
        Epilogue::Add => (y, ldy, 1.0),
        Epilogue::SiluMul => (scratch, n, 0.0),
    };
    gpu.gemm(x, w, out, m, n, k, ld, beta)?;
    if let Some(b) = bias {
        let grid = (n.div_ceil(256) as u32, m.min(65535) as u32, 1);
        launch!(
            gpu,
            add_bias,
            cfg(grid, 256),
            out,
            b,
            n as i32,
            m as i32,
            ld as i32
        )?;
    }
    if epi == Epilogue::SiluMul {
        silu_mul(gpu, scratch, y, n / 2, m)?;
    }
    Ok(())
}

/// `out[t, i] = silu(gu[t, i]) · gu[t, inter + i]` for `t` rows: gu f32 `[t, 2 inter]`, out
/// elem `[t, inter]`.
fn silu_mul(gpu: &Gpu, gu: CUdeviceptr, out: CUdeviceptr, inter: usize, t: usize) -> Result<()> {
    let grid = (inter.div_ceil(4 * 256) as u32, t.min(65535) as u32, 1);
    launch!(gpu, silu_mul, cfg(grid, 256), gu, out, inter as i32, t as i32)
}

/// A plan the recorder cannot carry out: a bug, not a user error.
fn internal(what: &str) -> Error {
    Error::Backend(format!("internal: {what}"))
}

/// [`CudaModel::rms_norm`] without a fused LoRA expand.
const NO_LORA: (u64, u64, u64) = (0, 0, 0);
