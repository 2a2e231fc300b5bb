//! The Llama-family decoder on the CPU, with field names as in the checkpoint
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...). One forward pass runs every token of a
//! step — prefills and decodes mixed — and applies LoRA with one shrink/expand per projection.

use crate::backend::StepBatch;
use crate::cpu::attention::{paged_attention, AttnMeta};
use crate::cpu::linear::{linear_group, linear_weight, LinearCall};
use crate::cpu::ops::{self, Rope};
use crate::cpu::{KvCache, Workspace};
use crate::error::Result;
use crate::lora::punica::{self, LoraStack};
use crate::lora::{LoraSlot, LoraTarget};
use crate::models::spec;
use crate::weights::{Weight, WeightDtype, WeightSource};
use crate::ModelConfig;

pub struct Linear {
    /// `[out_features, in_features]`
    pub weight: Weight,
    /// `[out_features]`
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    fn load(
        w: &mut WeightSource,
        prefix: &str,
        (in_f, out_f): (usize, usize),
        bias: bool,
        dtype: WeightDtype,
    ) -> Result<Self> {
        Ok(Linear {
            weight: w.weight(&format!("{prefix}.weight"), &[out_f, in_f], dtype)?,
            bias: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out_f])?)
            } else {
                None
            },
            in_features: in_f,
            out_features: out_f,
        })
    }

    /// This layer's part of a [`linear_group`] writing into `y`.
    fn call<'a>(&'a self, y: &'a mut [f32]) -> LinearCall<'a> {
        LinearCall {
            w: &self.weight,
            bias: self.bias.as_deref(),
            out_f: self.out_features,
            y,
        }
    }

    /// `y[T, out] = x[T, in] · Wᵀ + b`
    fn forward(&self, x: &[f32], num_tokens: usize, y: &mut [f32]) {
        linear_weight(
            x,
            &self.weight,
            self.bias.as_deref(),
            num_tokens,
            self.in_features,
            self.out_features,
            y,
        );
    }
}

