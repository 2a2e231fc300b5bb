// Causal attention for prefill and mixed steps on tensor cores (FlashAttention-2 style), over
// the paged KV cache. Compiled by NVRTC after the PRELUDE of kernels.rs (elem_t, mma_16816,
// pack2, pdl_*).
//
// A block takes one tile of query rows of one sequence and one KV head: the tile's rows are
// (token, query head of the KV head's group) pairs, token-major, so the group's heads share
// every K/V tile it loads (each KV head is read once per group, not once per query head). WARPS
// warps take 16 rows each (16 * WARPS rows: that over group tokens). Keys stream through shared
// memory FA_BN at a time from the paged cache (the step's own keys included: the RoPE kernel
// ahead wrote them), so a chunk of a prompt whose earlier part was computed by earlier steps is
// no special case. Per key tile: S = Q·Kᵀ (mma), causal mask, online softmax in registers (the
// row statistics of a warp's 16 rows live in the 4 lanes that hold each row), then O += P·V
// with P taken straight from S's accumulator fragments (their layout is the A operand's).
//
// K and V tiles are loaded with cp.async (16 bytes a lane; keys past the tile's last context
// position and dims past hd are zero-filled) into rows of HD elements whose 16-byte chunks are
// XOR-swizzled by (row & 7), so the 8 rows an ldmatrix reads hit 8 different bank groups. With
// one stage, V's load overlaps Q·Kᵀ and the next K's load overlaps P·V (32 KB at HD = 128); with
// two, tile j + 1's K and V load while tile j is computed (64 KB, dynamic shared memory).
//
// Inputs: qkv [T, ld] f32 (q already rotated), k_cache / v_cache [slots, nkv * hd] elem_t,
// tiles [num_tiles, 2] (first token, end token; one sequence each, at most 16 * WARPS / group
// tokens), token_seq [T], positions [T], block_tables [S, max_blocks]. Output: out [T, nh * hd]
// elem_t. grid (num_tiles, nkv), 32 * WARPS threads, STAGES * 2 * FA_BN * HD * 2 bytes of
// dynamic shared memory. hd: a multiple of 8, at most HD. scale_log2: softmax scale · log2(e)
// (the softmax runs in base 2).
#define FA_BN 64

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16 bytes global -> shared, asynchronously; `bytes` < 16 zero-fills the rest (0: all zeros).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
// All but the newest group of copies done.
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// Byte offset of chunk c (8 elements) of row `row` in a swizzled tile of HD-element rows.
template <int HD>
__device__ __forceinline__ u32 tile_off(int row, int c) {
    return (u32)(row * (HD / 8) + (c ^ (row & 7))) * 16u;
}

// Keys [key0, key0 + FA_BN) of one KV head into a swizzled tile; keys from key_end on and dims
// from hd on are zeros (so P·V never multiplies stale shared memory, which could hold NaN).
template <int HD, int THREADS>
__device__ __forceinline__ void fa_load_tile(u32 dst, const elem_t* cache, const u32* table, int block_size,
                                             int key0, int key_end, int kvs, int kv_off, int hd) {
    constexpr int CH = HD / 8;
#pragma unroll
    for (int i = 0; i < FA_BN * CH / THREADS; i++) {
        int idx = threadIdx.x + i * THREADS;
        int row = idx / CH, c = idx % CH, key = key0 + row;
        const elem_t* src = cache;
        int bytes = 0;
        if (key < key_end && c * 8 < hd) {
            size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
            src = cache + slot * kvs + kv_off + c * 8;
            bytes = 16;
        }
        cp_async16(dst + tile_off<HD>(row, c), src, bytes);
    }
}

// One lane's share of a block's state: its two rows (g and g + 8 of its warp's 16), their
// running max and sum, and its part of O.
template <int HD>
struct FaRows {
    float o[HD / 8][4];
    float m[2], l[2];
    int pos[2];
};

