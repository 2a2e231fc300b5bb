//! The adapter slots of one projection group on the device: every slot's A and B stacked, as
//! the BGMV/SGMV kernels index them, filled with asynchronous copies of an adapter's device
//! form ([`super::upload`]) when the LoRA manager activates it.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::CudaStream;

use super::gpu::{cuda_err, DevBuf, Gpu};
use super::sgmv::GroupWeights;
use super::upload::DeviceAdapter;
use crate::error::{Error, Result};
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
    /// Host mirrors of `ranks` and `scales`: only changed entries are copied.
    host_ranks: Vec<i32>,
    host_scales: Vec<f32>,
    /// Entries of `host_ranks` that are not 0.
    num_active: usize,
}

impl LoraGroup {
    pub fn n(&self) -> usize {
        self.outs.iter().sum()
    }

    pub fn is_active(&self) -> bool {
        self.num_active > 0
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
        // Out of memory here is a setting that asks too much: say which.
        let alloc = |bytes: usize| {
            gpu.alloc(bytes).map_err(|e| {
                let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
                Error::Backend(format!(
                    "LoRA slots of {} ({max_loras} slots of device rank {r}, in every layer): {e}; lower max_loras or max_lora_rank",
                    names.join("/")
                ))
            })
        };
        Ok(LoraGroup {
            a: alloc(nsub * max_loras * r * k * 2)?,
            b: alloc(max_loras * n * r * 2)?,
            ranks: alloc(nsub * max_loras * 4)?,
            scales: alloc(nsub * max_loras * 4)?,
            host_ranks: vec![0; nsub * max_loras],
            host_scales: vec![0.0; nsub * max_loras],
            num_active: 0,
            targets,
            outs,
            k,
        })
    }

    /// Queues the copies that fill `slot` of this group (layer `layer`, group `g`) with
    /// `adapter`, or clear it, on `stream`, from the adapter's host data (which the caller keeps
    /// alive until they are done). Only targeted projections' weights are copied: an untargeted
    /// one gets rank 0, and the kernels read nothing else of a rank-0 slot.
    #[allow(clippy::too_many_arguments)]
    pub fn upload(
        &mut self,
        stream: &CudaStream,
        layer: usize,
        g: usize,
        slot: LoraSlot,
        adapter: Option<&DeviceAdapter>,
        max_loras: usize,
        r: usize,
    ) -> Result<()> {
        let s = slot.index();
        let (k, n) = (self.k, self.n());
        let host = adapter.map(|a| a.host()).transpose()?;
        let mut row0 = 0;
        for z in 0..self.targets.len() {
            let i = z * max_loras + s;
            let part = adapter.map(|a| *a.part(layer, g, z));
            let (rank, scale) = part.map_or((0, 0.0), |p| (p.rank, p.scale));
            if let (Some((a_at, b_at)), Some(host)) = (part.and_then(|p| p.data), host) {
                let out = self.outs[z];
                copy(stream, self.a.at::<u16>(i * r * k), &host[a_at..][..r * k])?;
                copy(
                    stream,
                    self.b.at::<u16>((s * n + row0) * r),
                    &host[b_at..][..out * r],
                )?;
            }
            // The scale is read only where the rank is not 0. The mirrors change only once the
            // device's value is queued, so a failed set is retried by the next upload.
            if rank != 0 && self.host_scales[i] != scale {
                set_word(stream, self.scales.at::<f32>(i), scale.to_bits())?;
                self.host_scales[i] = scale;
            }
            if self.host_ranks[i] != rank {
                set_word(stream, self.ranks.at::<i32>(i), rank as u32)?;
                self.num_active =
                    self.num_active + usize::from(rank != 0) - usize::from(self.host_ranks[i] != 0);
                self.host_ranks[i] = rank;
            }
            row0 += self.outs[z];
        }
        Ok(())
    }
}

/// An asynchronous copy to the device on `stream`, from pinned adapter data.
fn copy<T>(stream: &CudaStream, dst: CUdeviceptr, src: &[T]) -> Result<()> {
    // SAFETY: callers pass a destination inside a live slot buffer with room for `src`, and a
    // source that outlives the copy (pinned adapter data held by `SlotUploads`).
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, stream.cu_stream()) }
        .map_err(|e| cuda_err("adapter copy to device", e))
}

/// Sets one 32-bit word (a slot's rank or scale) on the device, ordered on `stream`. A memset
/// carries its value in the call: no host buffer to keep alive, and none of the stream
/// synchronization a copy from pageable memory would cost.
fn set_word(stream: &CudaStream, dst: CUdeviceptr, bits: u32) -> Result<()> {
    // SAFETY: callers pass a 4-byte-aligned word inside a live slot buffer.
    unsafe { cudarc::driver::sys::cuMemsetD32Async(dst, bits, 1, stream.cu_stream()) }
        .result()
        .map_err(|e| cuda_err("adapter rank or scale on the device", e))
}
