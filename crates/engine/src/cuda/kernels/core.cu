// Core kernels (compiled after prelude.cuh): weight fills, embedding, norms, RoPE and the K/V
// cache write, paged and decode attention, activations, BGMV LoRA.

// Seeded uniform values in [-bound, bound) for load_format=dummy: a splitmix64 hash of the
// element index, so weights are generated on the device in one pass.
extern "C" __global__ void fill_uniform(elem_t* out, u64 n, u64 seed, float bound) {
    pdl_begin();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = f2e((2.f * u - 1.f) * bound);
    }
}

extern "C" __global__ void fill(elem_t* out, u64 n, float v) {
    pdl_begin();
    elem_t b = f2e(v);
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = b;
}

// A block per token (up to 1024 threads): hidden [T, H] f32 = table [vocab, H] elem_t at
// ids [T], and the first layer's input norm of it, out [T, H] elem_t = rmsnorm(hidden) * w.
// Block 0 also zeroes zero[0..nzero) (the step's split-norm sums of squares, skinny.rs).
#define EMBED_PRE 4
extern "C" __global__ void __launch_bounds__(1024) embed(float* hidden, const elem_t* table, const u32* ids, int H,
                                                         const elem_t* w, elem_t* out, float eps, float* zero, int nzero) {
    // The norm weight is set before the step: this thread's first EMBED_PRE of it are loaded
    // while the kernel ahead drains.
    elem_t wp[EMBED_PRE];
#pragma unroll
    for (int e = 0; e < EMBED_PRE; e++) {
        int i = threadIdx.x + e * blockDim.x;
        wp[e] = i < H ? w[i] : (elem_t)0;
    }
    pdl_begin();
    int t = blockIdx.x;
    if (t == 0)
        for (int i = threadIdx.x; i < nzero; i += blockDim.x) zero[i] = 0.f;
    const elem_t* row = table + (size_t)ids[t] * H;
    float* h = hidden + (size_t)t * H;
    float v[EMBED_PRE], ss = 0.f;
#pragma unroll
    for (int e = 0; e < EMBED_PRE; e++) {
        int i = threadIdx.x + e * blockDim.x;
        v[e] = i < H ? e2f(row[i]) : 0.f;
        ss += v[e] * v[e];
    }
    for (int i = threadIdx.x + EMBED_PRE * blockDim.x; i < H; i += blockDim.x) {
        float x = e2f(row[i]);
        h[i] = x;
        ss += x * x;
    }
    float inv = rsqrtf(block_sum(ss) / (float)H + eps);
    elem_t* o = out + (size_t)t * H;
#pragma unroll
    for (int e = 0; e < EMBED_PRE; e++) {
        int i = threadIdx.x + e * blockDim.x;
        if (i < H) {
            h[i] = v[e];
            o[i] = f2e(e2f(wp[e]) * (v[e] * inv));
        }
    }
    for (int i = threadIdx.x + EMBED_PRE * blockDim.x; i < H; i += blockDim.x) o[i] = f2e(e2f(w[i]) * (h[i] * inv));
}

// One output's LoRA expand: tr[0..rank) (the token's shrink result, f32) · b[0..rank) (the
// slot's B row for this output, elem_t, 16-byte aligned, zero-padded to a multiple of 8).
__device__ __forceinline__ float dot8f(const float* tr, uint4 bv, float acc) {
    acc = fmaf(tr[0], lo(bv.x), acc);
    acc = fmaf(tr[1], hi(bv.x), acc);
    acc = fmaf(tr[2], lo(bv.y), acc);
    acc = fmaf(tr[3], hi(bv.y), acc);
    acc = fmaf(tr[4], lo(bv.z), acc);
    acc = fmaf(tr[5], hi(bv.z), acc);
    acc = fmaf(tr[6], lo(bv.w), acc);
    return fmaf(tr[7], hi(bv.w), acc);
}
__device__ __forceinline__ float lora_dot(const float* tr, const elem_t* b, int rank) {
    float acc = 0.f;
    for (int r8 = 0; r8 < rank; r8 += 8) acc = dot8f(tr + r8, __ldg((const uint4*)(b + r8)), acc);
    return acc;
}
// The first two chunks of a B row, loaded ahead (before the PDL wait: B and the slot table are
// set before the step), and lora_dot over them and the rest of the row.
struct BPre {
    uint4 c0, c1;
};
__device__ __forceinline__ BPre lora_pre(const elem_t* b, int rank) {
    const uint4 z = make_uint4(0, 0, 0, 0);
    return BPre{rank > 0 ? __ldg((const uint4*)b) : z, rank > 8 ? __ldg((const uint4*)(b + 8)) : z};
}
__device__ __forceinline__ float lora_dot_pre(const float* tr, BPre p, const elem_t* b, int rank) {
    float acc = 0.f;
    if (rank > 0) acc = dot8f(tr, p.c0, acc);
    if (rank > 8) acc = dot8f(tr + 8, p.c1, acc);
    for (int r8 = 16; r8 < rank; r8 += 8) acc = dot8f(tr + r8, __ldg((const uint4*)(b + r8)), acc);
    return acc;
}

