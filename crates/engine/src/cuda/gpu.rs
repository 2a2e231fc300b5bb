//! The device: context, one non-default stream (capturable), the NVRTC-compiled kernels built
//! for one element type ([`Elem`]; PTX cached on disk by source hash and arch), cuBLAS, and raw
//! device buffers.
//!
//! Buffers are plain allocations addressed by raw device pointers: every buffer the model uses
//! lives as long as the backend, so pointers baked into a captured CUDA graph stay valid, and
//! cudarc's event tracking (host cost, and not capturable) is switched off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::sys::{self, CUdeviceptr, CUevent_flags};
use cudarc::driver::{
    result as drv, CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::elem::Elem;
use super::kernels;
use super::CudaOptions;
use crate::error::{Error, Result};

/// Turns any CUDA-side error into the engine's error type.
pub fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("{what}: {e:?}"))
}

/// Checks that the driver, NVRTC and cuBLAS can be loaded, without letting cudarc panic.
pub fn probe() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err(Error::Backend(
            "no CUDA driver found (libcuda.so); use device=cpu".into(),
        ));
    }
    let missing: Vec<&str> = [(nvrtc, "libnvrtc"), (cublas, "libcublas")]
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Error::Backend(format!(
            "CUDA driver found but not {}: put the CUDA 13 libraries on LD_LIBRARY_PATH (e.g. /usr/local/cuda-13.0/targets/x86_64-linux/lib), or use device=cpu",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// A device allocation that lives as long as its owner; `ptr` is stable.
pub struct DevBuf {
    _mem: CudaSlice<u8>,
    pub ptr: CUdeviceptr,
    pub bytes: usize,
}

impl DevBuf {
    /// Pointer to element `i` of a buffer of `T`s.
    pub fn at<T>(&self, i: usize) -> CUdeviceptr {
        debug_assert!((i * std::mem::size_of::<T>()) <= self.bytes);
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    /// NVRTC target, e.g. `compute_90a`
    arch: String,
    pub name: String,
    pub num_sms: u32,
    /// Launch kernels with programmatic dependent launch (sm_90+): see [`Gpu::launch`].
    pub pdl: bool,
    /// What weights, GEMM inputs, LoRA weights and the KV cache are stored as; the kernels are
    /// built for it.
    pub elem: Elem,
    /// Where compiled kernels are cached ([`CudaOptions::kernel_cache_dir`]).
    cache_dir: PathBuf,
    _blas_workspace: Option<DevBuf>,
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The kernel cache: `dir`, or `~/.cache/multilora`.
fn cache_dir(dir: Option<&Path>) -> PathBuf {
    if let Some(d) = dir {
        return d.to_path_buf();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/multilora")
}

impl Gpu {
    /// Device `ordinal` with the default options.
    pub fn new(ordinal: usize, elem: Elem) -> Result<Self> {
        Self::with_options(ordinal, elem, &CudaOptions::default())
    }

    pub fn with_options(ordinal: usize, elem: Elem, opts: &CudaOptions) -> Result<Self> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("creating the CUDA context", e))?;
        // SAFETY: no buffers exist yet; we manage ordering ourselves with one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| cuda_err("creating a stream", e))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("reading the compute capability", e))?;
        let num_sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("reading the SM count", e))? as u32;
        // Hopper's arch-specific target where it exists.
        let arch = if (major, minor) == (9, 0) {
            "compute_90a".to_string()
        } else {
            format!("compute_{major}{minor}")
        };
        let blas = CudaBlas::new(stream.clone()).map_err(|e| cuda_err("creating the cuBLAS handle", e))?;
        let mut gpu = Gpu {
            ctx,
            stream,
            blas,
            funcs: HashMap::new(),
            arch,
            name,
            num_sms,
            pdl: major >= 9 && opts.pdl,
            elem,
            cache_dir: PathBuf::new(),
            _blas_workspace: None,
        };
        gpu.cache_dir = cache_dir(opts.kernel_cache_dir.as_deref());
        for m in kernels::MODULES {
            gpu.load(m)?;
        }
        super::prefill::prepare(&gpu)?;
        // A fixed cuBLAS workspace, so cuBLAS allocates nothing while a graph is captured.
        let ws = gpu.alloc(32 << 20)?;
        // SAFETY: the handle is live and the workspace outlives it (both owned by `gpu`).
        let st = unsafe {
            cublas_sys::cublasSetWorkspace_v2(*gpu.blas.handle(), ws.ptr as *mut std::ffi::c_void, ws.bytes)
        };
        if st != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(cuda_err("cublasSetWorkspace", st));
        }
        gpu._blas_workspace = Some(ws);
        Ok(gpu)
    }

    /// Compiles (or reads from the PTX cache) and loads a module; its kernels join `func`'s.
    pub fn load(&mut self, m: &kernels::Module) -> Result<()> {
        let ptx = compile_cached(&m.source(self.elem), &self.arch, &self.cache_dir)?;
        super::launch::check_module(m.name, &ptx.to_src(), m.kernels)?;
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(|e| cuda_err(&format!("loading the {} kernels", m.name), e))?;
        for &n in m.kernels {
            let f = module
                .load_function(n)
                .map_err(|e| cuda_err(&format!("loading kernel {n}"), e))?;
            self.funcs.insert(n, f);
        }
        Ok(())
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let mem = self
            .stream
            .alloc_zeros::<u8>(bytes.max(16))
            .map_err(|e| cuda_err(&format!("allocating {bytes} bytes on the device"), e))?;
        let ptr = mem.device_ptr(&self.stream).0;
        Ok(DevBuf {
            ptr,
            bytes,
            _mem: mem,
        })
    }

    /// Makes the context current on the calling thread (the engine may move between threads).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the CUDA context", e))
    }

    pub fn htod<T>(&self, dst: CUdeviceptr, src: &[T]) -> Result<()> {
        // SAFETY: callers pass a destination inside a live buffer with room for `src`.
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("copy to device", e))
    }

    /// Copies to the host and waits for the stream.
    pub fn dtoh<T>(&self, dst: &mut [T], src: CUdeviceptr) -> Result<()> {
        // SAFETY: `src` holds at least `dst.len()` elements; the sync below completes the copy
        // before `dst` is used.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| cuda_err("copy to host", e))?;
        self.sync()
    }

    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("stream synchronize", e))
    }

    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("creating an event", e))
    }

    pub fn func(&self, name: &'static str) -> &CudaFunction {
        &self.funcs[name]
    }

    /// Launches kernel `name` on the stream; `args` are its parameters in order, as
    /// [`KernelArg::bits`]. With [`Gpu::pdl`] the launch allows programmatic stream
    /// serialization: the kernel may start while the previous one drains, which hides the launch
    /// gap between the short kernels of a decode step and lets a GEMM fetch weights early. That
    /// is correct only because every kernel of ours calls `pdl_wait` (kernels.rs) before it
    /// touches anything an earlier kernel writes.
    ///
    /// The context must be current on the calling thread ([`Gpu::bind`]; the backend binds it
    /// at the start of every step and slot update).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number and type (a missing one is read
    /// through a null pointer), and every pointer among them must address a live buffer of the
    /// shape the kernel reads or writes.
    pub unsafe fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[u64]) -> Result<()> {
        const MAX_ARGS: usize = 24;
        assert!(
            args.len() <= MAX_ARGS,
            "kernel {name}: more than {MAX_ARGS} arguments"
        );
        let mut params = [std::ptr::null_mut::<std::ffi::c_void>(); MAX_ARGS];
        for (p, a) in params.iter_mut().zip(args) {
            *p = a as *const u64 as *mut std::ffi::c_void;
        }
        // SAFETY: a zeroed attribute value is valid; only the field we set is read.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl),
        };
        // SAFETY: `params` points at `args.len()` live parameter slots; each slot holds the
        // parameter's bits from its first byte (little-endian), and the driver reads as many bytes
        // as the kernel's parameter takes; the caller vouches for the rest.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func(name).cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| cuda_err(&format!("launching {name}"), e))
    }

    /// `y[M, ldy] (f32) = x[M, K] · W[N, K]ᵀ + beta · y` with x and W of type `elem`, through
    /// cuBLAS (f32 compute).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        x: CUdeviceptr,
        w: CUdeviceptr,
        y: CUdeviceptr,
        m: usize,
        n: usize,
        k: usize,
        ldy: usize,
        beta: f32,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let elem = self.elem.cuda_type();
        use cublas_sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        // SAFETY: pointers are live device buffers of the stated shapes.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                w as *const _,
                elem,
                k as i32,
                x as *const _,
                elem,
                k as i32,
                &beta as *const f32 as *const _,
                y as *mut _,
                cudaDataType::CUDA_R_32F,
                ldy as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cuda_err("cublasGemmEx", e))
    }
}

