//! Tensor parallelism, Megatron-style: how a model and its adapters split over `size` ranks.
//! Device-independent arithmetic: which rows or columns of each weight a rank holds, and how
//! a LoRA module splits with its layer. The CPU backend runs the ranks in one process (the
//! oracle for the split); a multi-GPU backend would give each rank a GPU.
//!
//! ```text
//! column-parallel  q, k, v, gate, up   rank r holds output rows R_r     y_r = x · W[R_r]ᵀ
//! row-parallel     o, down             rank r holds input columns C_r   y = Σ_r x[C_r] · W[:, C_r]ᵀ
//! vocab-parallel   embed, lm_head      rank r holds vocabulary rows V_r (logits gathered)
//! ```
//!
//! Attention heads split with q: rank r runs query heads `r·h/size ..`, and the KV heads they
//! read. With fewer KV heads than ranks each KV head is replicated on `size / num_kv_heads`
//! ranks. One all-reduce (a sum) follows o and one follows down in every layer; a row-parallel
//! bias is held by rank 0 alone, so the sum adds it once.
//!
//! LoRA splits as vLLM's default (not fully sharded) layers do: column-parallel, A whole and B's
//! rows as the layer's; row-parallel, A's columns as the layer's and B whole. A row-parallel
//! rank's `(x[C_r] · A[:, C_r]ᵀ) · Bᵀ` is its share of the adapter's output, so the adapter
//! rides the layer's own all-reduce (expand is linear) and adds no collective.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::lora::adapter::LoraModule;
use crate::lora::LoraTarget;
use crate::ModelConfig;

/// How a projection is split over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallel {
    /// Output features split: each rank computes a slice of the output.
    Column,
    /// Input features split: each rank computes a partial sum of the whole output.
    Row,
}

impl Parallel {
    pub fn of(target: LoraTarget) -> Self {
        match target {
            LoraTarget::OProj | LoraTarget::DownProj => Parallel::Row,
            _ => Parallel::Column,
        }
    }
}

/// A model's split over `size` ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharding {
    pub size: usize,
    head_dim: usize,
    /// Query heads per rank.
    heads: usize,
    /// KV heads of the whole model.
    num_kv_heads: usize,
    /// KV heads per rank (1 when they are replicated).
    kv_heads: usize,
    /// Intermediate features per rank.
    intermediate: usize,
    vocab_size: usize,
    /// Vocabulary rows per rank; the last rank may hold fewer.
    vocab_per_rank: usize,
}