// One row per block: out[n, H] elem_t = rmsnorm(hidden[row]) * w, hidden: [*, H] f32 residual
// stream; rows: [n] source row of each output row (may be null: row = blockIdx.x).
// With lora_tmp set (decode), the LoRA expand of the projection that just added into the
// residual stream (o_proj or down_proj, one target) is added into it first, as lora_expand
// would: lora_tmp [T, R] from lora_shrink, B [L, H, R], ranks [L], tok_slot [T].
// Launched with up to 1024 threads: the bound keeps the register count where that fits.
#define NORM_PRE 4
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm(float* hidden, const u32* rows, const elem_t* w, elem_t* out, int H,
                                        float eps, const float* lora_tmp, const elem_t* B, const int* ranks,
                                        const int* tok_slot, int R) {
    int r = rows ? (int)rows[blockIdx.x] : (int)blockIdx.x;
    int rank = 0;
    const elem_t* b = 0;
    if (lora_tmp) {
        int sl = tok_slot[r];
        if (sl >= 0) {
            rank = ranks[sl];
            b = B + (size_t)sl * H * R;
        }
    }
    // Rows, slots, the norm weight and B are set before the step: this thread's first NORM_PRE
    // weights and B rows are loaded while the kernel ahead drains.
    elem_t wp[NORM_PRE];
    BPre bp[NORM_PRE];
#pragma unroll
    for (int e = 0; e < NORM_PRE; e++) {
        int i = threadIdx.x + e * blockDim.x;
        wp[e] = i < H ? w[i] : (elem_t)0;
        bp[e] = lora_pre(b + (size_t)i * R, i < H ? rank : 0);
    }
    pdl_begin();
    float* x = hidden + (size_t)r * H;
    const float* tr = lora_tmp + (size_t)r * R;
    float xv[NORM_PRE], ss = 0.f;
#pragma unroll
    for (int e = 0; e < NORM_PRE; e++) {
        int i = threadIdx.x + e * blockDim.x;
        xv[e] = 0.f;
        if (i < H) {
            float v = x[i];
            if (rank) {
                v += lora_dot_pre(tr, bp[e], b + (size_t)i * R, rank);
                x[i] = v;
            }
            xv[e] = v;
            ss += v * v;
        }
    }
    for (int i = threadIdx.x + NORM_PRE * blockDim.x; i < H; i += blockDim.x) {
        float v = x[i];
        if (rank) {
            v += lora_dot(tr, b + (size_t)i * R, rank);
            x[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss);
    float inv = rsqrtf(ss / (float)H + eps);
    elem_t* o = out + (size_t)blockIdx.x * H;
#pragma unroll
    for (int e = 0; e < NORM_PRE; e++) {
        int i = threadIdx.x + e * blockDim.x;
        if (i < H) o[i] = f2e(e2f(wp[e]) * (xv[e] * inv));
    }
    for (int i = threadIdx.x + NORM_PRE * blockDim.x; i < H; i += blockDim.x) o[i] = f2e(e2f(w[i]) * (x[i] * inv));
}

// Qwen3's per-head RMSNorm of q and k, in place. qkv: [T, ld] f32 with q heads then k heads.
// grid (T, nh + nkv), 32 threads.
extern "C" __global__ void qk_norm(float* qkv, int ld, int nh, int hd, const elem_t* qw, const elem_t* kw, float eps) {
    pdl_begin();
    int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    float* x = qkv + (size_t)t * ld + (size_t)h * hd;
    const elem_t* w = h < nh ? qw : kw;
    float ss = 0.f;
    for (int i = lane; i < hd; i += 32) ss += x[i] * x[i];
    ss = warp_sum(ss);
    float inv = rsqrtf(ss / (float)hd + eps);
    for (int i = lane; i < hd; i += 32) x[i] = e2f(w[i]) * (x[i] * inv);
}

// HF non-interleaved RoPE on q (in place) and k, then k and v into the paged cache.
// qkv: [T, ld] f32 (q heads, k heads, v heads); cos/sin: [max_pos, hd/2];
// k_cache/v_cache: [num_slots, nkv * hd] elem_t. grid (T, nh + 2 nkv): a block per head (the
// v heads are copied), at least hd / 2 threads.
// With lora_tmp set (decode), the q/k/v LoRA expand is added first, as lora_expand would:
// lora_tmp [3, T, R] from lora_shrink, B [L, ld, R], ranks [3, L], tok_slot [T].
extern "C" __global__ void rope_kv_write(float* qkv, int ld, int nh, int nkv, int hd, const float* cos_t,
                                         const float* sin_t, const u32* positions, const u32* slot_mapping,
                                         elem_t* k_cache, elem_t* v_cache, const float* lora_tmp,
                                         const elem_t* B, const int* ranks, const int* tok_slot, int T, int R,
                                         int L) {
    int t = blockIdx.x, h = blockIdx.y, half = hd / 2, kvs = nkv * hd;
    bool is_v = h >= nh + nkv;
    // This head's LoRA: projection z (q, k or v), the token's slot and rank.
    int z = h < nh ? 0 : (is_v ? 2 : 1), rank = 0;
    const elem_t* b = 0;
    if (lora_tmp) {
        int sl = tok_slot[t];
        if (sl >= 0) {
            rank = ranks[z * L + sl];
            b = B + ((size_t)sl * ld + (size_t)h * hd) * R;
        }
    }
    // B is set before the step: the rows of this thread's first two outputs (j and j + half,
    // or i and i + blockDim for v) are loaded while the kernel ahead drains.
    int e0 = threadIdx.x, e1 = e0 + (is_v ? (int)blockDim.x : half);
    bool first = is_v ? e0 < hd : e0 < half;
    BPre p0 = lora_pre(b + (size_t)e0 * R, first ? rank : 0);
    BPre p1 = lora_pre(b + (size_t)e1 * R, first && e1 < hd ? rank : 0);
    pdl_begin();
    float* x = qkv + (size_t)t * ld + (size_t)h * hd;
    size_t slot = slot_mapping[t];
    const float* tr = lora_tmp + ((size_t)z * T + t) * R;
    // The LoRA term of output e (rank > 0): preloaded rows for the first two, read here for
    // the rest.
    auto delta = [&](int e) {
        if (e == e0) return lora_dot_pre(tr, p0, b + (size_t)e * R, rank);
        if (e == e1) return lora_dot_pre(tr, p1, b + (size_t)e * R, rank);
        return lora_dot(tr, b + (size_t)e * R, rank);
    };
    if (is_v) {
        elem_t* v = v_cache + slot * kvs + (size_t)(h - nh - nkv) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) v[i] = f2e(rank ? x[i] + delta(i) : x[i]);
        return;
    }
    u32 p = positions[t];
    const float* c = cos_t + (size_t)p * half;
    const float* s = sin_t + (size_t)p * half;
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float a = x[j], bb = x[j + half];
        if (rank) {
            a += delta(j);
            bb += delta(j + half);
        }
        float ra = a * c[j] - bb * s[j], rb = bb * c[j] + a * s[j];
        if (h < nh) {
            x[j] = ra;
            x[j + half] = rb;
        } else {
            elem_t* k = k_cache + slot * kvs + (size_t)(h - nh) * hd;
            k[j] = f2e(ra);
            k[j + half] = f2e(rb);
        }
    }
}

