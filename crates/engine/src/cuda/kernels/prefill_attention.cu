// Causal attention for prefill and mixed steps on tensor cores (FlashAttention-2 style), over
// the paged KV cache. Compiled by NVRTC after prelude.cuh (elem_t, mma_16816,
// pack2, pdl_*).
//
// A block takes one tile of query rows of one sequence and one KV head: the tile's rows are
// (token, query head of the KV head's group) pairs, token-major, so the group's heads share
// every K/V tile it loads (each KV head is read once per group, not once per query head). Each
// of WARPS warps takes MT row tiles of 16 (ROWS = 16 * MT * WARPS rows: that over group tokens);
// a warp's K and V fragments serve all its MT row tiles. Keys stream through shared memory BN at
// a time from the paged cache (the step's own keys included: the RoPE kernel ahead wrote them),
// so a chunk of a prompt whose earlier part was computed by earlier steps is no special case.
// Per key tile: S = Q·Kᵀ (mma), causal mask, online softmax in registers (the row statistics
// of a warp's 16-row tile live in the 4 lanes that hold each row), then O += P·V with P taken
// straight from S's accumulator fragments (their layout is the A operand's).
//
// Q (scaled into the base-2 softmax, as elem_t) sits in shared memory for the whole block; K and
// V tiles are loaded with cp.async (16 bytes a lane; keys past the tile's last context position
// and dims past hd are zero-filled) in two stages: tile j + 1 loads while tile j is computed.
// Rows are HD elements whose 16-byte chunks are XOR-swizzled by (row & 7), so the 8 rows an
// ldmatrix reads hit 8 different bank groups. Shared memory: (ROWS + 4 BN) * HD * 2 bytes.
//
// Split context (FlashDecoding's idea, for tiles that are few but long: a chunk of a long prompt
// over its cached context): a tile's keys may be cut into pieces, each its own block, which
// writes its unnormalized O and its rows' running max and sum to `part`;
// prefill_attention_merge then combines the pieces of each tile into `out`.
//
// Inputs: qkv [T, ld] f32 (q already rotated), k_cache / v_cache [slots, nkv * hd] elem_t,
// tiles [num_tiles, 4] (first token, end token: one sequence, at most ROWS / group tokens; then
// the piece's keys [key_lo, key_hi), key_lo a multiple of BN, key_hi a multiple of BN or past the
// tile's last position, or key_hi = 0xffffffff: the whole causal range, no piece), token_seq [T],
// positions [T], block_tables [S, max_blocks]. Output: out [T, nh * hd] elem_t, or for a piece
// in row i of tiles: part[i * nkv + kv head] = (O [ROWS, HD], max [ROWS], sum [ROWS]) f32.
// grid (num_tiles, nkv), 32 * WARPS threads. hd: a multiple of 8, at most HD.
// scale_log2: softmax scale · log2(e).

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

// Keys [key0, key0 + BN) of one KV head, K into `kd` and V into `vd` (swizzled tiles); keys from
// key_end on and dims from hd on are zeros (so P·V never multiplies stale shared memory, which
// could hold NaN). A thread's chunks share one column, so it looks up each key's slot once.
template <int HD, int BN, int THREADS>
__device__ __forceinline__ void fa_load_kv(u32 kd, u32 vd, const elem_t* k_cache, const elem_t* v_cache,
                                           const u32* table, int block_size, int key0, int key_end, int kvs,
                                           int kv_off, int hd) {
    constexpr int CH = HD / 8;
    static_assert(THREADS % CH == 0 && (BN * CH) % THREADS == 0, "whole rows a pass");
    int c = threadIdx.x % CH;
    bool pow2 = (block_size & (block_size - 1)) == 0;
    int shift = __ffs(block_size) - 1;
#pragma unroll
    for (int i = 0; i < BN * CH / THREADS; i++) {
        int row = threadIdx.x / CH + i * (THREADS / CH), key = key0 + row;
        int bytes = 0;
        size_t off = 0;
        if (key < key_end && c * 8 < hd) {
            int blk = pow2 ? key >> shift : key / block_size;
            int in = key - blk * block_size;
            off = ((size_t)table[blk] * block_size + in) * kvs + kv_off + c * 8;
            bytes = 16;
        }
        cp_async16(kd + tile_off<HD>(row, c), k_cache + off, bytes);
        cp_async16(vd + tile_off<HD>(row, c), v_cache + off, bytes);
    }
}

