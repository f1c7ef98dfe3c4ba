// eplb_pynccl row-copy kernel: one launch copies a whole phase, a device table of
// (src, dst, nbytes) triples (u64 each), either `count` independent entries (starts null) or
// cut into `waves` waves: wave w is entries
// [starts[w], starts[w + 1]), independent of each other (no entry reads bytes another of its
// wave writes); wave w + 1 starts once every block has finished wave w (a grid-wide barrier on
// the two counters at `sync`, which start at zero and are zero again when the kernel ends).
// The barrier needs every block resident at once: the launcher keeps the grid within the
// device's multiprocessors. Block b handles entries starts[w] + b, + gridDim.x, ...; the
// threads of a block copy one entry together in the widest word (16, 8, 4, 2 or 1 bytes) that
// the source and destination share an alignment for, after a head of single bytes, then a
// tail of single bytes. Loads bypass L1 (ld.global.cg): a wave may read bytes another block
// wrote in an earlier wave of the same launch.
typedef unsigned long long u64;

template <typename W>
__device__ __forceinline__ void copy_words(char* dst, const char* src, u64 nwords) {
  const W* s = reinterpret_cast<const W*>(src);
  W* d = reinterpret_cast<W*>(dst);
  const u64 stride = blockDim.x;
  u64 i = threadIdx.x;
  for (; i + 3 * stride < nwords; i += 4 * stride) {
    W a = __ldcg(s + i);
    W b = __ldcg(s + i + stride);
    W c = __ldcg(s + i + 2 * stride);
    W e = __ldcg(s + i + 3 * stride);
    __stcs(d + i, a);
    __stcs(d + i + stride, b);
    __stcs(d + i + 2 * stride, c);
    __stcs(d + i + 3 * stride, e);
  }
  for (; i < nwords; i += stride) __stcs(d + i, __ldcg(s + i));
}

__device__ __forceinline__ void copy_bytes(char* dst, const char* src, u64 n) {
  for (u64 i = threadIdx.x; i < n; i += blockDim.x) __stcs(dst + i, __ldcg(src + i));
}

__device__ __forceinline__ void copy_entry(const u64* __restrict__ table, u64 e) {
  const u64 src = table[3 * e];
  const u64 dst = table[3 * e + 1];
  const u64 n = table[3 * e + 2];
  u64 w = 16;
  while (w > 1 && ((((src ^ dst) & (w - 1)) != 0) || n < w)) w >>= 1;
  u64 head = (w - (src & (w - 1))) & (w - 1);
  if (head > n) head = n;
  const u64 words = (n - head) / w;
  const u64 tail = n - head - words * w;
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  copy_bytes(d, s, head);
  d += head;
  s += head;
  switch (w) {
    case 16: copy_words<uint4>(d, s, words); break;
    case 8: copy_words<u64>(d, s, words); break;
    case 4: copy_words<unsigned int>(d, s, words); break;
    case 2: copy_words<unsigned short>(d, s, words); break;
    default: copy_words<char>(d, s, words); break;
  }
  copy_bytes(d + words * w, s + words * w, tail);
}

// Every block has arrived `waves_done` times: the writes of the waves before are visible.
__device__ __forceinline__ void grid_barrier(u64* sync, u64 waves_done) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(sync, 1ULL);
    const u64 target = waves_done * gridDim.x;
    while (*reinterpret_cast<volatile u64*>(sync) < target) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();
}

extern "C" __global__ void __launch_bounds__(1024)
eplb_rowcopy(const u64* __restrict__ table, unsigned int count, const u64* __restrict__ starts,
             unsigned int waves, u64* sync) {
  if (starts == nullptr) {  // one wave: entries [0, count)
    for (u64 e = blockIdx.x; e < count; e += gridDim.x) copy_entry(table, e);
    return;
  }
  for (unsigned int w = 0; w < waves; ++w) {
    if (w) grid_barrier(sync, w);
    const u64 end = starts[w + 1];
    for (u64 e = starts[w] + blockIdx.x; e < end; e += gridDim.x) copy_entry(table, e);
  }
  if (waves > 1 && threadIdx.x == 0) {
    // the last block out resets the counters (every block has passed every barrier)
    if (atomicAdd(sync + 1, 1ULL) == gridDim.x - 1) {
      sync[0] = 0;
      sync[1] = 0;
      __threadfence();
    }
  }
}
