//! What the CUDA test targets share: whether a GPU is here, buffers to and from the device, and
//! the CPU backend as the oracle of a GPU step with the tolerance of each element type.

use multilora_engine::cuda::elem::Elem;
use multilora_engine::cuda::gpu::{DevBuf, Gpu};
use multilora_engine::{LLMEngine, LoraRequest, Prompt, SamplingParams};

use super::case_config;

pub fn have_gpu() -> bool {
    match multilora_engine::cuda::gpu::probe() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("note: skipping CUDA test: {e}");
            false
        }
    }
}

/// Logits of the next token after `prompt` + `prefix`, computed by the CPU backend (f32, the
/// oracle) in one prefill: a teacher-forced reference for a GPU decode step.
pub fn cpu_next_logits(case: &str, prompt: &[u32], prefix: &[u32], lora: Option<&LoraRequest>) -> Vec<f32> {
    let mut engine = LLMEngine::new(case_config(case)).expect("CPU engine loads");
    let ids: Vec<u32> = prompt.iter().chain(prefix).copied().collect();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(1)
    };
    engine
        .add_request("r", Prompt::TokenIds(ids), params, lora)
        .unwrap();
    engine.step().unwrap();
    engine.last_logits("r").expect("CPU keeps logits").to_vec()
}

/// Largest relative difference of logits from the f32 reference, for an element type. Tiny
/// random models have small, near-tied logits: bf16 weight rounding alone moves them by a few
/// percent of the largest; f16 keeps 3 more mantissa bits.
pub fn logits_tolerance(elem: Elem) -> f32 {
    match elem {
        Elem::Bf16 => 6e-2,
        Elem::F16 => 2e-2,
    }
}

/// `n` 16-bit values at `ptr` drawn uniformly from [-1, 1) by the device (seeded).
pub fn fill_uniform(gpu: &Gpu, ptr: u64, n: usize, seed: u64) {
    use multilora_engine::cuda::gpu::{cfg, KernelArg};
    let args = [ptr, n as u64, seed, 1.0f32.bits()];
    // SAFETY: callers pass a buffer of n 16-bit values (fill_uniform's signature in kernels.rs).
    unsafe { gpu.launch("fill_uniform", cfg((256, 1, 1), 256), &args) }.unwrap();
}

pub fn upload<T>(gpu: &Gpu, v: &[T]) -> DevBuf {
    let buf = gpu.alloc(std::mem::size_of_val(v)).unwrap();
    gpu.htod(buf.ptr, v).unwrap();
    buf
}

pub fn download(gpu: &Gpu, buf: &DevBuf, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    gpu.dtoh(&mut v, buf.ptr).unwrap();
    v
}
