// Sampling on the device, a block a row (sampling.rs has the semantics). Compiled after
// prelude.cuh.

#define SAMPLE_THREADS 1024
#define ROW_WORDS 8

// A u32 whose unsigned order is the float order (-inf lowest), so a threshold on the logit is
// an integer bisection.
__device__ __forceinline__ u32 order_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A logit as the sampler reads it: NaN counts as -inf (never drawn).
__device__ __forceinline__ float logit_at(const float* x, int i) {
    float v = x[i];
    return v > -INFINITY ? v : -INFINITY;
}

// Unnormalized probability of logit l at inverse temperature inv_t, the row's maximum m at 1.
__device__ __forceinline__ float prob(float l, float m, float inv_t) { return expf((l - m) * inv_t); }

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// Sum over the block of a count; every thread gets it.
__device__ u32 block_count(u32 v) {
    __shared__ u32 part[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    u32 s = 0;
    for (int i = 0; i < (int)(blockDim.x >> 5); i++) s += part[i];
    return s;
}

// Exclusive prefix sum in thread order; *total gets the block's sum. Fixed association, so it is
// the same on every run.
__device__ float block_exclusive_sum(float v, float* total) {
    __shared__ float part[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float s = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float t = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += t;
    }
    float excl = __shfl_up_sync(0xffffffffu, s, 1);
    if (lane == 0) excl = 0.f;
    __syncthreads();
    if (lane == 31) part[warp] = s;
    __syncthreads();
    float before = 0.f, all = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
        if (w < warp) before += part[w];
        all += part[w];
    }
    *total = all;
    return before + excl;
}

// Largest value over the block and its first index (the lower index on ties, as torch.argmax);
// every thread gets both.
__device__ void block_argmax(float* best, int* idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float b = *best;
    int bi = *idx;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, b, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > b || (ov == b && oi < bi)) { b = ov; bi = oi; }
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) { sv[warp] = b; si[warp] = bi; }
    __syncthreads();
    b = sv[0];
    bi = si[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++)
        if (sv[w] > b || (sv[w] == b && si[w] < bi)) { b = sv[w]; bi = si[w]; }
    *best = b;
    *idx = bi;
}

// Per-thread mass of the tokens whose key is at least thr.
__device__ float kept_mass(const float* x, int V, u32 thr, float m, float inv_t) {
    float s = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float l = logit_at(x, i);
        if (order_key(l) >= thr) s += prob(l, m, inv_t);
    }
    return s;
}

// One token per row. logits: [S, V] f32, banned ids set to -inf in place (so logits copied back
// are the ones drawn from); rows: [S, ROW_WORDS] u32 = temperature (f32 bits), top_p (f32 bits),
// top_k (0: off), banned ids [lo, hi) in banned, random (u64, low word first), unused;
// ids: [S]. grid S, SAMPLE_THREADS threads.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(float* logits, int V, const u32* rows,
                                                                       const u32* banned, u32* ids) {
    pdl_begin();
    int tid = threadIdx.x, nt = blockDim.x;
    float* x = logits + (size_t)blockIdx.x * V;
    const u32* r = rows + (size_t)blockIdx.x * ROW_WORDS;
    float temperature = __uint_as_float(r[0]), top_p = __uint_as_float(r[1]);
    u32 top_k = r[2];
    u64 random = (u64)r[5] | ((u64)r[6] << 32);
    for (u32 b = r[3] + tid; b < r[4]; b += nt) {
        u32 id = banned[b];
        if (id < (u32)V) x[id] = -INFINITY;
    }
    // Also makes the block's writes above visible to its reads below.
    __syncthreads();

    float m = -INFINITY;
    int am = 0x7fffffff;
    for (int i = tid; i < V; i += nt) {
        float v = x[i];
        if (v > m) { m = v; am = i; }
    }
    block_argmax(&m, &am);
    if (am >= V) am = 0;  // every logit -inf or NaN: token 0, as the host argmax
    // Greedy; or a temperature so small that 1 / t overflows; or nothing finite to draw from.
    float inv_t = 1.f / temperature;
    if (temperature == 0.f || !(inv_t < INFINITY) || top_k == 1 || !(m > -INFINITY && m < INFINITY)) {
        if (tid == 0) ids[blockIdx.x] = (u32)am;
        return;
    }
    u32 key_max = order_key(m);
    // Tokens whose key is >= thr are kept; order_key(-inf) keeps all.
    u32 thr = order_key(-INFINITY);
    if (top_k > 1 && top_k < (u32)V) {
        // The largest threshold that keeps at least top_k tokens (the k-th largest logit).
        // Invariant: count(lo) >= top_k > count(hi).
        u32 lo = thr, hi = key_max + 1;
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2, c = 0;
            for (int i = tid; i < V; i += nt) c += order_key(logit_at(x, i)) >= mid ? 1u : 0u;
            if (block_count(c) >= top_k) lo = mid; else hi = mid;
        }
        thr = lo;
    }
    if (top_p < 1.f) {
        // The largest threshold that still keeps top_p of the top-k mass: the smallest set of
        // most likely tokens reaching top_p. Invariant: mass(lo) >= want > mass(hi).
        float want = top_p * block_sum(kept_mass(x, V, thr, m, inv_t));
        u32 lo = thr, hi = key_max + 1;
        while (hi - lo > 1) {
            u32 mid = lo + (hi - lo) / 2;
            if (block_sum(kept_mass(x, V, mid, m, inv_t)) >= want) lo = mid; else hi = mid;
        }
        thr = lo;
    }

    // The draw: target = u * total mass; the thread whose slice of the prefix sum (in thread
    // order, then index order within a thread) holds the target walks its tokens.
    float total, part = kept_mass(x, V, thr, m, inv_t);
    float excl = block_exclusive_sum(part, &total);
    float target = (float)(splitmix64(random) >> 40) * (1.f / 16777216.f) * total;
    __shared__ int first, last;
    if (tid == 0) { first = nt; last = -1; }
    __syncthreads();
    if (part > 0.f) {
        atomicMax(&last, tid);
        if (target < excl + part) atomicMin(&first, tid);
    }
    __syncthreads();
    // Past the total (float rounding) the last thread with mass takes its last kept token.
    // The maximum's mass is 1, so some thread has mass; thread 0 writes the argmax otherwise.
    int owner = first < nt ? first : (last >= 0 ? last : 0);
    if (tid == owner) {
        float rest = target - excl;
        int pick = am;
        for (int i = tid; i < V; i += nt) {
            float l = logit_at(x, i);
            if (order_key(l) < thr) continue;
            float p = prob(l, m, inv_t);
            if (p <= 0.f) continue;
            pick = i;
            if (rest < p) break;
            rest -= p;
        }
        ids[blockIdx.x] = (u32)pick;
    }
}