template <int HD, int WARPS, int MT, int BN>
__device__ __forceinline__ void prefill_attention_impl(const float* qkv, int ld, elem_t* out, const elem_t* k_cache,
                                                       const elem_t* v_cache, const u32* tiles, const u32* token_seq,
                                                       const u32* positions, const u32* block_tables, int max_blocks,
                                                       int block_size, int nh, int nkv, int hd, float scale_log2,
                                                       float* part) {
    constexpr int THREADS = 32 * WARPS, ROWS = 16 * MT * WARPS, CH = HD / 8, NT = BN / 8;
    constexpr u32 QBYTES = ROWS * HD * 2, TILE = BN * HD * 2;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    // Q, then stage i's K at QBYTES + 2i TILE and its V after it.
    const u32 qs = smem_addr(fa_smem);
    int kvh = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q4 = lane & 3;
    int mi = lane >> 3, mr = lane & 7;  // ldmatrix: lane supplies row mr of matrix mi
    int group = nh / nkv, kvs = nkv * hd, kv_off = kvh * hd;
    pdl_begin();
    const u32* tile = tiles + 4 * (size_t)blockIdx.x;
    int tok0 = (int)tile[0], tok1 = (int)tile[1];
    bool is_piece = tile[3] != 0xffffffffu;
    const u32* table = block_tables + (size_t)token_seq[tok0] * max_blocks;
    int key_end = (int)positions[tok1 - 1] + 1, min_pos = (int)positions[tok0];
    if (is_piece) key_end = min(key_end, (int)tile[3]);
    int j0 = (int)tile[2] / BN, num_kt = (key_end + BN - 1) / BN;
    // Row r of the tile: token tok0 + r / group, head kvh * group + r % group (padding past).
    int valid_rows = min((ROWS / group) * group, (tok1 - tok0) * group);
    auto kv_stage = [&](int j) { return qs + QBYTES + 2 * (u32)(j & 1) * TILE; };
    fa_load_kv<HD, BN, THREADS>(kv_stage(j0), kv_stage(j0) + TILE, k_cache, v_cache, table, block_size, j0 * BN,
                                key_end, kvs, kv_off, hd);
    cp_async_commit();
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += THREADS) {
        int row = idx / CH, c = idx % CH, d = 8 * c;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < valid_rows && d < hd) {
            const float* q = qkv + (size_t)(tok0 + row / group) * ld + (size_t)(kvh * group + row % group) * hd + d;
            float4 a = *(const float4*)q, b = *(const float4*)(q + 4);
            v.x = pack2(a.x * scale_log2, a.y * scale_log2);
            v.y = pack2(a.z * scale_log2, a.w * scale_log2);
            v.z = pack2(b.x * scale_log2, b.y * scale_log2);
            v.w = pack2(b.z * scale_log2, b.w * scale_log2);
        }
        asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(qs + tile_off<HD>(row, c)), "r"(v.x), "r"(v.y),
                     "r"(v.z), "r"(v.w)
                     : "memory");
    }

    // This lane's rows: g and g + 8 of each of its warp's MT row tiles.
    float o[MT][HD / 8][4], m[MT][2], l[MT][2];
    int pos[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int row = (warp * MT + mt) * 16 + g + 8 * r;
            pos[mt][r] = row < valid_rows ? (int)positions[tok0 + row / group] : -1;
            m[mt][r] = -INFINITY;
            l[mt][r] = 0.f;
        }