/// Compiles `src` for `arch` with NVRTC, or reads the PTX cached from an earlier run.
fn compile_cached(src: &str, arch: &str, dir: &Path) -> Result<Ptx> {
    let key = fnv1a(format!("{arch}\n{src}").as_bytes());
    let path = dir.join(format!("kernels-{arch}-{key:016x}.ptx"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        return Ok(Ptx::from_src(text));
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| cuda_err("NVRTC", e))?;
    let text = ptx.to_src();
    if let Some(dir) = path.parent() {
        // The cache is an optimization: failing to write it is not an error.
        let _ = std::fs::create_dir_all(dir);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &text).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(Ptx::from_src(text))
}

/// A kernel parameter passed by value, as the bits a parameter slot holds.
pub trait KernelArg {
    fn bits(self) -> u64;
}

impl KernelArg for u64 {
    fn bits(self) -> u64 {
        self
    }
}

impl KernelArg for i32 {
    fn bits(self) -> u64 {
        self as u32 as u64
    }
}

impl KernelArg for f32 {
    fn bits(self) -> u64 {
        self.to_bits() as u64
    }
}

/// A launch configuration: grid, and a block of `block` threads.
pub fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every module compiles under NVRTC for both element types and, where `ptxas` is on PATH,
    /// assembles for sm_90a (ptxas checks what NVRTC does not: inline PTX, register limits).
    /// Needs only libnvrtc, no GPU; skipped (with a note) where libnvrtc cannot be loaded, as
    /// on CI.
    #[test]
    fn kernels_compile() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("note: libnvrtc not found; kernel compile check skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let modules = kernels::MODULES.iter().chain([&super::super::skinny::TUNING]);
        for (m, elem) in modules.flat_map(|m| Elem::ALL.map(|e| (m, e))) {
            let opts = CompileOptions {
                options: vec!["--gpu-architecture=compute_90a".into(), "--std=c++17".into()],
                ..Default::default()
            };
            let what = format!("module {} ({})", m.name, elem.name());
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source(elem), opts)
                .unwrap_or_else(|e| panic!("NVRTC failed on {what}: {e:?}"));
            let text = ptx.to_src();
            // The build is the one asked for: tensor cores and conversions of that type.
            let ty = match elem {
                Elem::Bf16 => "bf16",
                Elem::F16 => "f16",
            };
            if m.body.contains("mma_16816(") {
                let mma = format!("m16n8k16.row.col.f32.{ty}.{ty}.f32");
                assert!(text.contains(&mma), "{what}: no {mma} in the PTX");
            }
            // Every kernel's parameters are the ones its launcher declares.
            if let Err(e) = super::super::launch::check_module(m.name, &text, m.kernels) {
                panic!("{what}: {e}");
            }
            if elem == Elem::F16 && m.body.contains("e2f(") {
                assert!(
                    text.contains("cvt.f32.f16"),
                    "{what}: no f16 conversion in the PTX"
                );
            }
            let path = dir.path().join(format!("{}-{}.ptx", m.name, elem.name()));
            std::fs::write(&path, text).unwrap();
            match std::process::Command::new("ptxas")
                .args(["-arch=sm_90a", "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
            {
                Ok(out) => {
                    let log = String::from_utf8_lossy(&out.stderr);
                    assert!(out.status.success(), "ptxas failed on {what}:\n{log}");
                    if std::env::var_os("MULTILORA_PTXAS_LOG").is_some() {
                        eprintln!("{what}:\n{log}");
                    }
                }
                Err(_) => eprintln!("note: ptxas not on PATH; {what} only NVRTC-checked"),
            }
        }
    }
}