// rope_kv_write for many tokens without LoRA (prefill and mixed steps): a block per token,
// whose threads take the (head, j) rotation pairs of every q and k head, then v's elements, so a
// warp reads and writes consecutive elements. Same layouts as rope_kv_write. grid (T), 256 threads.
extern "C" __global__ void rope_kv_write_rows(float* qkv, int ld, int nh, int nkv, int hd, const float* cos_t,
                                              const float* sin_t, const u32* positions,
                                              const u32* slot_mapping, elem_t* k_cache, elem_t* v_cache) {
    pdl_begin();
    int t = blockIdx.x, half = hd / 2, kvs = nkv * hd;
    float* x = qkv + (size_t)t * ld;
    size_t slot = slot_mapping[t];
    const float* c = cos_t + (size_t)positions[t] * half;
    const float* s = sin_t + (size_t)positions[t] * half;
    for (int idx = threadIdx.x; idx < (nh + nkv) * half; idx += blockDim.x) {
        int h = idx / half, j = idx - h * half;
        float* xh = x + (size_t)h * hd;
        float a = xh[j], b = xh[j + half];
        float ra = a * c[j] - b * s[j], rb = b * c[j] + a * s[j];
        if (h < nh) {
            xh[j] = ra;
            xh[j + half] = rb;
        } else {
            elem_t* k = k_cache + slot * kvs + (size_t)(h - nh) * hd;
            k[j] = f2e(ra);
            k[j + half] = f2e(rb);
        }
    }
    const float* v = x + (size_t)(nh + nkv) * hd;
    for (int i = threadIdx.x; i < kvs; i += blockDim.x) v_cache[slot * kvs + i] = f2e(v[i]);
}

