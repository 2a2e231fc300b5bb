// Segmented multi-LoRA shrink and expand on tensor cores (sgmv.rs has the contract and the
// fragment layout). Compiled after prelude.cuh.

#define SGMV_TILE 64
#define SHRINK_WARPS 16
#define EXPAND_N 256

// The elem_t rounding residual of v, so hi + lo carries ~16 (bf16) or ~22 (f16) mantissa bits
// of an f32. With f16, |v| must stay below 65504 (f16's largest finite value; tmp is a LoRA
// shrink output, far smaller), and below f16's normal range (6.1e-5) lo loses bits, an absolute
// error under 3e-8.
__device__ __forceinline__ float resid(float v) { return v - e2f(f2e(v)); }

// SGMV shrink: tmp[z, t, r] = scale[z, s] · x[t] · A[z, s, r]ᵀ for the tokens t of each segment
// (s its slot) and the nsub projections of a group sharing x. One block per (segment tile,
// 16-token row fragment, 16-rank chunk): x is read once for all projections, each A row once
// per 16 tokens (not per token). The block's SHRINK_WARPS warps take every SHRINK_WARPS-th
// 32-wide K chunk (a long K is the whole cost, and prefill tiles are few) and are summed in
// shared memory. Ranks past a projection's rank get 0 and read no weights.
// x: [T, K] elem_t (K % 8 == 0); A: [nsub, L, R, K] elem_t; ranks, scales: [nsub, L];
// segs: [*, 3] (start, end, slot), end - start <= SGMV_TILE; num_segs: [1];
// tmp: [nsub, T, R] f32. grid (>= num_segs, SGMV_TILE / 16, ceil(R / 16)), 32 * SHRINK_WARPS threads.
extern "C" __global__ void __launch_bounds__(32 * SHRINK_WARPS) sgmv_shrink(
    const elem_t* __restrict__ x, const elem_t* __restrict__ A, const int* ranks, const float* scales,
    const u32* segs, const u32* num_segs, float* tmp, int nsub, int T, int K, int R, int L) {
    pdl_begin();
    __shared__ float red[SHRINK_WARPS - 1][24][32];
    int seg = blockIdx.x;
    if (seg >= (int)*num_segs) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int t0 = (int)segs[3 * seg], nt = (int)segs[3 * seg + 1] - t0, s = (int)segs[3 * seg + 2];
    int ra = blockIdx.y * 16 + g, rb = ra + 8;
    if (blockIdx.y * 16 >= nt) return;  // block-uniform
    int r0 = blockIdx.z * 16;
    bool va = ra < nt, vb = rb < nt;
    // Active 8-rank column fragments per projection: rows past the rank are zero padding.
    int nfz[3];
    const uint4* ap[3][2];
#pragma unroll
    for (int z = 0; z < 3; z++) {
        int rk = z < nsub ? ranks[z * L + s] : 0;
        int nf = min((rk - r0 + 7) >> 3, (R - r0) >> 3);
        nfz[z] = max(0, min(nf, 2));
#pragma unroll
        for (int f = 0; f < 2; f++)
            ap[z][f] = (const uint4*)(A + (((size_t)(z < nsub ? z : 0) * L + s) * R + r0 + f * 8 + g) * K);
    }
    float acc[3][2][4];
#pragma unroll
    for (int z = 0; z < 3; z++)
#pragma unroll
        for (int f = 0; f < 2; f++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[z][f][i] = 0.f;
    if (nfz[0] | nfz[1] | nfz[2]) {
        int K8 = K >> 3, nchunks = (K8 + 3) >> 2;
        const uint4* xa = (const uint4*)(x + (size_t)(t0 + (va ? ra : 0)) * K);
        const uint4* xb = (const uint4*)(x + (size_t)(t0 + (vb ? rb : 0)) * K);
        uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll 2
        for (int c = warp; c < nchunks; c += SHRINK_WARPS) {
            // This lane's 8 consecutive k: physical 8q..8q+7 of the chunk (see the module doc).
            // Every load of the chunk is issued before the first mma.
            int k8 = c * 4 + q;
            bool kv = k8 < K8;
            uint4 xva = (va && kv) ? __ldg(xa + k8) : zero;
            uint4 xvb = (vb && kv) ? __ldg(xb + k8) : zero;
            uint4 w[3][2];
#pragma unroll
            for (int z = 0; z < 3; z++)
#pragma unroll
                for (int f = 0; f < 2; f++) w[z][f] = (kv && f < nfz[z]) ? __ldg(ap[z][f] + k8) : zero;
#pragma unroll
            for (int z = 0; z < 3; z++)
#pragma unroll
                for (int f = 0; f < 2; f++)
                    if (f < nfz[z]) {
                        mma_16816(acc[z][f], xva.x, xvb.x, xva.y, xvb.y, w[z][f].x, w[z][f].y);
                        mma_16816(acc[z][f], xva.z, xvb.z, xva.w, xvb.w, w[z][f].z, w[z][f].w);
                    }
        }
    }
    if (warp > 0) {
#pragma unroll
        for (int z = 0; z < 3; z++)
#pragma unroll
            for (int f = 0; f < 2; f++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[warp - 1][(z * 2 + f) * 4 + i][lane] = acc[z][f][i];
    }
    __syncthreads();
    if (warp > 0) return;
    for (int j = 0; j < SHRINK_WARPS - 1; j++)
#pragma unroll
        for (int z = 0; z < 3; z++)
#pragma unroll
            for (int f = 0; f < 2; f++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[z][f][i] += red[j][(z * 2 + f) * 4 + i][lane];
    // c0,c1: token row ra, ranks r0 + 8f + 2q, +1; c2,c3: token row rb. Padding ranks get 0.
#pragma unroll
    for (int z = 0; z < 3; z++) {
        if (z >= nsub) break;
        float sc = scales[z * L + s];
#pragma unroll
        for (int f = 0; f < 2; f++) {
            int r = r0 + f * 8 + 2 * q;
            if (r0 + f * 8 >= R) break;
            float* o = tmp + ((size_t)z * T + t0) * R + r;
            if (va) *(float2*)(o + (size_t)ra * R) = make_float2(acc[z][f][0] * sc, acc[z][f][1] * sc);
            if (vb) *(float2*)(o + (size_t)rb * R) = make_float2(acc[z][f][2] * sc, acc[z][f][3] * sc);
        }
    }
}

// SGMV expand: y[t, o] += tmp[z(o), t, :rank] · B[s, o, :rank] for the tokens t of each segment.
// The group's projections are concatenated along N: outputs below n1 belong to sub 0, below n2
// to sub 1, the rest to sub 2 (as lora_expand). One block per (segment tile, EXPAND_N outputs),
// a warp per 16-token row fragment; each B row is read once per tile. tmp enters the tensor
// cores as elem_t hi + lo halves (two mmas), so the result keeps f32-like precision.
// tmp: [nsub, T, R] f32; B: [L, N, R] elem_t; ranks: [nsub, L]; segs, num_segs: as sgmv_shrink;
// y: [T, ldy] f32. grid (>= num_segs, ceil(N / EXPAND_N)), 128 threads.
extern "C" __global__ void __launch_bounds__(128) sgmv_expand(
    const float* tmp, const elem_t* __restrict__ B, const int* ranks, const u32* segs, const u32* num_segs,
    float* y, int T, int N, int R, int L, int ldy, int n1, int n2) {
    pdl_begin();
    int seg = blockIdx.x;
    if (seg >= (int)*num_segs) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int t0 = (int)segs[3 * seg], nt = (int)segs[3 * seg + 1] - t0, s = (int)segs[3 * seg + 2];
    int m0 = warp * 16;
    if (m0 >= nt) return;  // warp-uniform; no block-wide synchronization below
    int ra = m0 + g, rb = ra + 8;
    bool va = ra < nt, vb = rb < nt;
    int nend = min((int)(blockIdx.y + 1) * EXPAND_N, N);
    for (int n0 = blockIdx.y * EXPAND_N; n0 < nend; n0 += 32) {
        int zlo = n0 < n1 ? 0 : (n0 < n2 ? 1 : 2);
        int nl = min(n0 + 31, N - 1);
        int zhi = nl < n1 ? 0 : (nl < n2 ? 1 : 2);
        float acc[4][4];
#pragma unroll
        for (int f = 0; f < 4; f++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[f][i] = 0.f;
        bool any = false;
        for (int z = zlo; z <= zhi; z++) {
            int rk = ranks[z * L + s];
            any |= rk > 0;
            const float* ta = tmp + ((size_t)z * T + t0 + (va ? ra : 0)) * R;
            const float* tb = tmp + ((size_t)z * T + t0 + (vb ? rb : 0)) * R;
            for (int r0 = 0; r0 < rk; r0 += 16) {
                // This lane's ranks: physical r0+4q..r0+4q+3 = logical {2q, 2q+1, 2q+8, 2q+9}.
                int rr = r0 + 4 * q;
                bool rv = rr < R;
                float4 fa = (va && rv) ? *(const float4*)(ta + rr) : make_float4(0.f, 0.f, 0.f, 0.f);
                float4 fb = (vb && rv) ? *(const float4*)(tb + rr) : make_float4(0.f, 0.f, 0.f, 0.f);
                u32 h0 = pack2(fa.x, fa.y), h1 = pack2(fb.x, fb.y);
                u32 h2 = pack2(fa.z, fa.w), h3 = pack2(fb.z, fb.w);
                u32 l0 = pack2(resid(fa.x), resid(fa.y)), l1 = pack2(resid(fb.x), resid(fb.y));
                u32 l2 = pack2(resid(fa.z), resid(fa.w)), l3 = pack2(resid(fb.z), resid(fb.w));
#pragma unroll
                for (int f = 0; f < 4; f++) {
                    int o = n0 + f * 8 + g;
                    int zo = o < n1 ? 0 : (o < n2 ? 1 : 2);
                    uint2 bw = (o < N && zo == z && rv) ? __ldg((const uint2*)(B + ((size_t)s * N + o) * R + rr))
                                                        : make_uint2(0, 0);
                    mma_16816(acc[f], h0, h1, h2, h3, bw.x, bw.y);
                    mma_16816(acc[f], l0, l1, l2, l3, bw.x, bw.y);
                }
            }
        }
        if (!any) continue;
        // c0,c1: token row ra, outputs n0 + 8f + 2q, +1; c2,c3: token row rb.
#pragma unroll
        for (int f = 0; f < 4; f++) {
            int o = n0 + f * 8 + 2 * q;  // even: a float2 when ldy is even too
#pragma unroll
            for (int h = 0; h < 2; h++) {
                if (!(h ? vb : va)) continue;
                float* p = y + (size_t)(t0 + (h ? rb : ra)) * ldy + o;
                float c0 = acc[f][2 * h], c1 = acc[f][2 * h + 1];
                if (o + 1 < N && !(ldy & 1)) {
                    float2 v = *(float2*)p;
                    *(float2*)p = make_float2(v.x + c0, v.y + c1);
                } else {
                    if (o < N) p[0] += c0;
                    if (o + 1 < N) p[1] += c1;
                }
            }
        }
    }
}