impl Sharding {
    /// Checks that `cfg` splits over `size` ranks; errors name the field that does not divide.
    pub fn new(cfg: &ModelConfig, size: usize) -> Result<Self> {
        let refuse = |what: String| {
            Err(Error::InvalidConfig(format!(
                "tensor_parallel_size {size}: {what}"
            )))
        };
        if size == 0 {
            return refuse("must be at least 1".into());
        }
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if !nh.is_multiple_of(size) {
            return refuse(format!("num_attention_heads ({nh}) must be divisible by it"));
        }
        if !(nkv.is_multiple_of(size) || size.is_multiple_of(nkv)) {
            return refuse(format!(
                "num_key_value_heads ({nkv}) must be divisible by it, or divide it (then each KV head is replicated)"
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(size) {
            return refuse(format!(
                "intermediate_size ({}) must be divisible by it",
                cfg.intermediate_size
            ));
        }
        if cfg.vocab_size < size {
            return refuse(format!("vocab_size ({}) must be at least it", cfg.vocab_size));
        }
        Ok(Sharding {
            size,
            head_dim: cfg.head_dim,
            heads: nh / size,
            num_kv_heads: nkv,
            kv_heads: (nkv / size).max(1),
            intermediate: cfg.intermediate_size / size,
            vocab_size: cfg.vocab_size,
            vocab_per_rank: cfg.vocab_size.div_ceil(size),
        })
    }

    /// No split: one rank holds everything.
    pub fn single(cfg: &ModelConfig) -> Self {
        Self::new(cfg, 1).expect("any model runs on one rank")
    }

    /// The shapes one rank runs: its heads, KV heads and intermediate features (the
    /// vocabulary is split separately, see [`Self::vocab_rows`]).
    pub fn rank_config(&self, cfg: &ModelConfig) -> ModelConfig {
        ModelConfig {
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            intermediate_size: self.intermediate,
            ..cfg.clone()
        }
    }

    /// How many ranks hold each KV head (1 unless KV heads are fewer than ranks).
    pub fn kv_replicas(&self) -> usize {
        self.size / self.num_kv_heads.min(self.size)
    }

    /// The features of `target` rank `rank` holds: output rows of a column-parallel
    /// projection, input columns of a row-parallel one.
    pub fn features(&self, target: LoraTarget, rank: usize) -> Range<usize> {
        assert!(rank < self.size, "rank {rank} of {}", self.size);
        let hd = self.head_dim;
        match target {
            LoraTarget::QProj | LoraTarget::OProj => span(rank, self.heads * hd),
            LoraTarget::KProj | LoraTarget::VProj => {
                // Replicated (one head a rank, k replicas): ranks k·j .. k·(j+1) hold head j.
                let first = rank * self.kv_heads / self.kv_replicas();
                first * hd..(first + self.kv_heads) * hd
            }
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => span(rank, self.intermediate),
        }
    }

    /// The vocabulary rows (of the embedding and lm_head) rank `rank` holds.
    pub fn vocab_rows(&self, rank: usize) -> Range<usize> {
        assert!(rank < self.size, "rank {rank} of {}", self.size);
        let start = (rank * self.vocab_per_rank).min(self.vocab_size);
        start..((rank + 1) * self.vocab_per_rank).min(self.vocab_size)
    }

    /// The rank holding `token`'s vocabulary row, and the row's index there.
    pub fn vocab_owner(&self, token: usize) -> (usize, usize) {
        (token / self.vocab_per_rank, token % self.vocab_per_rank)
    }

    /// Rank `rank`'s part of a LoRA module of `target`, as its layer is split (see the module
    /// doc). `in_features` is the whole layer's.
    pub fn lora_module(
        &self,
        m: &LoraModule,
        target: LoraTarget,
        in_features: usize,
        rank: usize,
    ) -> LoraModule {
        let f = self.features(target, rank);
        let (a, b) = match Parallel::of(target) {
            // b is [out, rank]: the rank's output rows are contiguous.
            Parallel::Column => (m.a.clone(), m.b[f.start * m.rank..f.end * m.rank].to_vec()),
            // a is [rank, in]: the rank's columns of every row.
            Parallel::Row => (
                m.a.chunks_exact(in_features)
                    .flat_map(|row| &row[f.clone()])
                    .copied()
                    .collect(),
                m.b.clone(),
            ),
        };
        LoraModule {
            rank: m.rank,
            scale: m.scale,
            a,
            b,
        }
    }
}

/// Rank `rank`'s `per_rank` consecutive features.
fn span(rank: usize, per_rank: usize) -> Range<usize> {
    rank * per_rank..(rank + 1) * per_rank
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(nh: usize, nkv: usize, inter: usize, vocab: usize) -> ModelConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": nh * 8,
            "intermediate_size": inter,
            "num_hidden_layers": 1,
            "num_attention_heads": nh,
            "num_key_value_heads": nkv,
            "vocab_size": vocab,
            "max_position_embeddings": 64,
        });
        ModelConfig::from_json(&json.to_string(), std::path::Path::new("config.json")).expect("config")
    }

    #[test]
    fn column_and_row_features_tile_the_layer() {
        for (nh, nkv, size) in [(8, 8, 2), (8, 2, 2), (32, 8, 4), (8, 2, 4), (8, 1, 8), (4, 2, 4)] {
            let c = cfg(nh, nkv, 48, 100);
            let s = Sharding::new(&c, size).expect("divides");
            let rc = s.rank_config(&c);
            for t in [
                LoraTarget::QProj,
                LoraTarget::GateProj,
                LoraTarget::DownProj,
                LoraTarget::OProj,
            ] {
                let ranges: Vec<_> = (0..size).map(|r| s.features(t, r)).collect();
                let whole = match t {
                    LoraTarget::QProj | LoraTarget::OProj => c.q_size(),
                    _ => c.intermediate_size,
                };
                assert_eq!(ranges[0].start, 0, "{t:?}");
                assert_eq!(ranges[size - 1].end, whole, "{t:?}");
                assert!(
                    ranges.windows(2).all(|w| w[0].end == w[1].start),
                    "{t:?} {ranges:?}"
                );
            }
            // Every rank's KV heads are those its query heads read (GQA groups).
            let group = nh / nkv;
            for r in 0..size {
                let kv = s.features(LoraTarget::KProj, r);
                assert_eq!(kv.len(), rc.kv_size());
                let q_heads = s.features(LoraTarget::QProj, r);
                for q_head in q_heads.start / 8..q_heads.end / 8 {
                    let kv_head = q_head / group;
                    let local =
                        (q_head - q_heads.start / 8) / (rc.num_attention_heads / rc.num_key_value_heads);
                    assert_eq!(
                        kv.start / 8 + local,
                        kv_head,
                        "nh {nh} nkv {nkv} size {size} rank {r}"
                    );
                }
            }
            assert_eq!(s.kv_replicas(), if nkv >= size { 1 } else { size / nkv });
        }
    }