// Causal attention over the paged cache, prefill and decode alike: token t attends to positions
// 0..=positions[t] of its sequence. grid (T, nh), ATT_WARPS warps; each warp takes every
// ATT_WARPS-th key with an online softmax, then the warps are merged.
// qkv: [T, ld] f32 (q first); out: [T, nh * hd] elem_t; token_seq: [T];
// block_tables: [num_seqs, max_blocks]
#define ATT_WARPS 8
#define MAX_DPL 8
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) paged_attention(
    const float* qkv, int ld, elem_t* out, const elem_t* k_cache, const elem_t* v_cache, const u32* token_seq,
    const u32* positions, const u32* block_tables, int max_blocks, int block_size, int nh, int nkv, int hd,
    float scale) {
    pdl_begin();
    int t = blockIdx.x, h = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int kvh = h / (nh / nkv), kvs = nkv * hd;
    const float* q = qkv + (size_t)t * ld + (size_t)h * hd;
    float qr[MAX_DPL], acc[MAX_DPL];
#pragma unroll
    for (int j = 0; j < MAX_DPL; j++) {
        int d = lane + 32 * j;
        qr[j] = d < hd ? q[d] * scale : 0.f;
        acc[j] = 0.f;
    }
    int ctx = (int)positions[t] + 1;
    const u32* table = block_tables + (size_t)token_seq[t] * max_blocks;
    float m = -INFINITY, l = 0.f;
    for (int p = warp; p < ctx; p += ATT_WARPS) {
        size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
        const elem_t* k = k_cache + slot * kvs + (size_t)kvh * hd;
        const elem_t* v = v_cache + slot * kvs + (size_t)kvh * hd;
        float kv[MAX_DPL], vv[MAX_DPL];
#pragma unroll
        for (int j = 0; j < MAX_DPL; j++) {
            int d = lane + 32 * j;
            kv[j] = d < hd ? e2f(k[d]) : 0.f;
            vv[j] = d < hd ? e2f(v[d]) : 0.f;
        }
        float sc = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_DPL; j++) sc = fmaf(qr[j], kv[j], sc);
        sc = warp_sum(sc);
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), e = __expf(sc - mn);
        l = l * corr + e;
#pragma unroll
        for (int j = 0; j < MAX_DPL; j++) acc[j] = fmaf(acc[j], corr, e * vv[j]);
        m = mn;
    }
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ float so[ATT_WARPS][32 * MAX_DPL];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int j = 0; j < MAX_DPL; j++) so[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, sm[w]);
    float L = 0.f;
    for (int w = 0; w < ATT_WARPS; w++) L += sl[w] * __expf(sm[w] - mx);
    elem_t* o = out + (size_t)t * nh * hd + (size_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) s += so[w][d] * __expf(sm[w] - mx);
        o[d] = f2e(s / L);
    }
}

