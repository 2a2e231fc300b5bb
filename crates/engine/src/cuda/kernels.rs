//! The kernel modules: CUDA C sources under `kernels/` (`prelude.cuh`, which every module starts
//! with; `core.cu`, everything but the skinny GEMM, SGMV, prefill attention and sampling, which
//! have their own files and Rust modules), embedded with `include_str!` and compiled at run time
//! by NVRTC (no nvcc at build time).
//!
//! Header-free on purpose: NVRTC 13 cannot find `cuda_bf16.h` / `cuda_fp16.h` without include
//! paths, so the 16-bit element type `elem_t` is an `unsigned short` and every kernel reads and
//! writes it through `e2f` / `f2e` (one element), `lo` / `hi` (the two halves of a u32) and
//! `dot8`. Each module is one source built twice: as is, `elem_t` is bf16 (bit shifts, round to
//! nearest even); after `#define ML_F16 1` ([`Elem::source_prefix`]) it is IEEE f16 (PTX `cvt`,
//! round to nearest even), and `MMA_ELEM` names the type for `mma.sync`. Weights, activations
//! fed to GEMMs, LoRA weights and the KV cache are `elem_t`; every accumulation, the residual
//! stream and projection outputs are f32.

use super::elem::Elem;

/// Types and helpers every module starts with.
pub const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// One NVRTC compilation unit: [`PRELUDE`] + `body`, and the kernels loaded from it.
pub struct Module {
    pub name: &'static str,
    pub body: &'static str,
    pub kernels: &'static [&'static str],
}

impl Module {
    /// The source built for element type `elem`.
    pub fn source(&self, elem: Elem) -> String {
        format!("{}{PRELUDE}\n{}", elem.source_prefix(), self.body)
    }
}

/// Every module the backend compiles and loads at start-up.
pub const MODULES: &[Module] = &[
    Module {
        name: "core",
        body: CORE,
        kernels: CORE_NAMES,
    },
    super::skinny::MODULE,
    super::prefill::MODULE,
    Module {
        name: "sampling",
        body: super::sampling::BODY,
        kernels: super::sampling::NAMES,
    },
    Module {
        name: "sgmv",
        body: super::sgmv::SGMV,
        kernels: super::sgmv::SGMV_NAMES,
    },
];

/// Weight fills, embedding, norms, RoPE, attention, activations, BGMV LoRA.
const CORE: &str = include_str!("kernels/core.cu");

/// Kernel names of [`CORE`].
const CORE_NAMES: &[&str] = &[
    "fill_uniform",
    "fill",
    "embed",
    "add_rms_norm",
    "qk_norm",
    "rope_kv_write",
    "rope_kv_write_rows",
    "paged_attention",
    "decode_attention",
    "decode_attention_wide",
    "silu_mul",
    "add_bias",
    "lora_shrink",
    "lora_shrink_wide",
    "lora_expand",
];

/// Token counts above which `lora_shrink_wide` replaces `lora_shrink` (prefill).
pub const SHRINK_WIDE_MIN_TOKENS: usize = 64;
/// Rank rows one `lora_shrink` block computes (`#define SHRINK_ROWS` in the core kernels).
pub const SHRINK_ROWS: usize = 4;
/// Largest head_dim the attention kernel takes (`32 * MAX_DPL`).
pub const MAX_HEAD_DIM: usize = 256;
/// Threads of an attention block (`ATT_WARPS * 32`).
pub const ATT_THREADS: u32 = 256;
/// Threads of a `decode_attention` block (`DA_THREADS`).
pub const DECODE_ATT_THREADS: u32 = 128;
/// Threads of a `decode_attention_wide` block (`DA_WIDE_THREADS`), the kernel for steps with at
/// most one (sequence, head) pair per two SMs. On the H200 (Llama-2-7B shape, 32 heads, context
/// ~144) a decode step took 3.80 ms with it against 3.87 ms at batch 1, the same at batch 2, and
/// lost 0.07 ms at batch 4 and 0.24 ms at batch 8 (one block an SM, in waves).
pub const DECODE_ATT_WIDE_THREADS: u32 = 1024;
/// Most context parts `decode_attention` splits one (sequence, head) into (`DA_MAX_PARTS`).
pub const DECODE_ATT_MAX_PARTS: usize = 64;

/// Asserts that kernel source `body` (of file `what`) holds `#define NAME value` for each pair:
/// the host's copy of a kernel size has not drifted from the kernel's.
#[cfg(test)]
pub(crate) fn assert_defines(what: &str, body: &str, defines: &[(&str, usize)]) {
    for (name, v) in defines {
        let line = format!("#define {name} {v}\n");
        assert!(body.contains(&line), "{what}: the kernels lack `{}`", line.trim());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's copies of kernel sizes match the `#define`s the kernels are built with.
    #[test]
    fn host_constants_match_the_kernel_defines() {
        assert_defines(
            "kernels.rs",
            CORE,
            &[
                ("SHRINK_ROWS", SHRINK_ROWS),
                ("DA_THREADS", DECODE_ATT_THREADS as usize),
                ("DA_WIDE_THREADS", DECODE_ATT_WIDE_THREADS as usize),
                ("DA_MAX_PARTS", DECODE_ATT_MAX_PARTS),
                ("ATT_WARPS", ATT_THREADS as usize / 32),
                ("MAX_DPL", MAX_HEAD_DIM / 32),
            ],
        );
        let skinny = &super::super::skinny::MODULE;
        let sk_warps = super::super::skinny::SKINNY_THREADS as usize / 32;
        let wide_warps = super::super::skinny::ADD_WIDE_THREADS as usize / 32;
        assert_defines(
            "skinny.rs",
            skinny.body,
            &[("SK_WARPS", sk_warps), ("SK_WIDE_WARPS", wide_warps)],
        );
    }
}