pub struct SelfAttn {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// `[head_dim]`, Qwen3 only
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct DecoderLayer {
    pub self_attn: SelfAttn,
    pub mlp: Mlp,
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
}

pub struct Llama {
    pub cfg: ModelConfig,
    /// `[vocab, hidden]`
    pub embed_tokens: Weight,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`
    pub lm_head: Option<Weight>,
    rope: Rope,
}

/// The LoRA stacks of one step, and the slot of each token.
pub struct LoraInput<'a> {
    /// `[num_layers * 7]`, indexed by `layer * 7 + target`
    pub stacks: &'a [LoraStack],
    /// `[T]`
    pub token_lora: &'a [Option<LoraSlot>],
}

impl Llama {
    /// Loads the weights; the embedding and every weight matrix are kept in `dtype`, norms and
    /// biases in f32.
    pub fn load(
        w: &mut WeightSource,
        cfg: &ModelConfig,
        max_positions: usize,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = w.weight(spec::EMBED_TOKENS, &[v, h], dtype)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            // Names, shapes and biases from the model spec the CUDA loader reads too.
            let proj = |w: &mut WeightSource, t: LoraTarget| {
                let module = spec::proj_module(i, t);
                Linear::load(w, &module, t.shape(cfg), spec::has_bias(t, cfg), dtype)
            };
            let head_norm = |w: &mut WeightSource, name: &str| match cfg.qk_norm {
                true => w.get(&spec::layer_tensor(i, name), &[cfg.head_dim]).map(Some),
                false => Ok(None),
            };
            let self_attn = SelfAttn {
                q_proj: proj(w, LoraTarget::QProj)?,
                k_proj: proj(w, LoraTarget::KProj)?,
                v_proj: proj(w, LoraTarget::VProj)?,
                o_proj: proj(w, LoraTarget::OProj)?,
                q_norm: head_norm(w, "self_attn.q_norm.weight")?,
                k_norm: head_norm(w, "self_attn.k_norm.weight")?,
            };
            let mlp = Mlp {
                gate_proj: proj(w, LoraTarget::GateProj)?,
                up_proj: proj(w, LoraTarget::UpProj)?,
                down_proj: proj(w, LoraTarget::DownProj)?,
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: w.get(&spec::layer_tensor(i, "input_layernorm.weight"), &[h])?,
                post_attention_layernorm: w
                    .get(&spec::layer_tensor(i, "post_attention_layernorm.weight"), &[h])?,
            });
        }
        let norm = w.get(spec::FINAL_NORM, &[h])?;
        // Some tied checkpoints still store lm_head; either way the embedding is used.
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(w.weight(spec::LM_HEAD, &[v, h], dtype)?)
        };
        Ok(Llama {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, max_positions),
        })
    }

    /// Runs one step. Writes the step's K/V into `kv` and the logits of each sequence's last
    /// token into `ws.logits` (`[num_seqs, vocab]`).
    pub fn forward(
        &self,
        batch: &StepBatch,
        kv: &mut KvCache,
        lora: Option<LoraInput<'_>>,
        ws: &mut Workspace,
    ) {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (qs, kvs, inter) = (cfg.q_size(), cfg.kv_size(), cfg.intermediate_size);
        let t = batch.num_tokens();
        assert!(batch
            .positions
            .iter()
            .all(|&p| (p as usize) < self.rope.max_positions()));

        let hidden = &mut ws.hidden[..t * h]; // [T, hidden], the residual stream
        for (row, &tok) in hidden.chunks_exact_mut(h).zip(&batch.token_ids) {
            self.embed_tokens.read_f32(tok as usize * h, row);
        }
        let meta = AttnMeta {
            query_start: &batch.query_start,
            positions: &batch.positions,
            block_tables: &batch.block_tables,
            max_blocks_per_seq: batch.max_blocks_per_seq,
            block_size: kv.block_size,
        };
        let lora_tmp = &mut ws.lora_tmp;
        // y[T, out] += the layer's adapters of `target` applied to x[T, in].
        let add_lora = |layer: usize, target: LoraTarget, x: &[f32], y: &mut [f32], tmp: &mut Vec<f32>| {
            if let Some(l) = &lora {
                let stack = &l.stacks[layer * LoraTarget::ALL.len() + target.index()];
                tmp.resize(t * stack.max_rank, 0.0);
                punica::shrink(x, stack, l.token_lora, tmp);
                punica::expand(tmp, stack, l.token_lora, y);
            }
        };
        // x: [T, in] -> y: [T, out] with the layer's adapters added.
        let project =
            |lin: &Linear, layer: usize, target: LoraTarget, x: &[f32], y: &mut [f32], tmp: &mut Vec<f32>| {
                lin.forward(x, t, y);
                add_lora(layer, target, x, y, tmp);
            };

        for (li, layer) in self.layers.iter().enumerate() {
            let normed = &mut ws.normed[..t * h];
            ops::rms_norm(hidden, &layer.input_layernorm, cfg.rms_norm_eps, normed);
            let a = &layer.self_attn;
            let (q, k, v) = (&mut ws.q[..t * qs], &mut ws.k[..t * kvs], &mut ws.v[..t * kvs]);
            linear_group(
                normed,
                t,
                h,
                &mut [a.q_proj.call(q), a.k_proj.call(k), a.v_proj.call(v)],
            );
            add_lora(li, LoraTarget::QProj, normed, q, lora_tmp);
            add_lora(li, LoraTarget::KProj, normed, k, lora_tmp);
            add_lora(li, LoraTarget::VProj, normed, v, lora_tmp);
            if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                ops::rms_norm_heads(q, qn, cfg.rms_norm_eps);
                ops::rms_norm_heads(k, kn, cfg.rms_norm_eps);
            }
            self.rope.apply(q, &batch.positions, nh);
            self.rope.apply(k, &batch.positions, nkv);
            let (k_cache, v_cache) = (&mut kv.k[li], &mut kv.v[li]);
            for (ti, &slot) in batch.slot_mapping.iter().enumerate() {
                let s = slot as usize * kvs;
                k_cache[s..s + kvs].copy_from_slice(&k[ti * kvs..(ti + 1) * kvs]);
                v_cache[s..s + kvs].copy_from_slice(&v[ti * kvs..(ti + 1) * kvs]);
            }
            let attn = &mut ws.attn[..t * qs];
            paged_attention(q, k_cache, v_cache, &meta, nh, nkv, hd, attn);
            let o = &mut ws.normed[..t * h]; // normed is free again: reuse it for o_proj's output
            project(&a.o_proj, li, LoraTarget::OProj, attn, o, lora_tmp);
            ops::add_inplace(hidden, o);

            let normed = &mut ws.normed[..t * h];
            ops::rms_norm(hidden, &layer.post_attention_layernorm, cfg.rms_norm_eps, normed);
            let (gate, up) = (&mut ws.gate[..t * inter], &mut ws.up[..t * inter]);
            let mlp = &layer.mlp;
            linear_group(
                normed,
                t,
                h,
                &mut [mlp.gate_proj.call(gate), mlp.up_proj.call(up)],
            );
            add_lora(li, LoraTarget::GateProj, normed, gate, lora_tmp);
            add_lora(li, LoraTarget::UpProj, normed, up, lora_tmp);
            ops::silu_mul(gate, up);
            let down = &mut ws.normed[..t * h];
            project(
                &layer.mlp.down_proj,
                li,
                LoraTarget::DownProj,
                gate,
                down,
                lora_tmp,
            );
            ops::add_inplace(hidden, down);
        }

        // Only each sequence's last token needs logits.
        let num_seqs = batch.num_seqs();
        let last = (1..=num_seqs).map(|s| batch.query_start[s] - 1);
        self.logits_of(last, num_seqs, ws);
    }

    /// Logits of the given tokens of the last forward (`ws.hidden` holds their final hidden
    /// states) into `ws.logits`, `[rows.len(), vocab]`; at most `max_seqs` rows.
    pub fn token_logits(&self, rows: &[u32], ws: &mut Workspace) {
        self.logits_of(rows.iter().copied(), rows.len(), ws);
    }

    fn logits_of(&self, rows: impl Iterator<Item = u32>, num_rows: usize, ws: &mut Workspace) {
        let (cfg, h) = (&self.cfg, self.cfg.hidden_size);
        let normed = &mut ws.last_hidden[..num_rows * h]; // [num_rows, hidden]
        for (row, ti) in normed.chunks_exact_mut(h).zip(rows) {
            let ti = ti as usize;
            ops::rms_norm_row(
                &ws.hidden[ti * h..(ti + 1) * h],
                &self.norm,
                cfg.rms_norm_eps,
                row,
            );
        }
        let lm_head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        linear_weight(normed, lm_head, None, num_rows, h, cfg.vocab_size, &mut ws.logits);
    }
}
