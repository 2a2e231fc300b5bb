//! Every kernel's signature, declared once, with a typed launcher for each: argument count and
//! types at a call site are the compiler's to check, not a comment's. The declarations are
//! checked against the compiled kernels: when a module loads, [`check_module`] reads each
//! kernel's parameters from its PTX and refuses to run if they differ from the declaration here
//! (and the `kernels_compile` test does the same wherever NVRTC is installed).
//!
//! A launcher is `unsafe`: the types are checked, the pointers are not. Its caller promises that
//! every pointer is a live device buffer of the shape the kernel reads or writes (the `.cu` file
//! says which) for the grid it launches.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::LaunchConfig;

use super::gpu::{Gpu, KernelArg};
use crate::error::{Error, Result};

/// A device pointer argument (`T*` in the kernel).
pub type Ptr = CUdeviceptr;

/// One declared signature: the kernels that share it and their parameters' PTX types.
#[derive(Debug)]
pub struct Signature {
    pub kernels: &'static [&'static str],
    pub params: &'static [&'static str],
}

macro_rules! ptx_type {
    (Ptr) => {
        "u64"
    };
    (u64) => {
        "u64"
    };
    (i32) => {
        "u32"
    };
    (f32) => {
        "f32"
    };
}

/// Kernels with one name: `fn name(params);` makes `name(gpu, cfg, params..)`.
macro_rules! kernels {
    ($(
        $(#[$doc:meta])*
        fn $f:ident($($a:ident: $t:tt),* $(,)?);
    )*) => {
        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// Every pointer is a live device buffer of the shape the kernel reads or writes for
            /// this grid (see the module doc).
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $f(gpu: &Gpu, cfg: LaunchConfig, $($a: $t),*) -> Result<()> {
                // SAFETY: the parameters are the kernel's (checked against its PTX at load);
                // the caller vouches for the pointers.
                unsafe { gpu.launch(stringify!($f), cfg, &[$(KernelArg::bits($a)),*]) }
            }
        )*
        const SINGLES: &[Signature] = &[$(Signature {
            kernels: &[stringify!($f)],
            params: &[$(ptx_type!($t)),*],
        }),*];
    };
}