// Decode attention split over the context (flash-decoding): grid (S, nh, P). The context of
// sequence s (token s is its only query) is cut into at most P parts of at least the keys one
// block reads in a round; block p takes part p (blocks past the last part exit at once). A key
// is read by hd / 8 lanes with 16-byte loads, so a block reads THREADS * 8 / hd keys at once,
// DA_DEPTH deep: a round is 32 keys at hd 128 for the 128-thread kernel, 256 for the
// 1024-thread one (decode_attention_wide: few sequences, where a short context then needs no
// second pass). With more than one part, each block writes its unnormalized partial (max, sum,
// out[hd]) to `part`, and the last block of (s, h) to finish merges them (a counter per (s, h),
// reset by the merger, so a captured graph can replay).
// hd: a power of two from 8 to 256. part: [S, nh, P, hd + 2] f32; counters: [S * nh] u32.
#define DA_THREADS 128
#define DA_WIDE_THREADS 1024
#define DA_DEPTH 4
#define DA_MAX_PARTS 64
template <int THREADS>
__device__ __forceinline__ void decode_attention_impl(
    const float* qkv, int ld, elem_t* out, const elem_t* k_cache, const elem_t* v_cache, const u32* positions,
    const u32* block_tables, int max_blocks, int block_size, int nh, int nkv, int hd, float scale, float* part,
    u32* counters) {
    int s = blockIdx.x, h = blockIdx.y, p = blockIdx.z;
    int lpk = hd >> 3, grp = threadIdx.x / lpk, sub = threadIdx.x % lpk, ngrp = THREADS / lpk;
    int kvh = h / (nh / nkv), kvs = nkv * hd;
    int ctx = (int)positions[s] + 1;
    int parts = min((int)gridDim.z, DA_MAX_PARTS);
    int per = max((ctx + parts - 1) / parts, ngrp * DA_DEPTH);
    int P = (ctx + per - 1) / per;
    pdl_trigger();
    if (p >= P) return;
    int k0 = p * per, k1 = min(ctx, k0 + per);
    const u32* table = block_tables + (size_t)s * max_blocks;
    size_t off = (size_t)kvh * hd + sub * 8;
    uint4 kv[DA_DEPTH], vv[DA_DEPTH];
    // Keys and values of position `pos` (zeros past the part), unless it is `skip`.
    auto load = [&](int base, int skip) {
#pragma unroll
        for (int u = 0; u < DA_DEPTH; u++) {
            int pos = base + u * ngrp;
            if (pos < k1 && pos != skip) {
                size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
                kv[u] = __ldg((const uint4*)(k_cache + slot * kvs + off));
                vv[u] = __ldg((const uint4*)(v_cache + slot * kvs + off));
            } else {
                kv[u] = vv[u] = make_uint4(0, 0, 0, 0);
            }
        }
    };
    // Positions and block tables are step inputs, and the cache before the new token was
    // written by earlier steps: the first keys are loaded while the kernel ahead (rope_kv_write,
    // or the q/k/v GEMM with the RoPE epilogue: either writes the new token's K/V) drains; the
    // new token's own K/V after waiting for it.
    load(k0 + grp, ctx - 1);
    pdl_wait();
#pragma unroll
    for (int u = 0; u < DA_DEPTH; u++) {
        int pos = k0 + grp + u * ngrp;
        if (pos == ctx - 1 && pos < k1) {
            size_t slot = (size_t)table[pos / block_size] * block_size + pos % block_size;
            kv[u] = __ldg((const uint4*)(k_cache + slot * kvs + off));
            vv[u] = __ldg((const uint4*)(v_cache + slot * kvs + off));
        }
    }
    const float* q = qkv + (size_t)s * ld + (size_t)h * hd + sub * 8;
    float qr[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        qr[i] = q[i] * scale;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    // Trip counts are the same for every lane: the shuffles below need the whole warp.
    for (int base0 = k0; base0 < k1; base0 += ngrp * DA_DEPTH) {
        int base = base0 + grp;
        if (base0 != k0) load(base, -1);
#pragma unroll
        for (int u = 0; u < DA_DEPTH; u++) {
            const u32* kw = (const u32*)&kv[u];
            float sc = 0.f;
#pragma unroll
            for (int i = 0; i < 4; i++) sc = fmaf(qr[2 * i], lo(kw[i]), fmaf(qr[2 * i + 1], hi(kw[i]), sc));
            for (int o = lpk >> 1; o > 0; o >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o);
            if (base + u * ngrp < k1) {
                float mn = fmaxf(m, sc);
                float corr = __expf(m - mn), e = __expf(sc - mn);
                l = l * corr + e;
                const u32* vw = (const u32*)&vv[u];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    acc[2 * i] = fmaf(acc[2 * i], corr, e * lo(vw[i]));
                    acc[2 * i + 1] = fmaf(acc[2 * i + 1], corr, e * hi(vw[i]));
                }
                m = mn;
            }
        }
    }
    // Merge the block's key groups: weights first, then one pass over the outputs.
    __shared__ float gw[THREADS], go[THREADS * 8];
    __shared__ float stat[2];
    if (sub == 0) {
        gw[grp] = m;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float M = -INFINITY;
        for (int j = 0; j < ngrp; j++) M = fmaxf(M, gw[j]);
        stat[0] = M;
    }
    __syncthreads();
    float M = stat[0];
    float wgt = l > 0.f ? __expf(m - M) : 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) go[grp * hd + sub * 8 + i] = acc[i] * wgt;
    __syncthreads();
    if (sub == 0) gw[grp] = l * wgt;
    __syncthreads();
    if (threadIdx.x == 0) {
        float L = 0.f;
        for (int j = 0; j < ngrp; j++) L += gw[j];
        stat[1] = L;
    }
    __syncthreads();
    float L = stat[1];
    size_t sh = (size_t)s * nh + h;
    elem_t* o = out + sh * hd;
    if (P == 1) {
        for (int d = threadIdx.x; d < hd; d += THREADS) {
            float v = 0.f;
            for (int j = 0; j < ngrp; j++) v += go[j * hd + d];
            o[d] = f2e(L > 0.f ? v / L : 0.f);
        }
        return;
    }
    int stride = hd + 2;
    float* mine = part + (sh * gridDim.z + p) * stride;
    for (int d = threadIdx.x; d < hd; d += THREADS) {
        float v = 0.f;
        for (int j = 0; j < ngrp; j++) v += go[j * hd + d];
        mine[2 + d] = v;
    }
    if (threadIdx.x == 0) {
        mine[0] = M;
        mine[1] = L;
    }
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) last = atomicAdd(&counters[sh], 1u) == (u32)(P - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Last block: every part's weight in shared memory, then each output dim in one pass.
    const float* all = part + sh * gridDim.z * stride;
    __shared__ float pw[DA_MAX_PARTS];
    if (threadIdx.x < P) pw[threadIdx.x] = __ldcg(all + threadIdx.x * stride + 1) > 0.f ? __ldcg(all + threadIdx.x * stride) : -INFINITY;
    __syncthreads();
    if (threadIdx.x == 0) {
        float MM = -INFINITY;
        for (int j = 0; j < P; j++) MM = fmaxf(MM, pw[j]);
        float LL = 0.f;
        for (int j = 0; j < P; j++) {
            float w = pw[j] > -INFINITY ? __expf(pw[j] - MM) : 0.f;
            LL += w * __ldcg(all + j * stride + 1);
            pw[j] = w;
        }
        stat[0] = LL;
    }
    __syncthreads();
    float LL = stat[0];
    for (int d = threadIdx.x; d < hd; d += THREADS) {
        float v = 0.f;
        for (int j = 0; j < P; j++) v += pw[j] * __ldcg(all + j * stride + 2 + d);
        o[d] = f2e(LL > 0.f ? v / LL : 0.f);
    }
    if (threadIdx.x == 0) counters[sh] = 0;
}

