//! The adapter slots of one projection group on the device: every slot's A and B stacked, as
//! the BGMV/SGMV kernels index them, filled from the host cache when the LoRA manager activates
//! an adapter.

use super::gpu::{DevBuf, Gpu};
use super::sgmv::GroupWeights;
use crate::error::Result;
use crate::lora::adapter::LoraAdapter;
use crate::lora::{LoraSlot, LoraTarget};
use crate::ModelConfig;

/// The stacked adapter weights of one projection group (projections that share their input:
/// q/k/v, o, gate/up, down) for all `max_loras` slots.
pub(super) struct LoraGroup {
    pub targets: Vec<LoraTarget>,
    /// out features of each target, concatenated in `b`
    pub outs: Vec<usize>,
    pub k: usize,
    /// `[nsub, max_loras, R, K]` in the device's element type
    pub a: DevBuf,
    /// `[max_loras, N, R]` in the device's element type
    pub b: DevBuf,
    /// `[nsub, max_loras]` i32
    pub ranks: DevBuf,
    /// `[nsub, max_loras]` f32
    pub scales: DevBuf,
    host_ranks: Vec<i32>,
    host_scales: Vec<f32>,
}

impl LoraGroup {
    pub fn n(&self) -> usize {
        self.outs.iter().sum()
    }

    pub fn is_active(&self) -> bool {
        self.host_ranks.iter().any(|&r| r > 0)
    }

    /// The group as the SGMV/BGMV launchers take it (device rank `r`, `max_loras` slots).
    pub fn weights(&self, r: usize, max_loras: usize) -> GroupWeights {
        let n = self.n();
        // Where sub 1 and sub 2 start along N (`n` where absent).
        let start = |z: usize| self.outs[..z.min(self.outs.len())].iter().sum::<usize>();
        GroupWeights {
            a: self.a.ptr,
            b: self.b.ptr,
            ranks: self.ranks.ptr,
            scales: self.scales.ptr,
            nsub: self.outs.len(),
            k: self.k,
            n,
            n1: start(1),
            n2: start(2),
            r,
            max_loras,
        }
    }

    pub fn new(
        gpu: &Gpu,
        cfg: &ModelConfig,
        targets: Vec<LoraTarget>,
        max_loras: usize,
        r: usize,
    ) -> Result<Self> {
        let k = targets[0].shape(cfg).0;
        let outs: Vec<usize> = targets.iter().map(|t| t.shape(cfg).1).collect();
        let n: usize = outs.iter().sum();
        let nsub = targets.len();
        Ok(LoraGroup {
            a: gpu.alloc(nsub * max_loras * r * k * 2)?,
            b: gpu.alloc(max_loras * n * r * 2)?,
            ranks: gpu.alloc(nsub * max_loras * 4)?,
            scales: gpu.alloc(nsub * max_loras * 4)?,
            host_ranks: vec![0; nsub * max_loras],
            host_scales: vec![0.0; nsub * max_loras],
            targets,
            outs,
            k,
        })
    }

    pub fn set(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        slot: LoraSlot,
        adapter: Option<&LoraAdapter>,
        max_loras: usize,
        r: usize,
    ) -> Result<()> {
        let s = slot.index();
        let (k, n) = (self.k, self.n());
        let mut b = vec![0u16; n * r]; // [N, R] of this slot
        let mut a = vec![0u16; r * k]; // [R, K] of one target
        let mut row0 = 0;
        for (z, &t) in self.targets.iter().enumerate() {
            let module = adapter.and_then(|ad| ad.module(layer, t));
            a.fill(0);
            let (rank, scale) = match module {
                Some(m) => {
                    assert!(m.rank <= r, "adapter rank checked against max_lora_rank at load");
                    for (dst, &src) in a.iter_mut().zip(&m.a) {
                        *dst = gpu.elem.encode(src);
                    }
                    for (o, src) in m.b.chunks_exact(m.rank).enumerate() {
                        for (j, &v) in src.iter().enumerate() {
                            b[(row0 + o) * r + j] = gpu.elem.encode(v);
                        }
                    }
                    (m.rank as i32, m.scale)
                }
                None => (0, 0.0),
            };
            gpu.htod(self.a.at::<u16>((z * max_loras + s) * r * k), &a)?;
            self.host_ranks[z * max_loras + s] = rank;
            self.host_scales[z * max_loras + s] = scale;
            row0 += self.outs[z];
        }
        gpu.htod(self.b.at::<u16>(s * n * r), &b)?;
        gpu.htod(self.ranks.ptr, &self.host_ranks)?;
        gpu.htod(self.scales.ptr, &self.host_scales)?;
        // The host vectors above are pageable; wait so they may be reused or dropped.
        gpu.sync()
    }
}