#pragma unroll
        for (int dt = 0; dt < HD / 8; dt++) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    }

    for (int j = j0; j < num_kt; j++) {
        int key0 = j * BN;
        if (j + 1 < num_kt) {
            fa_load_kv<HD, BN, THREADS>(kv_stage(j + 1), kv_stage(j + 1) + TILE, k_cache, v_cache, table, block_size,
                                        key0 + BN, key_end, kvs, kv_off, hd);
            cp_async_commit();
            cp_async_wait_one();
        } else {
            cp_async_wait_all();
        }
        __syncthreads();  // tile j (and Q) in
        const u32 ks = kv_stage(j), vs = ks + TILE;

        // S = Q·Kᵀ. Q's A fragments: matrices (rows 0-7, dims 16kc..), (8-15, 16kc..), (0-7,
        // 16kc+8..), (8-15, 16kc+8..). K's: (keys 16np.., dims 16kc..), (16np.., 16kc+8..),
        // (16np+8.., 16kc..), (16np+8.., 16kc+8..) are b0, b1 of column tiles 2np, 2np + 1.
        float s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
        }
#pragma unroll
        for (int kc = 0; kc < HD / 16; kc++) {
            u32 qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                int row = (warp * MT + mt) * 16 + mr + 8 * (mi & 1);
                ldsm_x4(qs + tile_off<HD>(row, 2 * kc + (mi >> 1)), qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3]);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(ks + tile_off<HD>(16 * np + mr + 8 * (mi >> 1), 2 * kc + (mi & 1)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(s[mt][2 * np], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], b0, b1);
                    mma_16816(s[mt][2 * np + 1], qa[mt][0], qa[mt][1], qa[mt][2], qa[mt][3], b2, b3);
                }
            }
        }
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            // Causal mask (also masks padding rows, position -1), where some key passes some row.
            if (key0 + BN - 1 > min_pos) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        if (key0 + 8 * nt + 2 * q4 + (e & 1) > pos[mt][e >> 1]) s[mt][nt][e] = -INFINITY;
                    }
                }
            }
            // Online softmax: the row max over the tile (4 lanes share a row), rescale, exponentiate.
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = -INFINITY;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float mn = fmaxf(m[mt][r], mx);
                // A row with no key yet (all masked) keeps base 0: exp2(-inf) = 0, never NaN.
                float base = mn == -INFINITY ? 0.f : mn;
                float corr = fast_exp2(m[mt][r] - base), sum = 0.f;
                m[mt][r] = mn;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    s[mt][nt][2 * r] = fast_exp2(s[mt][nt][2 * r] - base);
                    s[mt][nt][2 * r + 1] = fast_exp2(s[mt][nt][2 * r + 1] - base);
                    sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
                }
                l[mt][r] = l[mt][r] * corr + sum;
#pragma unroll
                for (int dt = 0; dt < HD / 8; dt++) {
                    o[mt][dt][2 * r] *= corr;
                    o[mt][dt][2 * r + 1] *= corr;
                }
            }
        }

        // O += P·V: P's A fragments are S's accumulators of column tiles 2kk and 2kk + 1;
        // transposed matrices (keys 16kk.., dims 16dp..), (16kk+8.., 16dp..), (16kk.., 16dp+8..),
        // (16kk+8.., 16dp+8..) are b0, b1 of O's column tiles 2dp and 2dp + 1.
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                pa[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pa[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pa[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pa[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_trans(vs + tile_off<HD>(16 * kk + mr + 8 * (mi & 1), 2 * dp + (mi >> 1)), b0, b1, b2, b3);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_16816(o[mt][2 * dp], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b0, b1);
                    mma_16816(o[mt][2 * dp + 1], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3], b2, b3);
                }
            }
        }
        __syncthreads();  // every warp is done with tile j's stage before tile j + 2 loads into it
    }

    // A piece: this block's slot of `part`, O [ROWS, HD] then the rows' max and sum.
    float* piece = part + ((size_t)blockIdx.x * nkv + kvh) * ROWS * (HD + 2);
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float sum = l[mt][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            if (pos[mt][r] < 0) continue;
            int row = (warp * MT + mt) * 16 + g + 8 * r;
            if (is_piece) {
                // Rows with no key in the piece keep max -inf, sum 0 and O 0 (the merge weighs them 0).
                float* po = piece + (size_t)row * HD;
#pragma unroll
                for (int dt = 0; dt < HD / 8; dt++) {
                    int d = 8 * dt + 2 * q4;
                    if (d < hd) *(float2*)(po + d) = make_float2(o[mt][dt][2 * r], o[mt][dt][2 * r + 1]);
                }
                if (q4 == 0) {
                    piece[ROWS * HD + row] = m[mt][r];
                    piece[ROWS * HD + ROWS + row] = sum;
                }
                continue;
            }
            float inv = 1.f / sum;
            elem_t* dst = out + (size_t)(tok0 + row / group) * nh * hd + (size_t)(kvh * group + row % group) * hd;
#pragma unroll
            for (int dt = 0; dt < HD / 8; dt++) {
                int d = 8 * dt + 2 * q4;
                if (d < hd) *(u32*)(dst + d) = pack2(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
            }
        }
    }
}