#define DECODE_ATTENTION(NAME, THREADS)                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                             \
        const float* qkv, int ld, elem_t* out, const elem_t* k_cache, const elem_t* v_cache,                 \
        const u32* positions, const u32* block_tables, int max_blocks, int block_size, int nh, int nkv,      \
        int hd, float scale, float* part, u32* counters) {                                                   \
        decode_attention_impl<THREADS>(qkv, ld, out, k_cache, v_cache, positions, block_tables, max_blocks, \
                                       block_size, nh, nkv, hd, scale, part, counters);                     \
    }
DECODE_ATTENTION(decode_attention, DA_THREADS)
DECODE_ATTENTION(decode_attention_wide, DA_WIDE_THREADS)

// gu: [T, 2I] f32 (gate then up); out: [T, I] elem_t = silu(gate) * up
// Rows over blockIdx.y (strided: a grid has at most 65535 rows), columns over x: no division
// per element. With I a multiple of 4, four columns a thread (16-byte loads).
// gu: [T, 2I] f32 (gate, up); out: [T, I] elem_t. grid (x, min(T, 65535)).
extern "C" __global__ void silu_mul(const float* gu, elem_t* out, int I, int T) {
    pdl_begin();
    int step = 4 * gridDim.x * blockDim.x;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const float* g = gu + (size_t)t * 2 * I;
        const float* u = g + I;
        elem_t* o = out + (size_t)t * I;
        for (int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x); i < I; i += step) {
            if ((I & 3) == 0) {
                float4 gv = *(const float4*)(g + i), uv = *(const float4*)(u + i);
                uint2 r;
                r.x = pack2(gv.x / (1.f + __expf(-gv.x)) * uv.x, gv.y / (1.f + __expf(-gv.y)) * uv.y);
                r.y = pack2(gv.z / (1.f + __expf(-gv.z)) * uv.z, gv.w / (1.f + __expf(-gv.w)) * uv.w);
                *(uint2*)(o + i) = r;
            } else {
                for (int k = i; k < min(i + 4, I); k++) o[k] = f2e(g[k] / (1.f + __expf(-g[k])) * u[k]);
            }
        }
    }
}

