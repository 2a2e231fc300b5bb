// Types and helpers every kernel module starts with (see kernels.rs): elem_t (bf16, or f16
// after `#define ML_F16 1`), conversions, tensor-core mma, programmatic dependent launch.

typedef unsigned short elem_t;
typedef unsigned int u32;
typedef unsigned long long u64;
#define INFINITY __int_as_float(0x7f800000)

// MMA_ELEM: elem_t's name in `mma.sync` type strings.
#ifdef ML_F16
// IEEE half: PTX conversions (no cuda_fp16.h under NVRTC).
#define MMA_ELEM "f16"
__device__ __forceinline__ float e2f(elem_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ elem_t f2e(float f) {
    elem_t v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}
__device__ __forceinline__ float lo(u32 v) { return e2f((elem_t)(v & 0xffffu)); }
__device__ __forceinline__ float hi(u32 v) { return e2f((elem_t)(v >> 16)); }
#else
// bfloat16: the top half of an f32.
#define MMA_ELEM "bf16"
__device__ __forceinline__ float e2f(elem_t v) { return __uint_as_float(((u32)v) << 16); }
__device__ __forceinline__ elem_t f2e(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (elem_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (elem_t)(u >> 16);
}
__device__ __forceinline__ float lo(u32 v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }
#endif
// Dot product of 8 element pairs packed in two uint4.
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    float s = lo(a.x) * lo(b.x);
    s = fmaf(hi(a.x), hi(b.x), s);
    s = fmaf(lo(a.y), lo(b.y), s);
    s = fmaf(hi(a.y), hi(b.y), s);
    s = fmaf(lo(a.z), lo(b.z), s);
    s = fmaf(hi(a.z), hi(b.z), s);
    s = fmaf(lo(a.w), lo(b.w), s);
    s = fmaf(hi(a.w), hi(b.w), s);
    return s;
}
// d[16x8] += a[16x16] · b[16x8] on tensor cores, elem_t in, f32 accumulate. Fragments (g = lane / 4,
// q = lane % 4): a0 = (row g, k 2q..2q+1), a1 = (row g+8, k 2q..), a2 = (row g, k 2q+8..),
// a3 = (row g+8, k 2q+8..); b0 = (k 2q.., col g), b1 = (k 2q+8.., col g); d0,d1 = (row g, cols 2q,
// 2q+1), d2,d3 = row g+8.
__device__ __forceinline__ void mma_16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_ELEM "." MMA_ELEM ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// Two values as elem_t in one u32, the first in the low half (an mma fragment's element order).
__device__ __forceinline__ u32 pack2(float lo_v, float hi_v) {
    return (u32)f2e(lo_v) | ((u32)f2e(hi_v) << 16);
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Programmatic dependent launch (sm_90+; `Gpu::launch`): a kernel may be launched while the
// previous one in the stream drains. `pdl_wait` blocks until that kernel has finished and its
// writes are visible, so every kernel waits before it touches activations (work on weights
// alone may come first); `pdl_trigger` lets the next kernel start launching once every block
// of this one has called it. `pdl_begin` triggers first: the next kernel's blocks then wait in
// free slots, which lets a GEMM behind a short kernel (a norm, attention) start loading its
// weights while the GEMM before that short kernel drains. Correct whatever the order, since
// each kernel waits for its predecessor, which waited for its own.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
__device__ __forceinline__ void pdl_begin() {
    pdl_trigger();
    pdl_wait();
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the sum.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    float s = 0.f;
    for (int i = 0; i < nw; i++) s += part[i];
    return s;
}