// S = Q·Kᵀ for key tile `key0` (K in ks), causal mask, online softmax: leaves P (unnormalized
// probabilities, base 2) in s and rescales O. Matrices (keys 16np.., dims 16kc..), (16np..,
// 16kc+8..), (16np+8.., 16kc..), (16np+8.., 16kc+8..) are b0, b1 of S's column tiles 2np, 2np + 1.
template <int HD>
__device__ __forceinline__ void fa_scores(FaRows<HD>& st, float (&s)[FA_BN / 8][4], const u32 (&qa)[HD / 16][4],
                                          u32 ks, int key0, int min_pos) {
    constexpr int NT = FA_BN / 8;
    int lane = threadIdx.x & 31, q4 = lane & 3, mi = lane >> 3, mr = lane & 7;
#pragma unroll
    for (int nt = 0; nt < NT; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int np = 0; np < NT / 2; np++) {
#pragma unroll
        for (int kc = 0; kc < HD / 16; kc++) {
            u32 b0, b1, b2, b3;
            ldsm_x4(ks + tile_off<HD>(16 * np + mr + 8 * (mi >> 1), 2 * kc + (mi & 1)), b0, b1, b2, b3);
            mma_16816(s[2 * np], qa[kc][0], qa[kc][1], qa[kc][2], qa[kc][3], b0, b1);
            mma_16816(s[2 * np + 1], qa[kc][0], qa[kc][1], qa[kc][2], qa[kc][3], b2, b3);
        }
    }
    // Causal mask (also masks padding rows, position -1), where some key passes some row.
    if (key0 + FA_BN - 1 > min_pos) {
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                if (key0 + 8 * nt + 2 * q4 + (e & 1) > st.pos[e >> 1]) s[nt][e] = -INFINITY;
            }
        }
    }
    // Online softmax: the row max over the tile (4 lanes share a row), rescale, exponentiate.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        float mn = fmaxf(st.m[r], mx);
        // A row with no key yet (all masked) keeps base 0: exp2(-inf) = 0, never NaN.
        float base = mn == -INFINITY ? 0.f : mn;
        float corr = fast_exp2(st.m[r] - base), sum = 0.f;
        st.m[r] = mn;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][2 * r] = fast_exp2(s[nt][2 * r] - base);
            s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - base);
            sum += s[nt][2 * r] + s[nt][2 * r + 1];
        }
        st.l[r] = st.l[r] * corr + sum;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            st.o[dt][2 * r] *= corr;
            st.o[dt][2 * r + 1] *= corr;
        }
    }
}

// O += P·V (V in vs): P's A fragments are S's accumulators of column tiles 2kk and 2kk + 1;
// transposed matrices (keys 16kk.., dims 16dp..), (16kk+8.., 16dp..), (16kk.., 16dp+8..),
// (16kk+8.., 16dp+8..) are b0, b1 of O's column tiles 2dp and 2dp + 1.
template <int HD>
__device__ __forceinline__ void fa_pv(FaRows<HD>& st, const float (&s)[FA_BN / 8][4], u32 vs) {
    int lane = threadIdx.x & 31, mi = lane >> 3, mr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < FA_BN / 16; kk++) {
        u32 a0 = pack2(s[2 * kk][0], s[2 * kk][1]), a1 = pack2(s[2 * kk][2], s[2 * kk][3]);
        u32 a2 = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]), a3 = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; dp++) {
            u32 b0, b1, b2, b3;
            ldsm_x4_trans(vs + tile_off<HD>(16 * kk + mr + 8 * (mi & 1), 2 * dp + (mi >> 1)), b0, b1, b2, b3);
            mma_16816(st.o[2 * dp], a0, a1, a2, a3, b0, b1);
            mma_16816(st.o[2 * dp + 1], a0, a1, a2, a3, b2, b3);
        }
    }
}

template <int HD, int WARPS, int STAGES>
__device__ __forceinline__ void prefill_attention_impl(const float* qkv, int ld, elem_t* out, const elem_t* k_cache,
                                                       const elem_t* v_cache, const u32* tiles, const u32* token_seq,
                                                       const u32* positions, const u32* block_tables, int max_blocks,
                                                       int block_size, int nh, int nkv, int hd, float scale_log2) {
    constexpr int THREADS = 32 * WARPS, ROWS = 16 * WARPS, TILE = FA_BN * HD * 2;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    // Stage i: K at base + 2i TILE bytes, V after it.
    const u32 base = smem_addr(fa_smem);
    int kvh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
    int group = nh / nkv, kvs = nkv * hd, kv_off = kvh * hd;
    pdl_begin();
    int tok0 = (int)tiles[2 * blockIdx.x], tok1 = (int)tiles[2 * blockIdx.x + 1];
    const u32* table = block_tables + (size_t)token_seq[tok0] * max_blocks;
    int key_end = (int)positions[tok1 - 1] + 1, min_pos = (int)positions[tok0];

    FaRows<HD> st;
    int tok[2], head[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int row = warp * 16 + g + 8 * r, lt = row / group;
        tok[r] = tok0 + lt;
        head[r] = kvh * group + row % group;
        st.pos[r] = (row < (ROWS / group) * group && tok[r] < tok1) ? (int)positions[tok[r]] : -1;
        st.m[r] = -INFINITY;
        st.l[r] = 0.f;
    }
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt++) st.o[dt][0] = st.o[dt][1] = st.o[dt][2] = st.o[dt][3] = 0.f;
    // Q as A fragments, scaled into the base-2 softmax: qa[kc] = (row g, dims 2q4..), (row g+8,
    // dims 2q4..), (row g, dims 2q4+8..), (row g+8, dims 2q4+8..) of 16-dim chunk kc.
    u32 qa[HD / 16][4];