// y: [T, ldy] f32 += bias[N] (elem_t). grid (x, min(T, 65535)), rows strided as silu_mul's.
extern "C" __global__ void add_bias(float* y, const elem_t* bias, int N, int T, int ldy) {
    pdl_begin();
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        for (int o = blockIdx.x * blockDim.x + threadIdx.x; o < N; o += gridDim.x * blockDim.x) {
            y[(size_t)t * ldy + o] += e2f(bias[o]);
        }
    }
}

// BGMV shrink for many tokens (prefill): one warp per (token, rank row), 8 rows per block.
// Same contract as lora_shrink below (the decode version); grid (T, nsub, ceil(R / 8)), 256
// threads.
extern "C" __global__ void lora_shrink_wide(const elem_t* __restrict__ x, const elem_t* __restrict__ A,
                                       const int* ranks, const float* scales, const int* tok_slot, float* tmp,
                                       int T, int K, int R, int L) {
    pdl_begin();
    int t = blockIdx.x, z = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int r = blockIdx.z * 8 + warp;
    if (r >= R) return;
    int s = tok_slot[t];
    float* o = tmp + ((size_t)z * T + t) * R + r;
    if (s < 0 || r >= ranks[z * L + s]) {
        if (lane == 0) *o = 0.f;
        return;
    }
    int K8 = K >> 3;
    const uint4* a = (const uint4*)(A + (((size_t)z * L + s) * R + r) * K);
    const uint4* xr = (const uint4*)(x + (size_t)t * K);
    float acc = 0.f;
#pragma unroll 8
    for (int k = lane; k < K8; k += 32) acc += dot8(__ldg(a + k), __ldg(xr + k));
    acc = warp_sum(acc);
    if (lane == 0) *o = acc * scales[z * L + s];
}