/// Families of kernels sharing a signature (template instances): `fn family["a", "b"](params);`
/// makes `family(gpu, kernel, cfg, params..)`, where `kernel` must be one of the names.
macro_rules! families {
    ($(
        $(#[$doc:meta])*
        fn $f:ident[$($k:literal),+ $(,)?]($($a:ident: $t:tt),* $(,)?);
    )*) => {
        $(
            $(#[$doc])*
            ///
            /// # Safety
            /// As for every launcher (module doc); `kernel` is one of the family's names.
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $f(gpu: &Gpu, kernel: &'static str, cfg: LaunchConfig, $($a: $t),*) -> Result<()> {
                if ![$($k),+].contains(&kernel) {
                    return Err(Error::Backend(format!(
                        "internal: {kernel} is not one of the {} kernels",
                        stringify!($f)
                    )));
                }
                // SAFETY: as for the single kernels; `kernel` shares this signature (above).
                unsafe { gpu.launch(kernel, cfg, &[$(KernelArg::bits($a)),*]) }
            }
        )*
        const FAMILIES: &[Signature] = &[$(Signature {
            kernels: &[$($k),+],
            params: &[$(ptx_type!($t)),*],
        }),*];
    };
}

kernels! {
    /// `out[0..n] = seeded uniform in [-bound, bound)` (dummy weights).
    fn fill_uniform(out: Ptr, n: u64, seed: u64, bound: f32);
    /// `out[0..n] = v`.
    fn fill(out: Ptr, n: u64, v: f32);
    /// Embedding rows into the residual stream, and the first layer's input norm.
    fn embed(hidden: Ptr, table: Ptr, ids: Ptr, h: i32, w: Ptr, out: Ptr, eps: f32, zero: Ptr, nzero: i32);
    /// RMSNorm of residual rows into `out`, with an optional fused BGMV expand.
    fn add_rms_norm(
        hidden: Ptr, rows: Ptr, w: Ptr, out: Ptr, h: i32, eps: f32,
        lora_tmp: Ptr, b: Ptr, ranks: Ptr, tok_slot: Ptr, r: i32,
    );
    /// Qwen3's per-head RMSNorm of q and k.
    fn qk_norm(qkv: Ptr, ld: i32, nh: i32, hd: i32, qw: Ptr, kw: Ptr, eps: f32);
    /// RoPE and the K/V cache write, a block a (token, head), with an optional fused expand.
    fn rope_kv_write(
        qkv: Ptr, ld: i32, nh: i32, nkv: i32, hd: i32, cos: Ptr, sin: Ptr, positions: Ptr,
        slot_mapping: Ptr, k_cache: Ptr, v_cache: Ptr, lora_tmp: Ptr, b: Ptr, ranks: Ptr,
        tok_slot: Ptr, t: i32, r: i32, l: i32,
    );
    /// RoPE and the K/V cache write, a block a token (prefill).
    fn rope_kv_write_rows(
        qkv: Ptr, ld: i32, nh: i32, nkv: i32, hd: i32, cos: Ptr, sin: Ptr, positions: Ptr,
        slot_mapping: Ptr, k_cache: Ptr, v_cache: Ptr,
    );
    /// Attention a (token, head) at a time, in f32: head sizes the others do not take.
    fn paged_attention(
        qkv: Ptr, ld: i32, out: Ptr, k_cache: Ptr, v_cache: Ptr, token_seq: Ptr, positions: Ptr,
        block_tables: Ptr, max_blocks: i32, block_size: i32, nh: i32, nkv: i32, hd: i32, scale: f32,
    );
    /// `out = silu(gate) · up` over f32 gate/up rows.
    fn silu_mul(gu: Ptr, out: Ptr, inter: i32, t: i32);
    /// `y[t, :n] += bias` (cuBLAS outputs).
    fn add_bias(y: Ptr, bias: Ptr, n: i32, t: i32, ldy: i32);
    /// BGMV expand: `y[t] += tmp[t] · B[slot(t)]ᵀ`.
    fn lora_expand(
        tmp: Ptr, b: Ptr, ranks: Ptr, tok_slot: Ptr, y: Ptr, t: i32, n: i32, r: i32, l: i32,
        ldy: i32, n1: i32, n2: i32,
    );
    /// Combines split prefill-attention tiles' pieces.
    fn prefill_attention_merge(part: Ptr, merges: Ptr, out: Ptr, nh: i32, nkv: i32, hd: i32, rows: i32, hd_pad: i32);
    /// Samples a token a row.
    fn sample_rows(logits: Ptr, v: i32, rows: Ptr, banned: Ptr, ids: Ptr);
    /// SGMV shrink over a step's segments.
    fn sgmv_shrink(
        x: Ptr, a: Ptr, ranks: Ptr, scales: Ptr, segs: Ptr, num_segs: Ptr, tmp: Ptr, nsub: i32,
        t: i32, k: i32, r: i32, l: i32,
    );
    /// SGMV expand over a step's segments.
    fn sgmv_expand(
        tmp: Ptr, b: Ptr, ranks: Ptr, segs: Ptr, num_segs: Ptr, y: Ptr, t: i32, n: i32, r: i32,
        l: i32, ldy: i32, n1: i32, n2: i32,
    );
    /// Streams `n16` 16-byte vectors (the read-bandwidth ceiling, `gpu_bench --micro`).
    fn read_stream(p: Ptr, n16: u64, sink: Ptr);
}

families! {
    /// Decode attention over split context, 128 or 1024 threads a block.
    fn decode_attention["decode_attention", "decode_attention_wide"](
        qkv: Ptr, ld: i32, out: Ptr, k_cache: Ptr, v_cache: Ptr, positions: Ptr, block_tables: Ptr,
        max_blocks: i32, block_size: i32, nh: i32, nkv: i32, hd: i32, scale: f32, part: Ptr,
        counters: Ptr,
    );
    /// BGMV shrink, a block a token (`lora_shrink`) or a warp a rank row (`_wide`).
    fn lora_shrink["lora_shrink", "lora_shrink_wide"](
        x: Ptr, a: Ptr, ranks: Ptr, scales: Ptr, tok_slot: Ptr, tmp: Ptr, t: i32, k: i32, r: i32, l: i32,
    );
    /// Tensor-core prefill attention (one instance per head size and tiling, prefill.rs).
    fn prefill_attention["prefill_attention_64_w4_m1_n64", "prefill_attention_128_w4_m2_n64"](
        qkv: Ptr, ld: i32, out: Ptr, k_cache: Ptr, v_cache: Ptr, tiles: Ptr, token_seq: Ptr,
        positions: Ptr, block_tables: Ptr, max_blocks: i32, block_size: i32, nh: i32, nkv: i32,
        hd: i32, scale_log2: f32, part: Ptr,
    );
    /// The skinny GEMM and its epilogues (skinny.rs), then a split norm's `NormArgs`.
    fn skinny[
        "skinny_store_8", "skinny_store_16", "skinny_store_32",
        "skinny_add_8", "skinny_add_16", "skinny_add_32",
        "skinny_silu_8", "skinny_silu_16", "skinny_silu_32",
        "skinny_add_8_w16",
        "skinny_var_u2_b4_nopl", "skinny_var_u2_b4_nopf", "skinny_var_u4_b2",
    ](
        x: Ptr, w: Ptr, bias: Ptr, y: Ptr, m: i32, n: i32, k: i32, ldy: i32,
        in_ss: Ptr, eps: f32, gamma: Ptr, out: Ptr, out_ss: Ptr,
    );
    /// The skinny q/k/v GEMM with RoPE and the K/V cache write as its epilogue.
    fn skinny_rope["skinny_rope_8", "skinny_rope_16", "skinny_rope_32"](
        x: Ptr, w: Ptr, bias: Ptr, y: Ptr, m: i32, n: i32, k: i32, ldy: i32,
        in_ss: Ptr, eps: f32, gamma: Ptr, out: Ptr, out_ss: Ptr,
        cos: Ptr, sin: Ptr, positions: Ptr, slot_mapping: Ptr, k_cache: Ptr, v_cache: Ptr,
        nh: i32, nkv: i32, hd: i32,
    );
}

/// Every declared signature.
pub fn signatures() -> impl Iterator<Item = &'static Signature> {
    SINGLES.iter().chain(FAMILIES)
}

/// The declared parameter types of `kernel`, if it is declared.
pub fn declared(kernel: &str) -> Option<&'static [&'static str]> {
    signatures()
        .find(|s| s.kernels.contains(&kernel))
        .map(|s| s.params)
}

