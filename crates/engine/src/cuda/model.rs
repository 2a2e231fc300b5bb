//! The Llama-family decoder on the device: weights (q/k/v and gate/up fused along the output
//! dimension, so one GEMM streams them), the paged KV cache, LoRA slots, activation buffers, and
//! the kernel sequence of one step. Every buffer is allocated at load for the largest step, so
//! a step allocates nothing and can be captured in a CUDA graph.

use cudarc::driver::sys::CUdeviceptr;

use super::elem::Elem;
use super::gpu::{cfg, DevBuf, Gpu, KernelArg};
use super::kernels::{self, DECODE_ATT_MAX_PARTS, MAX_HEAD_DIM};
use super::lora::LoraGroup;
use super::prefill;
use super::sgmv;
use super::skinny::{self, Epilogue, NormIo, SKINNY_DEFAULT_M, SKINNY_MAX_M, SKINNY_ROWS, SKINNY_THREADS};
use crate::backend::BackendConfig;
use crate::backend::StepBatch;
use crate::cpu::ops::inv_freq;
use crate::error::{Error, Result};
use crate::lora::adapter::LoraAdapter;
use crate::lora::{LoraSlot, LoraTarget};
use crate::weights::WeightSource;
use crate::ModelConfig;

/// Launches a kernel by name with raw arguments (device pointers as `u64`, `i32`, `f32`).
macro_rules! launch {
    ($gpu:expr, $name:literal, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let gpu: &Gpu = $gpu;
        // SAFETY: argument types and counts match the kernel's signature in kernels.rs, and
        // every pointer is a live buffer of the shape the kernel reads.
        unsafe { gpu.launch($name, $cfg, &[$(KernelArg::bits($arg)),*]) }
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
    /// Query tiles of a step whose attention runs `prefill_attention` ([`prefill::pack_tiles`]);
    /// 0 for decode steps and for shapes that kernel does not take.
    pub num_att_tiles: usize,
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
    /// end, slot), then `[max_tokens, 2]` prefill attention tiles: last, so a step uploads only
    /// the ones it has.
    num_lora_segments: usize,
    lora_segments: usize,
    att_tiles: usize,
    len: usize,
}

pub struct CudaModel {
    cfg: ModelConfig,
    max_tokens: usize,
    max_seqs: usize,
    max_blocks_per_seq: usize,
    block_size: usize,
    /// KV slot that padded graph rows write to (an extra block past the engine's)
    scratch_slot: u32,
    max_loras: usize,
    /// Largest token count the skinny GEMM takes; cuBLAS above. `MULTILORA_SKINNY_MAX_M=N`
    /// overrides it (0: cuBLAS for every projection), for comparisons.
    skinny_max_m: usize,
    /// The tensor-core attention kernel of prefill and mixed steps ([`prefill::kernel`]); `None`
    /// for head sizes it does not take (then `paged_attention`).
    prefill_attention: Option<prefill::Kernel>,
    num_sms: usize,
    /// device LoRA rank: max_lora_rank rounded up to 8 (16-byte rows)
    lora_rank: usize,
    /// Bit g set: LoRA group g holds an adapter in some slot (updated by `set_lora_slot`).
    lora_mask: u8,
    embed_tokens: DevBuf,
    lm_head: Option<DevBuf>,
    norm: DevBuf,
    layers: Vec<Layer>,
    rope_cos: DevBuf, // [max_model_len, head_dim / 2] f32
    rope_sin: DevBuf,
    k_cache: Vec<DevBuf>, // per layer [(num_blocks + 1) * block_size, kv_size] elem
    v_cache: Vec<DevBuf>,
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
                launch!(self.gpu, "fill", cfg(grid, 256), dst, n as u64, 1.0f32)
            } else {
                let bound = 1.0 / (shape.last().copied().unwrap_or(1) as f32).sqrt();
                let seed = self
                    .seed
                    .wrapping_add(self.counter.wrapping_mul(0x2545F4914F6CDD1D));
                launch!(
                    self.gpu,
                    "fill_uniform",
                    cfg(grid, 256),
                    dst,
                    n as u64,
                    seed,
                    bound
                )
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

    /// Projections sharing an input, concatenated along the output dimension.
    fn linear(&mut self, prefix: &str, parts: &[(&str, usize)], k: usize, bias: bool) -> Result<Linear> {
        let n: usize = parts.iter().map(|p| p.1).sum();
        let w = self.gpu.alloc(n * k * 2)?;
        let b = if bias { Some(self.gpu.alloc(n * 2)?) } else { None };
        let mut off = 0;
        for &(name, rows) in parts {
            self.fill(
                &format!("{prefix}.{name}.weight"),
                &[rows, k],
                w.at::<u16>(off * k),
            )?;
            if let Some(b) = &b {
                self.fill(&format!("{prefix}.{name}.bias"), &[rows], b.at::<u16>(off))?;
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
        let embed_tokens = ld.tensor("model.embed_tokens.weight", &[v, h])?;
        let lora_rank = bc.max_lora_rank.div_ceil(8) * 8;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = format!("{p}.self_attn");
            let mlp = format!("{p}.mlp");
            let qkv_proj = ld.linear(
                &attn,
                &[("q_proj", qs), ("k_proj", kvs), ("v_proj", kvs)],
                h,
                cfg.qkv_bias,
            )?;
            let o_proj = ld.linear(&attn, &[("o_proj", h)], qs, cfg.o_bias)?;
            let gate_up_proj = ld.linear(&mlp, &[("gate_proj", inter), ("up_proj", inter)], h, false)?;
            let down_proj = ld.linear(&mlp, &[("down_proj", h)], inter, false)?;
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(ld.tensor(&format!("{attn}.q_norm.weight"), &[hd])?),
                    Some(ld.tensor(&format!("{attn}.k_norm.weight"), &[hd])?),
                )
            } else {
                (None, None)
            };
            let mut lora = Vec::new();
            if bc.max_loras > 0 {
                use LoraTarget::*;
                for targets in [
                    vec![QProj, KProj, VProj],
                    vec![OProj],
                    vec![GateProj, UpProj],
                    vec![DownProj],
                ] {
                    lora.push(LoraGroup::new(gpu, cfg, targets, bc.max_loras, lora_rank)?);
                }
            }
            layers.push(Layer {
                qkv_proj,
                o_proj,
                gate_up_proj,
                down_proj,
                input_layernorm: ld.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: ld.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                q_norm,
                k_norm,
                lora,
            });
        }
        let norm = ld.tensor("model.norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(ld.tensor("lm_head.weight", &[v, h])?)
        };

        // RoPE tables exactly as the CPU backend builds them.
        let inv = inv_freq(cfg);
        let half = inv.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(bc.max_model_len * half),
            Vec::with_capacity(bc.max_model_len * half),
        );
        for p in 0..bc.max_model_len {
            for &f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let rope_cos = gpu.alloc(cos.len() * 4)?;
        let rope_sin = gpu.alloc(sin.len() * 4)?;
        gpu.htod(rope_cos.ptr, &cos)?;
        gpu.htod(rope_sin.ptr, &sin)?;

        let num_slots = (bc.num_kv_blocks + 1) * bc.block_size;
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            k_cache.push(gpu.alloc(num_slots * kvs * 2)?);
            v_cache.push(gpu.alloc(num_slots * kvs * 2)?);
        }

        let (t, s) = (bc.max_num_batched_tokens.max(bc.max_num_seqs), bc.max_num_seqs);
        let max_blocks_per_seq = bc.max_model_len.div_ceil(bc.block_size);
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
            att_tiles: take(2 * t),
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
            scratch_slot: (bc.num_kv_blocks * bc.block_size) as u32,
            max_loras: bc.max_loras,
            skinny_max_m: std::env::var("MULTILORA_SKINNY_MAX_M")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(SKINNY_DEFAULT_M)
                .min(SKINNY_MAX_M),
            prefill_attention: prefill::kernel(hd, cfg.num_attention_heads / cfg.num_key_value_heads),
            num_sms: gpu.num_sms as usize,
            lora_rank,
            lora_mask: 0,
            embed_tokens,
            lm_head,
            norm,
            layers,
            rope_cos,
            rope_sin,
            k_cache,
            v_cache,
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
            logits: gpu.alloc(s * v * 4)?,
            token_rows: gpu.alloc(s * 4)?,
            cfg: cfg.clone(),
        })
    }

    pub fn arena_len(&self) -> usize {
        self.arena_layout.len
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    pub fn logits_ptr(&self) -> CUdeviceptr {
        self.logits.ptr
    }

    /// Largest decode batch a graph bucket may pad to.
    pub fn max_graph_tokens(&self) -> usize {
        self.max_seqs.min(self.max_tokens).min(512)
    }

    /// Which LoRA groups hold any adapter, as a bit mask.
    pub fn lora_mask(&self) -> u8 {
        self.lora_mask
    }

    pub fn set_lora_slot(&mut self, gpu: &Gpu, slot: LoraSlot, adapter: Option<&LoraAdapter>) -> Result<()> {
        assert!(self.max_loras > 0, "set_lora_slot with LoRA disabled");
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for group in &mut layer.lora {
                group.set(gpu, li, slot, adapter, self.max_loras, self.lora_rank)?;
            }
        }
        // Slots change rarely, steps often: the mask is kept, not recomputed per step.
        self.lora_mask = 0;
        for layer in &self.layers {
            for (g, group) in layer.lora.iter().enumerate() {
                if group.is_active() {
                    self.lora_mask |= 1 << g;
                }
            }
        }
        Ok(())
    }

    /// Writes the step's inputs into `arena` (host), padded to `shape` for graph buckets:
    /// padded tokens write their K/V to the scratch slot and have no adapter. Sets the shape's
    /// LoRA segments (a step that runs SGMV, [`uses_sgmv`]) and prefill attention tiles.
    pub fn pack_inputs(&self, batch: &StepBatch, shape: &mut StepShape, arena: &mut [u32]) {
        let a = self.arena_layout;
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
            arena[a.slot_mapping + i] = self.scratch_slot;
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
        shape.num_att_tiles = match self.prefill_attention {
            Some(k) if t > s => {
                let per = k.tokens_per_tile(self.cfg.num_attention_heads / self.cfg.num_key_value_heads);
                prefill::pack_tiles(&batch.query_start, per, &mut arena[a.att_tiles..][..2 * t])
            }
            _ => 0,
        };
    }

    /// Copies the packed inputs to the device: LoRA segments and attention tiles only for a
    /// step that has them (from [`Self::pack_inputs`]).
    pub fn upload_inputs(&self, gpu: &Gpu, arena: &[u32], shape: StepShape) -> Result<()> {
        let a = self.arena_layout;
        let len = match shape.num_lora_segments {
            0 => a.num_lora_segments,
            n => a.lora_segments + 3 * n,
        };
        gpu.htod(self.arena.ptr, &arena[..len])?;
        match shape.num_att_tiles {
            0 => Ok(()),
            n => gpu.htod(self.input(a.att_tiles), &arena[a.att_tiles..][..2 * n]),
        }
    }

    fn input(&self, offset: usize) -> CUdeviceptr {
        self.arena.at::<u32>(offset)
    }

    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        gpu: &Gpu,
        lin: &Linear,
        epi: Epilogue,
        x: CUdeviceptr,
        y: CUdeviceptr,
        m: usize,
        ldy: usize,
        norm: NormIo,
    ) -> Result<()> {
        let bias = lin.bias.as_ref().map(|b| b.ptr);
        linear(
            gpu,
            self.skinny_max_m,
            epi,
            lin.w.ptr,
            bias,
            lin.n,
            lin.k,
            x,
            y,
            m,
            ldy,
            self.gate_up.ptr,
            norm,
        )
    }

    /// BGMV shrink of one group: `lora_tmp[z, t, :] = scale · x[t] · A[z, slot(t)]ᵀ`; up to
    /// SHRINK_WIDE_MIN_TOKENS tokens a block per token and SHRINK_ROWS rank rows (more
    /// parallelism for few tokens), above a warp per row (fewer, fuller blocks).
    fn bgmv_shrink(&self, gpu: &Gpu, g: &LoraGroup, x: CUdeviceptr, t: usize) -> Result<()> {
        let w = g.weights(self.lora_rank, self.max_loras);
        let slots = self.input(self.arena_layout.token_slot);
        let wide = t > kernels::SHRINK_WIDE_MIN_TOKENS;
        sgmv::bgmv_shrink(gpu, &w, slots, x, self.lora_tmp.ptr, t, wide)
    }

    /// `base` (the GEMM of LoRA group `g`'s projections, reading `x`), then the group's LoRA
    /// into `y[T, ldy]` if it runs this step (`on`). With `fused` (a decode step whose expand a
    /// later kernel does) only the shrink runs here.
    #[allow(clippy::too_many_arguments)]
    fn with_lora(
        &self,
        gpu: &Gpu,
        g: Option<&LoraGroup>,
        (on, fused): (bool, bool),
        x: CUdeviceptr,
        y: CUdeviceptr,
        ldy: usize,
        shape: StepShape,
        base: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        base()?;
        // An engine without LoRA has no groups.
        match g.filter(|_| on) {
            Some(g) if fused => self.bgmv_shrink(gpu, g, x, shape.num_tokens),
            Some(g) => self.lora(gpu, g, x, y, shape, ldy),
            None => Ok(()),
        }
    }

    /// LoRA shrink + expand of one group, added into `y[T, ldy]`: segmented (SGMV) for long
    /// prefill and mixed steps ([`uses_sgmv`]), BGMV (a token at a time) for the others.
    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        gpu: &Gpu,
        g: &LoraGroup,
        x: CUdeviceptr,
        y: CUdeviceptr,
        shape: StepShape,
        ldy: usize,
    ) -> Result<()> {
        let t = shape.num_tokens;
        let w = g.weights(self.lora_rank, self.max_loras);
        if uses_sgmv(t, shape.num_seqs) {
            let segs = sgmv::Segments {
                segs: self.input(self.arena_layout.lora_segments),
                num_segs: self.input(self.arena_layout.num_lora_segments),
                max_segs: shape.num_lora_segments,
            };
            sgmv::shrink(gpu, &w, &segs, x, self.lora_tmp.ptr, t)?;
            return sgmv::expand(gpu, &w, &segs, self.lora_tmp.ptr, y, t, ldy);
        }
        self.bgmv_shrink(gpu, g, x, t)?;
        let slots = self.input(self.arena_layout.token_slot);
        sgmv::bgmv_expand(gpu, &w, slots, self.lora_tmp.ptr, y, t, ldy)
    }

    /// What a kernel that fuses group `g`'s LoRA expand reads (shrink result, B, ranks), or
    /// null pointers when it does not.
    fn fused_expand(&self, layer: &Layer, g: usize, fused: bool) -> (u64, u64, u64) {
        match layer.lora.get(g).filter(|_| fused) {
            Some(grp) => (self.lora_tmp.ptr, grp.b.ptr, grp.ranks.ptr),
            None => NO_LORA,
        }
    }

    /// RMSNorm of `n` rows of the residual stream into `out` (elem): row i is `rows[i]` (a
    /// device `u32` array), or i where `rows` is 0. `lora` fuses a decode step's LoRA expand
    /// into it first ([`Self::fused_expand`], or [`NO_LORA`]).
    fn rms_norm(
        &self,
        gpu: &Gpu,
        n: usize,
        rows: u64,
        w: u64,
        out: u64,
        lora: (u64, u64, u64),
    ) -> Result<()> {
        let h = self.cfg.hidden_size;
        let (l_tmp, l_b, l_ranks) = lora;
        // A row a block: up to 1024 threads for the few rows of a decode step, 256 (more rows
        // resident an SM, a cheaper block sum) once the rows fill the GPU several times over.
        let threads = if n >= 4 * self.num_sms {
            256
        } else {
            (h.div_ceil(32) * 32).min(1024)
        };
        launch!(
            gpu,
            "add_rms_norm",
            cfg((n as u32, 1, 1), threads as u32),
            self.hidden.ptr,
            rows,
            w,
            out,
            h as i32,
            self.cfg.rms_norm_eps,
            l_tmp,
            l_b,
            l_ranks,
            self.input(self.arena_layout.token_slot),
            self.lora_rank as i32
        )
    }

    /// Whether the q/k/v GEMM with the RoPE epilogue takes `t` tokens of `lin`.
    fn rope_fits(&self, lin: &Linear, t: usize) -> bool {
        skinny::fits(self.skinny_max_m, Epilogue::Store, lin.n, lin.k, t)
            && self.cfg.head_dim.is_multiple_of(16)
    }

    /// What RoPE and the cache write read, for layer `li`: cos and sin tables, each token's
    /// position and cache slot, the layer's K and V caches.
    fn rope_args(&self, li: usize) -> [u64; 6] {
        let a = self.arena_layout;
        [
            self.rope_cos.ptr,
            self.rope_sin.ptr,
            self.input(a.positions),
            self.input(a.slot_mapping),
            self.k_cache[li].ptr,
            self.v_cache[li].ptr,
        ]
    }

    /// Decode, layer `li`: q/k/v with RoPE and the K/V cache write in the GEMM's epilogue (one
    /// launch where [`Self::qkv_then_rope`] makes two).
    fn qkv_rope(&self, gpu: &Gpu, layer: &Layer, li: usize, t: usize, norm: NormIo) -> Result<()> {
        let c = &self.cfg;
        let lin = &layer.qkv_proj;
        let grid = ((lin.n / SKINNY_ROWS) as u32, 1, 1);
        // (x, W, bias, y, M, N, K, ldy), NormArgs, the RoPE arguments, (nh, nkv, hd): one
        // array, no allocation per launch.
        let mut args = [0u64; 17 + skinny::NORM_ARGS];
        args[..8].copy_from_slice(&[
            self.normed.ptr,
            lin.w.ptr,
            lin.bias.as_ref().map_or(0, |b| b.ptr),
            self.qkv.ptr,
            (t as i32).bits(),
            (lin.n as i32).bits(),
            (lin.k as i32).bits(),
            (lin.n as i32).bits(),
        ]);
        const R: usize = 8 + skinny::NORM_ARGS;
        args[8..R].copy_from_slice(&norm.args());
        args[R..R + 6].copy_from_slice(&self.rope_args(li));
        args[R + 6..].copy_from_slice(
            &[c.num_attention_heads, c.num_key_value_heads, c.head_dim].map(|v| (v as i32).bits()),
        );
        // SAFETY: the skinny_rope kernels take (x, W, bias, y, M, N, K, ldy, in_ss, eps, gamma,
        // out, out_ss, cos, sin, positions, slots, k_cache, v_cache, nh, nkv, hd) (skinny.rs);
        // n = (nh + 2 nkv) hd rows in whole heads, hd a multiple of 16 (rope_fits), every buffer
        // sized for the step.
        unsafe { gpu.launch(skinny::rope_kernel_name(t), cfg(grid, SKINNY_THREADS), &args) }
    }

    /// Layer `li`'s q/k/v GEMM with its LoRA, Qwen3's q/k norms, then RoPE and the K/V cache
    /// write: every step [`Self::qkv_rope`] does not take (prefill, and decode with q/k/v LoRA,
    /// q/k norms, more tokens than the skinny GEMM takes, or a head_dim not a multiple of 16).
    fn qkv_then_rope(
        &self,
        gpu: &Gpu,
        layer: &Layer,
        li: usize,
        shape: StepShape,
        norm: NormIo,
    ) -> Result<()> {
        let c = &self.cfg;
        let (hd, nh, nkv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
        let qkv_n = c.q_size() + 2 * c.kv_size();
        let (t, ti, a) = (shape.num_tokens, shape.num_tokens as u32, self.arena_layout);
        let on = shape.lora_mask & 1 != 0;
        let qkv = || {
            self.linear(
                gpu,
                &layer.qkv_proj,
                Epilogue::Store,
                self.normed.ptr,
                self.qkv.ptr,
                t,
                qkv_n,
                norm,
            )
        };
        // Decode without q/k norms: the q/k/v LoRA expand is fused into the RoPE kernel.
        let fuse_qkv_expand = on && t == shape.num_seqs && layer.q_norm.is_none();
        self.with_lora(
            gpu,
            layer.lora.first(),
            (on, fuse_qkv_expand),
            self.normed.ptr,
            self.qkv.ptr,
            qkv_n,
            shape,
            qkv,
        )?;
        let (l_tmp, l_b, l_ranks) = self.fused_expand(layer, 0, fuse_qkv_expand);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            launch!(
                gpu,
                "qk_norm",
                cfg((ti, (nh + nkv) as u32, 1), 32),
                self.qkv.ptr,
                qkv_n as i32,
                nh as i32,
                hd as i32,
                qn.ptr,
                kn.ptr,
                c.rms_norm_eps
            )?;
        }
        let [cos, sin, pos, slots, kc, vc] = self.rope_args(li);
        if t > shape.num_seqs && l_tmp == 0 {
            // Prefill: a 256-thread block per token (rope_kv_write's block per head is 64
            // threads at head_dim 128, 0.95 ms a layer for 8,192 tokens on the H200).
            return launch!(
                gpu,
                "rope_kv_write_rows",
                cfg((ti, 1, 1), 256),
                self.qkv.ptr,
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
            );
        }
        launch!(
            gpu,
            "rope_kv_write",
            cfg((ti, (nh + 2 * nkv) as u32, 1), (hd / 2).div_ceil(32) as u32 * 32),
            self.qkv.ptr,
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
            self.input(a.token_slot),
            t as i32,
            self.lora_rank as i32,
            self.max_loras as i32
        )
    }

    /// Enqueues the kernels of one step on the stream (also what a graph captures).
    pub fn record_forward(&self, gpu: &Gpu, shape: StepShape) -> Result<()> {
        let c = &self.cfg;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let (qs, kvs, inter) = (c.q_size(), c.kv_size(), c.intermediate_size);
        let qkv_n = qs + 2 * kvs;
        let (t, s) = (shape.num_tokens, shape.num_seqs);
        let a = self.arena_layout;
        let ti = t as u32;
        // Decode steps split each (sequence, head)'s context over enough blocks to fill the GPU:
        // about four 128-thread blocks an SM, or with the 1024-thread kernel (few pairs, below)
        // at most one, so that a long context stays in one wave of those.
        let wide_attention = 2 * s * nh <= self.num_sms;
        let parts = if wide_attention {
            self.num_sms / (s * nh)
        } else {
            (4 * self.num_sms).div_ceil(s * nh)
        };
        let decode_parts =
            (t == s && decode_attention_fits(hd)).then(|| parts.clamp(1, DECODE_ATT_MAX_PARTS) as u32);

        // Small bf16 decode steps without LoRA split every RMSNorm after the first (embed's)
        // across the GEMMs around it (NormIo): no norm launches; embed zeroes the sums of squares.
        let split = self.splits_norms(gpu, shape);
        let zero = if split {
            (self.norm_ss.ptr, self.norm_ss.bytes / 4)
        } else {
            (0, 0)
        };
        launch!(
            gpu,
            "embed",
            cfg((ti, 1, 1), (h.div_ceil(32) * 32).min(1024) as u32),
            self.hidden.ptr,
            self.embed_tokens.ptr,
            self.input(a.token_ids),
            h as i32,
            self.layers
                .first()
                .map_or(self.norm.ptr, |l| l.input_layernorm.ptr),
            self.normed.ptr,
            c.rms_norm_eps,
            zero.0,
            zero.1 as i32
        )?;
        let lora_on = |g: usize| shape.lora_mask & (1 << g) != 0;
        for (li, layer) in self.layers.iter().enumerate() {
            let qkv_norm = self.norm_in(split && li > 0, 2 * li);
            // Decode without q/k norms or q/k/v LoRA: RoPE and the cache write are the q/k/v
            // GEMM's epilogue.
            if t == s && !lora_on(0) && layer.q_norm.is_none() && self.rope_fits(&layer.qkv_proj, t) {
                self.qkv_rope(gpu, layer, li, t, qkv_norm)?;
            } else {
                self.qkv_then_rope(gpu, layer, li, shape, qkv_norm)?;
            }
            if let Some(parts) = decode_parts {
                // Few (sequence, head) pairs: one 1024-thread block each reads a short context
                // in one round, with no second pass to merge parts (kernels.rs).
                let (name, threads) = if wide_attention {
                    ("decode_attention_wide", kernels::DECODE_ATT_WIDE_THREADS)
                } else {
                    ("decode_attention", kernels::DECODE_ATT_THREADS)
                };
                let args = [
                    self.qkv.ptr,
                    (qkv_n as i32).bits(),
                    self.attn.ptr,
                    self.k_cache[li].ptr,
                    self.v_cache[li].ptr,
                    self.input(a.positions),
                    self.input(a.block_tables),
                    (self.max_blocks_per_seq as i32).bits(),
                    (self.block_size as i32).bits(),
                    (nh as i32).bits(),
                    (nkv as i32).bits(),
                    (hd as i32).bits(),
                    (1.0f32 / (hd as f32).sqrt()).bits(),
                    self.att_part.ptr,
                    self.att_count.ptr,
                ];
                // SAFETY: both decode attention kernels take (qkv, ld, out, k_cache, v_cache,
                // positions, block_tables, max_blocks, block_size, nh, nkv, hd, scale, part,
                // counters) (kernels.rs); the buffers are the model's, sized for its limits.
                unsafe { gpu.launch(name, cfg((ti, nh as u32, parts), threads), &args) }?;
            } else if let (Some(k), true) = (self.prefill_attention, shape.num_att_tiles > 0) {
                let inputs = prefill::Inputs {
                    qkv: self.qkv.ptr,
                    ld: qkv_n,
                    out: self.attn.ptr,
                    k_cache: self.k_cache[li].ptr,
                    v_cache: self.v_cache[li].ptr,
                    tiles: self.input(a.att_tiles),
                    num_tiles: shape.num_att_tiles,
                    token_seq: self.input(a.token_seq),
                    positions: self.input(a.positions),
                    block_tables: self.input(a.block_tables),
                    max_blocks: self.max_blocks_per_seq,
                    block_size: self.block_size,
                };
                prefill::launch(gpu, k, &inputs, nh, nkv, hd)?;
            } else {
                launch!(
                    gpu,
                    "paged_attention",
                    cfg((ti, nh as u32, 1), kernels::ATT_THREADS),
                    self.qkv.ptr,
                    qkv_n as i32,
                    self.attn.ptr,
                    self.k_cache[li].ptr,
                    self.v_cache[li].ptr,
                    self.input(a.token_seq),
                    self.input(a.positions),
                    self.input(a.block_tables),
                    self.max_blocks_per_seq as i32,
                    self.block_size as i32,
                    nh as i32,
                    nkv as i32,
                    hd as i32,
                    1.0f32 / (hd as f32).sqrt()
                )?;
            }
            // o_proj (and its LoRA) add straight into the residual stream.
            let o = || {
                self.linear(
                    gpu,
                    &layer.o_proj,
                    Epilogue::Add,
                    self.attn.ptr,
                    self.hidden.ptr,
                    t,
                    h,
                    self.norm_out(split, 2 * li + 1, layer.post_attention_layernorm.ptr),
                )
            };
            // Decode: the o_proj LoRA expand is fused into the norm that follows.
            let fuse_o = lora_on(1) && t == s;
            self.with_lora(
                gpu,
                layer.lora.get(1),
                (lora_on(1), fuse_o),
                self.attn.ptr,
                self.hidden.ptr,
                h,
                shape,
                o,
            )?;
            let lora = self.fused_expand(layer, 1, fuse_o);
            if !split {
                self.rms_norm(
                    gpu,
                    t,
                    0,
                    layer.post_attention_layernorm.ptr,
                    self.normed.ptr,
                    lora,
                )?;
            }
            if lora_on(2) {
                // LoRA on gate/up must land before the activation: no fused epilogue.
                self.linear(
                    gpu,
                    &layer.gate_up_proj,
                    Epilogue::Store,
                    self.normed.ptr,
                    self.gate_up.ptr,
                    t,
                    2 * inter,
                    NormIo::NONE,
                )?;
                self.lora(
                    gpu,
                    &layer.lora[2],
                    self.normed.ptr,
                    self.gate_up.ptr,
                    shape,
                    2 * inter,
                )?;
                silu_mul(gpu, self.gate_up.ptr, self.act.ptr, inter, t)?;
            } else {
                self.linear(
                    gpu,
                    &layer.gate_up_proj,
                    Epilogue::SiluMul,
                    self.normed.ptr,
                    self.act.ptr,
                    t,
                    inter,
                    self.norm_in(split, 2 * li + 1),
                )?;
            }
            // The next layer's input norm, or the final norm after the last layer.
            let next_norm = self
                .layers
                .get(li + 1)
                .map_or(self.norm.ptr, |l| l.input_layernorm.ptr);
            let down = || {
                self.linear(
                    gpu,
                    &layer.down_proj,
                    Epilogue::Add,
                    self.act.ptr,
                    self.hidden.ptr,
                    t,
                    h,
                    self.norm_out(split, 2 * li + 2, next_norm),
                )
            };
            // Decode: the down_proj LoRA expand is fused into the next norm.
            let fuse_down = lora_on(3) && t == s;
            self.with_lora(
                gpu,
                layer.lora.get(3),
                (lora_on(3), fuse_down),
                self.act.ptr,
                self.hidden.ptr,
                h,
                shape,
                down,
            )?;
            let lora = self.fused_expand(layer, 3, fuse_down);
            // (The last layer's output norm is recomputed below on the rows that need logits.)
            if !split {
                self.rms_norm(gpu, t, 0, next_norm, self.normed.ptr, lora)?;
            }
        }
        // Split norms: every token of a decode step is its sequence's last, and the last
        // down_proj wrote them unscaled into `normed`.
        let (x_last, lm_norm) = if split {
            (self.normed.ptr, self.norm_in(true, 2 * self.layers.len()))
        } else {
            let last_rows = self.input(a.last_rows);
            self.rms_norm(gpu, s, last_rows, self.norm.ptr, self.last_normed.ptr, NO_LORA)?;
            (self.last_normed.ptr, NormIo::NONE)
        };
        self.lm_head(gpu, x_last, s, lm_norm)
    }

    /// `logits[n, vocab] = x[n, hidden] · lm_headᵀ` (`norm`: x is a split norm's unscaled
    /// output).
    fn lm_head(&self, gpu: &Gpu, x: CUdeviceptr, n: usize, norm: NormIo) -> Result<()> {
        let c = &self.cfg;
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        linear(
            gpu,
            self.skinny_max_m,
            Epilogue::Store,
            lm_head.ptr,
            None,
            c.vocab_size,
            c.hidden_size,
            x,
            self.logits.ptr,
            n,
            c.vocab_size,
            0,
            norm,
        )
    }

    /// Logits of chosen tokens of the step just run into the logits buffer, `[rows.len(),
    /// vocab]` (`rows` index the step's tokens, at most `max_seqs`): the final norm and the LM
    /// head over those rows of the residual stream. Only after a step that did not split its
    /// norms ([`Self::splits_norms`]: a decode step, whose every row already had its logits),
    /// since a split step leaves the last layer's output outside `hidden`.
    pub fn record_token_logits(&self, gpu: &Gpu, rows: &[u32]) -> Result<()> {
        assert!(rows.len() <= self.max_seqs, "at most max_seqs rows a call");
        if rows.is_empty() {
            return Ok(());
        }
        gpu.htod(self.token_rows.ptr, rows)?;
        let n = rows.len();
        self.rms_norm(
            gpu,
            n,
            self.token_rows.ptr,
            self.norm.ptr,
            self.last_normed.ptr,
            NO_LORA,
        )?;
        self.lm_head(gpu, self.last_normed.ptr, n, NormIo::NONE)
    }

    /// Whether a step splits its RMSNorms (all but layer 0's input norm) across the GEMMs
    /// around them ([`NormIo`]): bf16 decode steps of up to [`NORM_SPLIT_MAX_TOKENS`] tokens
    /// without LoRA (whose kernels read a whole normed x), every projection on the skinny GEMM.
    /// Not f16, where h · gamma, rounded before the 1/rms scale, could overflow or lose bits
    /// as a subnormal; not a model without layers, whose only norm is embed's.
    fn splits_norms(&self, gpu: &Gpu, shape: StepShape) -> bool {
        let (t, c) = (shape.num_tokens, &self.cfg);
        let fits = |lin: &Linear, epi| skinny::fits(self.skinny_max_m, epi, lin.n, lin.k, t);
        gpu.elem == Elem::Bf16
            && !self.layers.is_empty()
            && t == shape.num_seqs
            && t <= NORM_SPLIT_MAX_TOKENS
            && shape.lora_mask == 0
            && skinny::fits(self.skinny_max_m, Epilogue::Store, c.vocab_size, c.hidden_size, t)
            && self.layers.iter().all(|l| {
                fits(&l.qkv_proj, Epilogue::Store)
                    && fits(&l.o_proj, Epilogue::Add)
                    && fits(&l.gate_up_proj, Epilogue::SiluMul)
                    && fits(&l.down_proj, Epilogue::Add)
            })
    }

    /// Split norm `b`'s per-token sums of squares: b = 2·li + 1 after layer li's o_proj,
    /// 2·li + 2 after its down_proj (the next layer's input norm, or the final norm).
    fn norm_ss_at(&self, b: usize) -> u64 {
        self.norm_ss.at::<f32>(b * NORM_SPLIT_MAX_TOKENS)
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
                out: self.normed.ptr,
                out_ss: self.norm_ss_at(b),
                ..NormIo::NONE
            },
            false => NormIo::NONE,
        }
    }
}