    #[test]
    fn vocabulary_rows_cover_an_uneven_vocabulary() {
        let s = Sharding::new(&cfg(4, 4, 8, 383), 4).expect("divides");
        let rows: Vec<_> = (0..4).map(|r| s.vocab_rows(r)).collect();
        assert_eq!(rows, [0..96, 96..192, 192..288, 288..383]);
        for token in [0, 95, 96, 300, 382] {
            let (rank, row) = s.vocab_owner(token);
            assert_eq!(rows[rank].start + row, token);
        }
    }

    #[test]
    fn what_does_not_divide_is_named() {
        let err = |c: ModelConfig, size| Sharding::new(&c, size).unwrap_err().to_string();
        assert!(err(cfg(6, 6, 48, 100), 4).contains("num_attention_heads (6)"));
        assert!(err(cfg(12, 3, 48, 100), 2).contains("num_key_value_heads (3)"));
        assert!(err(cfg(8, 8, 50, 100), 4).contains("intermediate_size (50)"));
        assert!(err(cfg(8, 8, 48, 100), 0).contains("at least 1"));
        assert!(err(cfg(8, 8, 48, 3), 4).contains("vocab_size (3)"));
        assert!(Sharding::new(&cfg(8, 8, 48, 100), 4).is_ok());
    }

    /// The split adapter computes the whole one: column ranks' outputs concatenate to it,
    /// row ranks' partial outputs sum to it.
    #[test]
    fn split_lora_modules_add_up_to_the_whole() {
        let c = cfg(8, 2, 48, 100);
        let s = Sharding::new(&c, 4).expect("divides");
        let rank = 3;
        for t in [
            LoraTarget::QProj,
            LoraTarget::KProj,
            LoraTarget::OProj,
            LoraTarget::DownProj,
        ] {
            let (i, o) = t.shape(&c);
            let value = |k: usize| ((k * 7919) % 97) as f32 / 97.0 - 0.5;
            let m = LoraModule {
                rank,
                scale: 0.5,
                a: (0..rank * i).map(value).collect(),
                b: (0..o * rank).map(|k| value(k + 13)).collect(),
            };
            let x: Vec<f32> = (0..i).map(|k| value(k + 29)).collect();
            let apply = |m: &LoraModule, x: &[f32], i: usize| -> Vec<f32> {
                let tmp: Vec<f32> = (0..m.rank)
                    .map(|r| m.scale * (0..i).map(|k| x[k] * m.a[r * i + k]).sum::<f32>())
                    .collect();
                (0..m.b.len() / m.rank)
                    .map(|oi| (0..m.rank).map(|r| tmp[r] * m.b[oi * m.rank + r]).sum())
                    .collect()
            };
            let whole = apply(&m, &x, i);
            let mut got = vec![0.0f32; o];
            for r in 0..4 {
                let f = s.features(t, r);
                let part = s.lora_module(&m, t, i, r);
                match Parallel::of(t) {
                    Parallel::Column => {
                        let y = apply(&part, &x, i);
                        // Replicated KV heads: ranks sharing a head compute the same slice.
                        got[f].copy_from_slice(&y);
                    }
                    Parallel::Row => {
                        let y = apply(&part, &x[f.clone()], f.len());
                        got.iter_mut().zip(&y).for_each(|(g, v)| *g += v);
                    }
                }
            }
            for (g, w) in got.iter().zip(&whole) {
                assert!((g - w).abs() < 1e-5, "{t:?}: {g} vs {w}");
            }
        }
    }
}