/// The parameter types of entry `kernel` in `ptx` (`.param .u64 kernel_param_0, ...`), if
/// the PTX has it.
pub fn ptx_params<'a>(ptx: &'a str, kernel: &str) -> Option<Vec<&'a str>> {
    let head = format!(".entry {kernel}(");
    let start = ptx.find(&head)? + head.len();
    let list = &ptx[start..start + ptx[start..].find(')')?];
    Some(
        list.split(',')
            .filter_map(|p| p.trim().strip_prefix(".param ."))
            .map(|p| p.split_whitespace().next().unwrap_or(""))
            .collect(),
    )
}

/// Refuses a compiled module whose kernels differ from their declarations here.
pub fn check_module(module: &str, ptx: &str, kernels: &[&'static str]) -> Result<()> {
    for &k in kernels {
        let want = declared(k).ok_or_else(|| {
            Error::Backend(format!(
                "internal: kernel {k} (module {module}) has no declared signature in cuda/launch.rs"
            ))
        })?;
        let got = ptx_params(ptx, k).ok_or_else(|| {
            Error::Backend(format!(
                "internal: kernel {k} is not in module {module}'s compiled code"
            ))
        })?;
        if got != want {
            return Err(Error::Backend(format!(
                "internal: kernel {k} (module {module}) takes ({}) but cuda/launch.rs declares ({})",
                got.join(", "),
                want.join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::kernels::MODULES;
    use crate::cuda::skinny::TUNING;

    #[test]
    fn every_loaded_kernel_is_declared_once() {
        for m in MODULES.iter().chain([&TUNING]) {
            for k in m.kernels {
                let n = signatures().filter(|s| s.kernels.contains(k)).count();
                assert_eq!(n, 1, "kernel {k} of module {} declared {n} times", m.name);
            }
        }
        // And nothing is declared that no module builds.
        for s in signatures() {
            for k in s.kernels {
                let built = MODULES.iter().chain([&TUNING]).any(|m| m.kernels.contains(k));
                assert!(built, "{k} is declared but no module loads it");
            }
        }
    }

    #[test]
    fn ptx_parameters_are_read_and_compared() {
        let ptx = "// x\n.visible .entry fill(\n\t.param .u64 fill_param_0,\n\t.param .u64 fill_param_1,\n\t\
                   .param .f32 fill_param_2\n)\n{\n}\n.visible .entry add_bias(\n\t.param .u64 a,\n\t.param .u64 b,\n\t\
                   .param .u32 c,\n\t.param .u32 d\n)\n";
        assert_eq!(ptx_params(ptx, "fill"), Some(vec!["u64", "u64", "f32"]));
        assert_eq!(ptx_params(ptx, "silu_mul"), None);
        assert!(check_module("core", ptx, &["fill"]).is_ok());
        // add_bias takes five parameters; this PTX has four: refused, naming both lists.
        let err = check_module("core", ptx, &["add_bias"]).unwrap_err().to_string();
        assert!(
            err.contains("add_bias") && err.contains("u64, u64, u32, u32)"),
            "{err}"
        );
        assert!(
            check_module("core", ptx, &["silu_mul"]).is_err(),
            "a kernel missing from the PTX"
        );
        assert!(
            check_module("core", ptx, &["no_such_kernel"]).is_err(),
            "an undeclared kernel"
        );
    }
}