#pragma unroll
    for (int kc = 0; kc < HD / 16; kc++) {
#pragma unroll
        for (int f = 0; f < 4; f++) {
            int r = f & 1, d = 16 * kc + 8 * (f >> 1) + 2 * q4;
            float2 v = make_float2(0.f, 0.f);
            if (st.pos[r] >= 0 && d < hd) v = *(const float2*)(qkv + (size_t)tok[r] * ld + (size_t)head[r] * hd + d);
            qa[kc][f] = pack2(v.x * scale_log2, v.y * scale_log2);
        }
    }

    int num_kt = (key_end + FA_BN - 1) / FA_BN;
    float s[FA_BN / 8][4];
    if (STAGES == 1) {
        const u32 ks = base, vs = base + TILE;
        fa_load_tile<HD, THREADS>(ks, k_cache, table, block_size, 0, key_end, kvs, kv_off, hd);
        cp_async_commit();
        for (int j = 0; j < num_kt; j++) {
            int key0 = j * FA_BN;
            cp_async_wait_all();
            __syncthreads();  // K(j) in; every warp is done with V(j - 1)
            fa_load_tile<HD, THREADS>(vs, v_cache, table, block_size, key0, key_end, kvs, kv_off, hd);
            cp_async_commit();
            fa_scores<HD>(st, s, qa, ks, key0, min_pos);
            cp_async_wait_all();
            __syncthreads();  // V(j) in; every warp is done with K(j)
            if (j + 1 < num_kt) {
                fa_load_tile<HD, THREADS>(ks, k_cache, table, block_size, key0 + FA_BN, key_end, kvs, kv_off, hd);
            }
            cp_async_commit();
            fa_pv<HD>(st, s, vs);
        }
    } else {
        auto load = [&](int j) {
            u32 k = base + 2 * (j & 1) * TILE;
            fa_load_tile<HD, THREADS>(k, k_cache, table, block_size, j * FA_BN, key_end, kvs, kv_off, hd);
            fa_load_tile<HD, THREADS>(k + TILE, v_cache, table, block_size, j * FA_BN, key_end, kvs, kv_off, hd);
            cp_async_commit();
        };
        load(0);
        for (int j = 0; j < num_kt; j++) {
            if (j + 1 < num_kt) {
                load(j + 1);
                cp_async_wait_one();
            } else {
                cp_async_wait_all();
            }
            __syncthreads();  // tile j in
            u32 k = base + 2 * (j & 1) * TILE;
            fa_scores<HD>(st, s, qa, k, j * FA_BN, min_pos);
            fa_pv<HD>(st, s, k + TILE);
            __syncthreads();  // every warp is done with tile j's stage before j + 2 loads into it
        }
    }
    cp_async_wait_all();

#pragma unroll
    for (int r = 0; r < 2; r++) {
        float sum = st.l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (st.pos[r] < 0) continue;
        float inv = 1.f / sum;
        elem_t* dst = out + (size_t)tok[r] * nh * hd + (size_t)head[r] * hd;
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) {
            int d = 8 * dt + 2 * q4;
            if (d < hd) *(u32*)(dst + d) = pack2(st.o[dt][2 * r] * inv, st.o[dt][2 * r + 1] * inv);
        }
    }
}

#define FA_PARAMS                                                                                            \
    const float *qkv, int ld, elem_t *out, const elem_t *k_cache, const elem_t *v_cache, const u32 *tiles, \
        const u32 *token_seq, const u32 *positions, const u32 *block_tables, int max_blocks, int block_size, \
        int nh, int nkv, int hd, float scale_log2
#define FA_ARGS \
    qkv, ld, out, k_cache, v_cache, tiles, token_seq, positions, block_tables, max_blocks, block_size, nh, nkv, hd, scale_log2
// prefill_attention_<HD>_w<WARPS>_s<STAGES>
#define FA_KERNEL(HD, WARPS, STAGES)                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) prefill_attention_##HD##_w##WARPS##_s##STAGES( \
        FA_PARAMS) {                                                                                        \
        prefill_attention_impl<HD, WARPS, STAGES>(FA_ARGS);                                                 \
    }
FA_KERNEL(64, 4, 1)
FA_KERNEL(128, 4, 1)
FA_KERNEL(128, 8, 1)
FA_KERNEL(128, 4, 2)
FA_KERNEL(128, 8, 2)
