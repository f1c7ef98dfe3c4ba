// eplb_pynccl row-copy kernel: one launch copies every entry of a device table of
// (src, dst, nbytes) triples (u64 each). Entries are independent (no entry reads bytes another
// writes). Block b handles entries b, b + gridDim.x, ...; the threads of a block copy one
// entry together in the widest word (16, 8, 4, 2 or 1 bytes) that the source and destination
// share an alignment for, after a head of single bytes, then a tail of single bytes.
typedef unsigned long long u64;

template <typename W>
__device__ __forceinline__ void copy_words(char* dst, const char* src, u64 nwords) {
  const W* s = reinterpret_cast<const W*>(src);
  W* d = reinterpret_cast<W*>(dst);
  const u64 stride = blockDim.x;
  u64 i = threadIdx.x;
  for (; i + 3 * stride < nwords; i += 4 * stride) {
    W a = __ldcs(s + i);
    W b = __ldcs(s + i + stride);
    W c = __ldcs(s + i + 2 * stride);
    W e = __ldcs(s + i + 3 * stride);
    __stcs(d + i, a);
    __stcs(d + i + stride, b);
    __stcs(d + i + 2 * stride, c);
    __stcs(d + i + 3 * stride, e);
  }
  for (; i < nwords; i += stride) __stcs(d + i, __ldcs(s + i));
}

__device__ __forceinline__ void copy_bytes(char* dst, const char* src, u64 n) {
  for (u64 i = threadIdx.x; i < n; i += blockDim.x) __stcs(dst + i, __ldcs(src + i));
}

extern "C" __global__ void __launch_bounds__(1024)
eplb_rowcopy(const u64* __restrict__ table, unsigned int count) {
  for (unsigned int e = blockIdx.x; e < count; e += gridDim.x) {
    const u64 src = table[3 * (u64)e];
    const u64 dst = table[3 * (u64)e + 1];
    const u64 n = table[3 * (u64)e + 2];
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
}
