//! The Llama-family decoder on the CPU, with field names as in the checkpoint
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...). One forward pass runs every token of a
//! step — prefills and decodes mixed — and applies LoRA with one shrink/expand per projection.
//! Each layer holds one shard per tensor-parallel rank ([`crate::tp`]); without tensor
//! parallelism that is one shard holding the whole layer.

use crate::backend::StepBatch;
use crate::cpu::attention::{paged_attention, AttnMeta};
use crate::cpu::linear::{linear_group, linear_weight, LinearCall};
use crate::cpu::ops::{self, Rope};
use crate::cpu::{KvCache, RankWorkspace, Workspace};
use crate::error::Result;
use crate::lora::punica::{self, LoraStack};
use crate::lora::{LoraSlot, LoraTarget};
use crate::models::spec;
use crate::tp::{Parallel, Sharding};
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

/// One rank's share of the attention block (the whole of it without tensor parallelism).
pub struct SelfAttn {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// `[head_dim]`, Qwen3 only
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
}

/// One rank's share of the MLP.
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// What one tensor-parallel rank holds of a decoder layer.
pub struct LayerShard {
    pub self_attn: SelfAttn,
    pub mlp: Mlp,
}

pub struct DecoderLayer {
    /// `[tensor_parallel_size]`
    pub shards: Vec<LayerShard>,
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub sharding: Sharding,
    /// The shapes each rank runs (its heads and intermediate features).
    pub rank_cfg: ModelConfig,
    /// `[vocab, hidden]` by vocabulary rows, one part per rank
    pub embed_tokens: Vec<Weight>,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]` as `embed_tokens`; `None` when tied to `embed_tokens`
    pub lm_head: Option<Vec<Weight>>,
    rope: Rope,
}

/// The LoRA stacks of one step, and the slot of each token.
pub struct LoraInput<'a> {
    /// `[num_layers * 7 * tensor_parallel_size]`, see [`LoraInput::index`]
    pub stacks: &'a [LoraStack],
    /// `[T]`
    pub token_lora: &'a [Option<LoraSlot>],
}

impl LoraInput<'_> {
    /// Where rank `rank`'s stack of `target` in `layer` is among `num_ranks` ranks' stacks.
    pub fn index(layer: usize, target: LoraTarget, rank: usize, num_ranks: usize) -> usize {
        (layer * LoraTarget::ALL.len() + target.index()) * num_ranks + rank
    }
}

/// Each rank's rows of `whole` (`rows(rank)`, see [`crate::tp`]); `whole` itself with one rank.
fn split_rows(
    whole: Weight,
    rows: impl Fn(usize) -> std::ops::Range<usize>,
    row_len: usize,
    s: &Sharding,
) -> Vec<Weight> {
    if s.size == 1 {
        return vec![whole];
    }
    (0..s.size).map(|r| whole.rows(rows(r), row_len)).collect()
}

/// Projection `t` of layer `layer` (name, shape and bias from the model spec the CUDA loader
/// reads too), loaded whole — in the checkpoint's order, which dummy weights depend on — then
/// split over the ranks.
fn load_split(
    w: &mut WeightSource,
    cfg: &ModelConfig,
    layer: usize,
    t: LoraTarget,
    s: &Sharding,
    dtype: WeightDtype,
) -> Result<std::vec::IntoIter<Linear>> {
    let module = spec::proj_module(layer, t);
    let whole = Linear::load(w, &module, t.shape(cfg), spec::has_bias(t, cfg), dtype)?;
    Ok(whole.split(t, s).into_iter())
}

impl Linear {
    /// Each rank's part of this projection of `target`, as [`crate::tp`] splits it; the
    /// projection itself with one rank. A row-parallel bias stays with rank 0, so the
    /// all-reduce adds it once.
    fn split(self, target: LoraTarget, s: &Sharding) -> Vec<Linear> {
        if s.size == 1 {
            return vec![self];
        }
        (0..s.size)
            .map(|r| {
                let f = s.features(target, r);
                match Parallel::of(target) {
                    Parallel::Column => Linear {
                        weight: self.weight.rows(f.clone(), self.in_features),
                        bias: self.bias.as_ref().map(|b| b[f.clone()].to_vec()),
                        in_features: self.in_features,
                        out_features: f.len(),
                    },
                    Parallel::Row => Linear {
                        weight: self.weight.columns(f.clone(), self.in_features),
                        bias: self.bias.clone().filter(|_| r == 0),
                        in_features: f.len(),
                        out_features: self.out_features,
                    },
                }
            })
            .collect()
    }
}

impl Llama {
    /// Loads the weights, split over `sharding`'s ranks; the embedding and every weight matrix
    /// are kept in `dtype`, norms and biases in f32.
    pub fn load(
        w: &mut WeightSource,
        cfg: &ModelConfig,
        sharding: Sharding,
        max_positions: usize,
        dtype: WeightDtype,
    ) -> Result<Self> {
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let s = &sharding;
        let embed = w.weight(spec::EMBED_TOKENS, &[v, h], dtype)?;
        let embed_tokens = split_rows(embed, |r| s.vocab_rows(r), h, s);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let proj = |w: &mut WeightSource, t: LoraTarget| load_split(w, cfg, i, t, s, dtype);
            let (mut q, mut k) = (proj(w, LoraTarget::QProj)?, proj(w, LoraTarget::KProj)?);
            let (mut vp, mut o) = (proj(w, LoraTarget::VProj)?, proj(w, LoraTarget::OProj)?);
            let head_norm = |w: &mut WeightSource, name: &str| match cfg.qk_norm {
                true => w.get(&spec::layer_tensor(i, name), &[cfg.head_dim]).map(Some),
                false => Ok(None),
            };
            let q_norm = head_norm(w, "self_attn.q_norm.weight")?;
            let k_norm = head_norm(w, "self_attn.k_norm.weight")?;
            let (mut gate, mut up) = (proj(w, LoraTarget::GateProj)?, proj(w, LoraTarget::UpProj)?);
            let mut down = proj(w, LoraTarget::DownProj)?;
            let shards = (0..s.size)
                .map(|_| {
                    let next = |it: &mut std::vec::IntoIter<Linear>| it.next().expect("one part a rank");
                    LayerShard {
                        self_attn: SelfAttn {
                            q_proj: next(&mut q),
                            k_proj: next(&mut k),
                            v_proj: next(&mut vp),
                            o_proj: next(&mut o),
                            q_norm: q_norm.clone(),
                            k_norm: k_norm.clone(),
                        },
                        mlp: Mlp {
                            gate_proj: next(&mut gate),
                            up_proj: next(&mut up),
                            down_proj: next(&mut down),
                        },
                    }
                })
                .collect();
            layers.push(DecoderLayer {
                shards,
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
            let whole = w.weight(spec::LM_HEAD, &[v, h], dtype)?;
            Some(split_rows(whole, |r| s.vocab_rows(r), h, s))
        };
        Ok(Llama {
            cfg: cfg.clone(),
            rank_cfg: sharding.rank_config(cfg),
            sharding,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, max_positions),
        })
    }

    /// Runs one step. Writes the step's K/V into `kv` and the logits of each sequence's last
    /// token into `ws.logits` (`[num_seqs, vocab]`). With tensor parallelism the ranks run
    /// one after another, and each all-reduce is a sum of their partial outputs.
    pub fn forward(
        &self,
        batch: &StepBatch,
        kv: &mut KvCache,
        lora: Option<LoraInput<'_>>,
        ws: &mut Workspace,
    ) {
        let (cfg, rc) = (&self.cfg, &self.rank_cfg);
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (rc.num_attention_heads, rc.num_key_value_heads);
        let (qs, kvs, inter) = (rc.q_size(), rc.kv_size(), rc.intermediate_size);
        let num_ranks = self.sharding.size;
        let t = batch.num_tokens();
        assert!(batch
            .positions
            .iter()
            .all(|&p| (p as usize) < self.rope.max_positions()));

        let Workspace {
            hidden,
            normed,
            lora_tmp,
            ranks,
            ..
        } = ws;
        let hidden = &mut hidden[..t * h]; // [T, hidden], the residual stream
        for (row, &tok) in hidden.chunks_exact_mut(h).zip(&batch.token_ids) {
            let (rank, row_in_rank) = self.sharding.vocab_owner(tok as usize);
            self.embed_tokens[rank].read_f32(row_in_rank * h, row);
        }
        let meta = AttnMeta {
            query_start: &batch.query_start,
            positions: &batch.positions,
            block_tables: &batch.block_tables,
            max_blocks_per_seq: batch.max_blocks_per_seq,
            block_size: kv.block_size,
        };
        // y[T, out] += rank `rank`'s share of the layer's adapters of `target` applied to x[T, in].
        let add_lora =
            |layer: usize, target: LoraTarget, rank: usize, x: &[f32], y: &mut [f32], tmp: &mut Vec<f32>| {
                if let Some(l) = &lora {
                    let stack = &l.stacks[LoraInput::index(layer, target, rank, num_ranks)];
                    tmp.resize(t * stack.max_rank, 0.0);
                    punica::shrink(x, stack, l.token_lora, tmp);
                    punica::expand(tmp, stack, l.token_lora, y);
                }
            };

        for (li, layer) in self.layers.iter().enumerate() {
            let normed = &mut normed[..t * h];
            ops::rms_norm(hidden, &layer.input_layernorm, cfg.rms_norm_eps, normed);
            for (r, (shard, rw)) in layer.shards.iter().zip(ranks.iter_mut()).enumerate() {
                let a = &shard.self_attn;
                let (q, k, v) = (&mut rw.q[..t * qs], &mut rw.k[..t * kvs], &mut rw.v[..t * kvs]);
                linear_group(
                    normed,
                    t,
                    h,
                    &mut [a.q_proj.call(q), a.k_proj.call(k), a.v_proj.call(v)],
                );
                add_lora(li, LoraTarget::QProj, r, normed, q, lora_tmp);
                add_lora(li, LoraTarget::KProj, r, normed, k, lora_tmp);
                add_lora(li, LoraTarget::VProj, r, normed, v, lora_tmp);
                if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
                    ops::rms_norm_heads(q, qn, cfg.rms_norm_eps);
                    ops::rms_norm_heads(k, kn, cfg.rms_norm_eps);
                }
                self.rope.apply(q, &batch.positions, nh);
                self.rope.apply(k, &batch.positions, nkv);
                let cache = li * num_ranks + r;
                let (k_cache, v_cache) = (&mut kv.k[cache], &mut kv.v[cache]);
                for (ti, &slot) in batch.slot_mapping.iter().enumerate() {
                    let s = slot as usize * kvs;
                    k_cache[s..s + kvs].copy_from_slice(&k[ti * kvs..(ti + 1) * kvs]);
                    v_cache[s..s + kvs].copy_from_slice(&v[ti * kvs..(ti + 1) * kvs]);
                }
                let attn = &mut rw.attn[..t * qs];
                paged_attention(q, k_cache, v_cache, &meta, nh, nkv, hd, attn);
                let out = &mut rw.out[..t * h];
                a.o_proj.forward(attn, t, out);
                add_lora(li, LoraTarget::OProj, r, attn, out, lora_tmp);
            }
            ops::add_inplace(hidden, all_reduce(ranks, t * h));

            ops::rms_norm(hidden, &layer.post_attention_layernorm, cfg.rms_norm_eps, normed);
            for (r, (shard, rw)) in layer.shards.iter().zip(ranks.iter_mut()).enumerate() {
                let (gate, up) = (&mut rw.gate[..t * inter], &mut rw.up[..t * inter]);
                let mlp = &shard.mlp;
                linear_group(
                    normed,
                    t,
                    h,
                    &mut [mlp.gate_proj.call(gate), mlp.up_proj.call(up)],
                );
                add_lora(li, LoraTarget::GateProj, r, normed, gate, lora_tmp);
                add_lora(li, LoraTarget::UpProj, r, normed, up, lora_tmp);
                ops::silu_mul(gate, up);
                let out = &mut rw.out[..t * h];
                mlp.down_proj.forward(gate, t, out);
                add_lora(li, LoraTarget::DownProj, r, gate, out, lora_tmp);
            }
            ops::add_inplace(hidden, all_reduce(ranks, t * h));
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
        let (cfg, h, vocab) = (&self.cfg, self.cfg.hidden_size, self.cfg.vocab_size);
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
        if let [whole] = &lm_head[..] {
            linear_weight(normed, whole, None, num_rows, h, vocab, &mut ws.logits);
            return;
        }
        // Vocabulary-parallel: each rank's logits, gathered into their columns.
        for (r, (w, rw)) in lm_head.iter().zip(&mut ws.ranks).enumerate() {
            let cols = self.sharding.vocab_rows(r);
            let part = &mut rw.logits[..num_rows * cols.len()];
            linear_weight(normed, w, None, num_rows, h, cols.len(), part);
            for (row, src) in ws
                .logits
                .chunks_exact_mut(vocab)
                .zip(part.chunks_exact(cols.len()))
            {
                row[cols.clone()].copy_from_slice(src);
            }
        }
    }
}

/// The all-reduce of the ranks' partial outputs `out[..n]`: their sum, left in rank 0's.
fn all_reduce(ranks: &mut [RankWorkspace], n: usize) -> &[f32] {
    let (first, rest) = ranks.split_first_mut().expect("at least one rank");
    for r in rest {
        ops::add_inplace(&mut first.out[..n], &r.out[..n]);
    }
    &first.out[..n]
}