/// Most tokens of a step whose RMSNorms are split across GEMMs ([`CudaModel::splits_norms`]):
/// the one-n-tile skinny kernels.
const NORM_SPLIT_MAX_TOKENS: usize = 8;

/// `x[m, k] · W[n, k]ᵀ (+ bias)` into `y[m, ldy]` as `epi` says: the skinny GEMM (epilogue
/// fused; a residual add of up to 8 tokens over a long K in 2–4 shares added atomically) for up
/// to `skinny_max_m` tokens, cuBLAS and an elementwise kernel above. For
/// [`Epilogue::SiluMul`], W is `[gate; up]` (n = 2I), `y` is elem `[m, I]`, and the cuBLAS path
/// goes through `scratch` (f32 `[m, n]`). `norm`, either end of an RMSNorm split across two
/// GEMMs ([`NormIo`]), needs the skinny GEMM.
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
    debug_assert!(
        norm.out == 0 || epi == Epilogue::Add,
        "a norm output needs a residual add"
    );
    debug_assert!(
        norm.in_ss == 0 || epi != Epilogue::Add,
        "a residual add's x is never a split norm's"
    );
    if skinny::fits(skinny_max_m, epi, n, k, m) {
        let (rows, per_block) = match epi {
            Epilogue::SiluMul => (n / 2, SKINNY_ROWS / 2),
            _ => (n, SKINNY_ROWS),
        };
        let (bias, m32, n32, k32, ld32) = (bias.unwrap_or(0), m as i32, rows as i32, k as i32, ldy as i32);
        let blocks = rows.div_ceil(per_block);
        // A residual add with few rows and a long K (o_proj, down_proj at one token: 256 blocks
        // where an SM holds four) cuts K into shares of at least 32 chunks, added atomically
        // (on the H200: o_proj 71% → 80% and down_proj 81% → 93% of copy bandwidth).
        let split = match epi {
            Epilogue::Add if m <= 8 && blocks < 4 * gpu.num_sms as usize => (k.div_ceil(64) / 32).clamp(1, 4),
            _ => 1,
        };
        // With a norm output, a tile's sum stays in one block: 16 warps where K would be split.
        let (name, split, threads) = match (split, norm.out) {
            (1, _) => (skinny::kernel_name(epi, m), 1, SKINNY_THREADS),
            (_, 0) => (skinny::kernel_name(epi, m), split, SKINNY_THREADS),
            _ => (skinny::ADD_WIDE, 1, skinny::ADD_WIDE_THREADS),
        };
        let grid = (blocks as u32, split as u32, 1);
        let mut args = [0u64; 8 + skinny::NORM_ARGS];
        args[..8].copy_from_slice(&[x, w, bias, y, m32.bits(), n32.bits(), k32.bits(), ld32.bits()]);
        args[8..].copy_from_slice(&norm.args());
        // SAFETY: every skinny kernel takes (x, W, bias, y, M, N, K, ldy, in_ss, eps, gamma, out,
        // out_ss) (skinny.rs); skinny_add_8_w16 takes 512 threads.
        return unsafe { gpu.launch(name, cfg(grid, threads), &args) };
    }
    if norm != NormIo::NONE {
        return Err(Error::Backend(format!(
            "internal: an RMSNorm split across GEMMs needs the skinny GEMM ({m} tokens, {n} x {k})"
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
            "add_bias",
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
    launch!(gpu, "silu_mul", cfg(grid, 256), gu, out, inter as i32, t as i32)
}

/// Token counts from which prefill/mixed steps use SGMV rather than per-token BGMV. On the H200
/// (Llama-2-7B shape, 32 distinct rank-16 adapters on q,k,v,o) SGMV cost +12.3 ms over no-LoRA
/// at 32 × 128 tokens against BGMV's +22.7 ms, but +3.3 ms against +1.2 ms at 128 tokens
/// (BENCHMARKS.md); the crossover between those two points was not measured.
const SGMV_MIN_TOKENS: usize = 512;

/// Whether a step of `t` tokens over `s` sequences runs its LoRA as SGMV (its segments packed
/// by `pack_inputs`) rather than BGMV.
fn uses_sgmv(t: usize, s: usize) -> bool {
    t > s && t >= SGMV_MIN_TOKENS
}

/// [`CudaModel::rms_norm`] without a fused LoRA expand.
const NO_LORA: (u64, u64, u64) = (0, 0, 0);

/// Head sizes `decode_attention` takes: hd / 8 lanes per key, a power of two up to a warp.
fn decode_attention_fits(hd: usize) -> bool {
    hd.is_multiple_of(8) && (hd / 8).is_power_of_two() && hd / 8 <= 32
}