// BGMV shrink, every token its own adapter: tmp[z, t, r] = scale[z, s] · x[t] · A[z, s, r]ᵀ with
// s = tok_slot[t], for the nsub projections of a group that share the input x (q/k/v, gate/up).
// One block per (token, projection, SHRINK_ROWS rank rows): its threads split K, and each x
// vector serves the block's rows. Rows r >= rank (or tokens without adapter) write 0 and read
// no weights, so a small adapter does not pay max rank. The slot table and A are written before
// the step, so the first SHRINK_PRE vectors of each row are loaded before waiting on the kernel
// ahead (programmatic dependent launch): for K <= 256 * 8 * SHRINK_PRE the whole of A is in
// flight while that kernel drains, and the block's critical path is x and the reduction.
// x: [T, K] elem_t; A: [nsub, L, R, K] elem_t; ranks: [nsub, L]; scales: [nsub, L];
// tok_slot: [T] (-1: none); tmp: [nsub, T, R] f32. grid (T, nsub, ceil(R / SHRINK_ROWS)), 256 threads.
#define SHRINK_ROWS 4
#define SHRINK_PRE 2
extern "C" __global__ void __launch_bounds__(256) lora_shrink(const elem_t* __restrict__ x,
                                                              const elem_t* __restrict__ A, const int* ranks,
                                                              const float* scales, const int* tok_slot, float* tmp,
                                                              int T, int K, int R, int L) {
    int t = blockIdx.x, z = blockIdx.y, r0 = blockIdx.z * SHRINK_ROWS;
    int s = tok_slot[t];
    int rank = s >= 0 ? ranks[z * L + s] : 0;
    int K8 = K >> 3;
    const uint4* a = (const uint4*)(A + (((size_t)z * L + (s >= 0 ? s : 0)) * R + r0) * K);
    uint4 pre[SHRINK_ROWS][SHRINK_PRE];
#pragma unroll
    for (int i = 0; i < SHRINK_ROWS; i++)
#pragma unroll
        for (int j = 0; j < SHRINK_PRE; j++) {
            int k = threadIdx.x + j * blockDim.x;
            pre[i][j] = r0 + i < rank && k < K8 ? __ldg(a + (size_t)i * K8 + k) : make_uint4(0, 0, 0, 0);
        }
    pdl_begin();
    float acc[SHRINK_ROWS];
#pragma unroll
    for (int i = 0; i < SHRINK_ROWS; i++) acc[i] = 0.f;
    if (r0 < rank) {
        const uint4* xr = (const uint4*)(x + (size_t)t * K);
#pragma unroll
        for (int j = 0; j < SHRINK_PRE; j++) {
            int k = threadIdx.x + j * blockDim.x;
            if (k < K8) {
                uint4 xv = __ldg(xr + k);
#pragma unroll
                for (int i = 0; i < SHRINK_ROWS; i++) acc[i] += dot8(pre[i][j], xv);
            }
        }
        for (int k = threadIdx.x + SHRINK_PRE * blockDim.x; k < K8; k += blockDim.x) {
            uint4 xv = __ldg(xr + k);
#pragma unroll
            for (int i = 0; i < SHRINK_ROWS; i++)
                if (r0 + i < rank) acc[i] += dot8(__ldg(a + (size_t)i * K8 + k), xv);
        }
    }
    // Sum each row over the block: warps first, then one warp over the warps' partials.
    __shared__ float part[SHRINK_ROWS][8];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < SHRINK_ROWS; i++) {
        float v = warp_sum(acc[i]);
        if (lane == 0) part[i][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < SHRINK_ROWS && r0 + (int)threadIdx.x < R) {
        int i = threadIdx.x;
        float v = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) v += part[i][w];
        tmp[((size_t)z * T + t) * R + r0 + i] = r0 + i < rank ? v * scales[z * L + s] : 0.f;
    }
}

// BGMV expand: y[t, o] += tmp[z(o), t, :rank] · B[s, o, :rank], s = tok_slot[t]. The group's
// projections are concatenated along N: outputs below n1 belong to sub 0, below n2 to sub 1,
// the rest to sub 2. Only the slot's own rank is read (in chunks of 8; padding is zero).
// tmp: [nsub, T, R]; B: [L, N, R] elem_t; y: [T, ldy] f32. grid (ceil(N / 256), T), 256 threads.
extern "C" __global__ void lora_expand(const float* tmp, const elem_t* __restrict__ B, const int* ranks,
                                       const int* tok_slot, float* y, int T, int N, int R, int L, int ldy, int n1,
                                       int n2) {
    pdl_begin();
    int t = blockIdx.y, o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= N) return;
    int s = tok_slot[t];
    if (s < 0) return;
    int z = o < n1 ? 0 : (o < n2 ? 1 : 2);
    int rank = ranks[z * L + s];
    if (rank == 0) return;
    const float* tr = tmp + ((size_t)z * T + t) * R;
    float acc = lora_dot(tr, B + ((size_t)s * N + o) * R, rank);
    y[(size_t)t * ldy + o] += acc;
}