#define FA_PARAMS                                                                                            \
    const float *qkv, int ld, elem_t *out, const elem_t *k_cache, const elem_t *v_cache, const u32 *tiles, \
        const u32 *token_seq, const u32 *positions, const u32 *block_tables, int max_blocks, int block_size, \
        int nh, int nkv, int hd, float scale_log2, float *part
#define FA_ARGS                                                                                              \
    qkv, ld, out, k_cache, v_cache, tiles, token_seq, positions, block_tables, max_blocks, block_size, nh, nkv, \
        hd, scale_log2, part
// prefill_attention_<HD>_w<WARPS>_m<MT>_n<BN>
#define FA_KERNEL(HD, WARPS, MT, BN)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) prefill_attention_##HD##_w##WARPS##_m##MT##_n##BN( \
        FA_PARAMS) {                                                                                         \
        prefill_attention_impl<HD, WARPS, MT, BN>(FA_ARGS);                                                  \
    }
FA_KERNEL(64, 4, 1, 64)
FA_KERNEL(128, 4, 2, 64)

// Combines the pieces of split tiles: merges [num_merges, 4] (first token, end token, the
// tile's first piece row in `tiles`, number of pieces: consecutive rows), part as the attention
// kernel writes it for a variant of `rows` rows and `hd_pad` dims. out [T, nh * hd] elem_t.
// grid (num_merges, nkv), 128 threads.
extern "C" __global__ void __launch_bounds__(128) prefill_attention_merge(const float* part, const u32* merges,
                                                                           elem_t* out, int nh, int nkv, int hd,
                                                                           int rows, int hd_pad) {
    pdl_begin();
    const u32* mg = merges + 4 * (size_t)blockIdx.x;
    int tok0 = (int)mg[0], tok1 = (int)mg[1], first = (int)mg[2], np = (int)mg[3];
    int kvh = blockIdx.y, group = nh / nkv;
    int valid_rows = min((rows / group) * group, (tok1 - tok0) * group);
    size_t slot = (size_t)rows * (hd_pad + 2), stride = (size_t)nkv * slot;
    const float* p0 = part + ((size_t)first * nkv + kvh) * slot;
    const float *mx = p0 + (size_t)rows * hd_pad, *sm = mx + rows;
    for (int idx = threadIdx.x; idx < valid_rows * hd; idx += blockDim.x) {
        int row = idx / hd, d = idx - row * hd;
        // Piece 0 holds key 0, which every row sees: the max is finite.
        float big = -INFINITY;
        for (int p = 0; p < np; p++) big = fmaxf(big, mx[p * stride + row]);
        float o = 0.f, l = 0.f;
        for (int p = 0; p < np; p++) {
            float w = exp2f(mx[p * stride + row] - big);  // exp2(-inf) = 0: a piece without keys
            l += w * sm[p * stride + row];
            o += w * p0[p * stride + (size_t)row * hd_pad + d];
        }
        out[(size_t)(tok0 + row / group) * nh * hd + (size_t)(kvh * group + row % group) * hd + d] = f2e(o / l);
    }
}
