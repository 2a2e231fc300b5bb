// Tuning variants (Store, up to 8 tokens), timed by `gpu_bench --micro`: chunks in flight,
// blocks per SM asked of the register allocator, L2 prefetch, weights loaded before the
// programmatic-launch wait.
#define SKINNY_VAR(NAME, U, MINB, PF, PL)                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32, MINB) NAME(                           \
        const elem_t* x, const elem_t* W, const elem_t* bias, void* y, int M, int N, int K, int ldy,   \
        const float* in_ss, float eps, const elem_t* gamma, elem_t* nout, float* out_ss) {             \
        skinny<1, EPI_STORE, U, PF, PL>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss}); \
    }
SKINNY_VAR(skinny_var_u2_b4_nopl, 2, 4, true, false)
SKINNY_VAR(skinny_var_u2_b4_nopf, 2, 4, false, true)
SKINNY_VAR(skinny_var_u4_b2, 4, 2, true, true)

// The read-only ceiling: streams n16 16-byte vectors once (4 in flight per thread) and only
// sums them (the sink is written when the sum hits a value no test data makes).
extern "C" __global__ void __launch_bounds__(256) read_stream(const elem_t* p, unsigned long long n16, u32* sink) {
    const uint4* v = (const uint4*)p;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    u32 acc = 0;
    pdl_begin();
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = ld_stream<true>((const elem_t*)(v + i)), b = ld_stream<true>((const elem_t*)(v + i + stride));
        uint4 c = ld_stream<true>((const elem_t*)(v + i + 2 * stride)), d = ld_stream<true>((const elem_t*)(v + i + 3 * stride));
        acc += a.x ^ b.y ^ c.z ^ d.w ^ a.w ^ b.x ^ c.y ^ d.z;
    }
    for (; i < n16; i += stride) acc += ld_stream<true>((const elem_t*)(v + i)).x;
    if (acc == 0x9e3779b9u) *sink = acc;
}
