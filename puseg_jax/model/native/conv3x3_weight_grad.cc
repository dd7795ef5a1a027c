// Weight gradient of a 3x3 'SAME' stride-1 NHWC convolution, as an XLA FFI handler on the CPU
// (puseg_jax/model/native_conv.py builds it with the machine's compiler and registers it).
//
//   dW[i, j, c, k] = sum_{n, h, w} x[n, h + i - 1, w + j - 1, c] * g[n, h, w, k]   (zero outside)
//
// XLA:CPU computes this as a convolution whose "kernel" is the whole image, about 3x slower than
// oneDNN at large images with few channels (benchmarks/README.md). Here it is a direct sum: for
// each of the nine window offsets, a block of CB input channels by KV vectors of output
// channels is accumulated in registers while the rows of a chunk (about 256 pixels) stream
// past, then added to the result; the output rows are split among the process's cores, each
// with its own partial result, summed at the end. float32 throughout.
#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>
#include <sched.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int V = 16;
constexpr int KV = 2;   // vectors of K per block: 32 floats
constexpr int CB = 12;  // input channels per block: 24 accumulators
#else
constexpr int V = 8;
constexpr int KV = 2;   // 16 floats
constexpr int CB = 6;   // 12 accumulators
#endif
typedef float vec __attribute__((vector_size(V * 4)));

static inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
static inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

// One block: acc[c][v] += x[n, h + i - 1, w + dj, c0 + c] * g[n, h, w, k0 + v*V ...], summed over
// the output rows q0..q1 (row r = n * H + h) and w in [w0, w1); added to dw[c0.., k0..] at the end.
template <int NC, int NKV>
static inline void block(const float* x, const float* g, long q0, long q1, int H, int W, int i,
                         int c0, int k0, int C, int K, int w0, int w1, int dj, float* dw) {
  constexpr int KV = NKV;
  vec acc[NC][KV];
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < KV; ++v) acc[c][v] = vec{};
  for (long r = q0; r < q1; ++r) {
    const int n = r / H, h = r % H, hx = h + i - 1;
    if (hx < 0 || hx >= H) continue;
    const float* grow = g + ((size_t)n * H + h) * W * K + k0;
    const float* xrow = x + ((size_t)n * H + hx) * W * C + c0;
    for (int w = w0; w < w1; ++w) {
      const float* gp = grow + (size_t)w * K;
      vec gv[KV];
      for (int v = 0; v < KV; ++v) gv[v] = load(gp + v * V);
      const float* xp = xrow + (size_t)(w + dj) * C;
      for (int c = 0; c < NC; ++c) {
        vec xb = vec{} + xp[c];
        for (int v = 0; v < KV; ++v) acc[c][v] += xb * gv[v];
      }
    }
  }
  for (int c = 0; c < NC; ++c)
    for (int v = 0; v < KV; ++v) {
      float* d = dw + (size_t)(c0 + c) * K + k0 + v * V;
      store(d, load(d) + acc[c][v]);
    }
}

// All input channels of one offset and one block of NKV vectors of output channels: blocks of
// CB channels, the remainder in the largest blocks that fit (32 channels: 12 + 12 + 8).
template <int NKV>
static inline void cblocks(const float* x, const float* g, long q0, long q1, int H, int W,
                           int i, int k0, int C, int K, int w0, int w1, int dj, float* d) {
  int c0 = 0;
  for (; c0 + CB <= C; c0 += CB)
    block<CB, NKV>(x, g, q0, q1, H, W, i, c0, k0, C, K, w0, w1, dj, d);
  if (CB > 8 && c0 + 8 <= C) {
    block<8, NKV>(x, g, q0, q1, H, W, i, c0, k0, C, K, w0, w1, dj, d);
    c0 += 8;
  }
  if (c0 + 4 <= C) {
    block<4, NKV>(x, g, q0, q1, H, W, i, c0, k0, C, K, w0, w1, dj, d);
    c0 += 4;
  }
  if (c0 + 2 <= C) {
    block<2, NKV>(x, g, q0, q1, H, W, i, c0, k0, C, K, w0, w1, dj, d);
    c0 += 2;
  }
  if (c0 < C) block<1, NKV>(x, g, q0, q1, H, W, i, c0, k0, C, K, w0, w1, dj, d);
}

// Rows r0..r1 of the N*H output rows, in chunks of about 256 pixels so that the accumulators of
// a block are written back once per chunk rather than once per row (small images, many channels).
static void rows(const float* x, const float* g, int N, int H, int W, int C, int K,
                 long r0, long r1, float* dw /* [3, 3, C, K] */) {
  const int KBLK = KV * V;
  const long chunk = std::max(1, 256 / W);
  for (long q0 = r0; q0 < r1; q0 += chunk) {
    const long q1 = std::min(r1, q0 + chunk);
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        const int dj = j - 1;
        const int w0 = std::max(0, -dj), w1 = std::min(W, W - dj);
        float* d = dw + (size_t)(i * 3 + j) * C * K;
        int k0 = 0;
        for (; k0 + KBLK <= K; k0 += KBLK)
          cblocks<KV>(x, g, q0, q1, H, W, i, k0, C, K, w0, w1, dj, d);
        if (KV > 1 && k0 + V <= K) {  // 16 output channels left (AVX-512): one vector
          cblocks<1>(x, g, q0, q1, H, W, i, k0, C, K, w0, w1, dj, d);
          k0 += V;
        }
        for (int k = k0; k < K; ++k)  // fewer than V output channels left: scalar
          for (long r = q0; r < q1; ++r) {
            const int n = r / H, h = r % H, hx = h + i - 1;
            if (hx < 0 || hx >= H) continue;
            const float* grow = g + ((size_t)n * H + h) * W * K;
            const float* xrow = x + ((size_t)n * H + hx) * W * C;
            for (int c = 0; c < C; ++c) {
              float s = 0.f;
              for (int w = w0; w < w1; ++w)
                s += xrow[(size_t)(w + dj) * C + c] * grow[(size_t)w * K + k];
              d[(size_t)c * K + k] += s;
            }
          }
      }
    }
  }
}

static int num_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

static ffi::Error Conv3x3DwImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                                ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4) return ffi::Error::InvalidArgument("rank 4 expected");
  const int N = xd[0], H = xd[1], W = xd[2], C = xd[3], K = gd[3];
  const size_t size = (size_t)9 * C * K;
  const long R = (long)N * H;
  float* o = out->typed_data();
  if (R == 0 || W == 0) {  // an empty batch or image: the sum is zero
    std::fill(o, o + size, 0.f);
    return ffi::Error::Success();
  }
  int T = std::min<long>(num_threads(), R);
  std::vector<std::vector<float>> parts(T, std::vector<float>(size, 0.f));
  std::vector<std::thread> pool;
  for (int t = 1; t < T; ++t)
    pool.emplace_back(rows, x.typed_data(), g.typed_data(), N, H, W, C, K, R * t / T,
                      R * (t + 1) / T, parts[t].data());
  rows(x.typed_data(), g.typed_data(), N, H, W, C, K, 0, R / T, parts[0].data());
  for (auto& th : pool) th.join();
  for (size_t e = 0; e < size; ++e) {
    float s = 0.f;
    for (int t = 0; t < T; ++t) s += parts[t][e];
    o[e] = s;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3Dw, Conv3x3DwImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
