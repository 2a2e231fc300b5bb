// Two chunks in flight per warp and four blocks per SM (the fastest variant at one token on
// the H200, BENCHMARKS.md); more tokens need more registers: two blocks. Every skinny kernel
// takes (x, W, bias, y, M, N, K, ldy, in_ss, eps, gamma, out, out_ss): NormArgs last.
#define SKINNY_PARAMS                                                                                  \
    const elem_t *x, const elem_t *W, const elem_t *bias, void *y, int M, int N, int K, int ldy,      \
        const float *in_ss, float eps, const elem_t *gamma, elem_t *nout, float *out_ss
#define SKINNY(NAME, NT, EPI)                                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32, NT == 1 ? 4 : 2) NAME(SKINNY_PARAMS) { \
        skinny<NT, EPI, 2, true, true>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss}); \
    }
SKINNY(skinny_store_8, 1, EPI_STORE)
SKINNY(skinny_store_16, 2, EPI_STORE)
SKINNY(skinny_store_32, 4, EPI_STORE)
SKINNY(skinny_add_8, 1, EPI_ADD)
SKINNY(skinny_add_16, 2, EPI_ADD)
SKINNY(skinny_add_32, 4, EPI_ADD)
SKINNY(skinny_silu_8, 1, EPI_SILU)
SKINNY(skinny_silu_16, 2, EPI_SILU)
SKINNY(skinny_silu_32, 4, EPI_SILU)

// A residual add of up to 8 tokens in 16-warp blocks: twice the warps on a tile's K in one
// block, where a split across blocks would leave the tile's sum to atomics (the norm output
// needs it whole).
#define SK_WIDE_WARPS 16
extern "C" __global__ void __launch_bounds__(SK_WIDE_WARPS * 32, 2) skinny_add_8_w16(SKINNY_PARAMS) {
    skinny<1, EPI_ADD, 2, true, true, SK_WIDE_WARPS>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss});
}

// q/k/v with RoPE and the K/V cache write as the epilogue (decode steps): the skinny
// parameters, then RopeArgs.
#define SKINNY_ROPE(NAME, NT)                                                                          \
    extern "C" __global__ void __launch_bounds__(SK_WARPS * 32, NT == 1 ? 4 : 2) NAME(SKINNY_PARAMS,  \
        const float* cos_t, const float* sin_t, const u32* positions, const u32* slots,                  \
        elem_t* k_cache, elem_t* v_cache, int nh, int nkv, int hd) {                                     \
        RopeArgs ra{cos_t, sin_t, positions, slots, k_cache, v_cache, nh, nkv, hd};                      \
        skinny<NT, EPI_ROPE, 2, true, true>(x, W, bias, y, M, N, K, ldy, NormArgs{in_ss, eps, gamma, nout, out_ss}, ra); \
    }
SKINNY_ROPE(skinny_rope_8, 1)
SKINNY_ROPE(skinny_rope_16, 2)
SKINNY_ROPE(skinny_rope_32, 4)

