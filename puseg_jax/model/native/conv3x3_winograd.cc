// A 3x3 'SAME' stride-1 NHWC convolution by Winograd's F(2x2, 3x3), as an XLA FFI handler on
// the CPU (puseg_jax/model/native_conv.py builds it with the machine's compiler and registers it).
//
//   y[n, h, w, k] = sum_{i, j, c} x[n, h + i - 1, w + j - 1, c] * W[i, j, c, k]   (zero outside)
//
// The handler takes the transformed kernel U = G W G^T ([16, C, K], computed by the caller), so
// the same handler serves the forward pass (U of W) and the input gradient (U of W turned by 180
// degrees with C and K swapped). Each 2x2 block of outputs ("tile") reads a 4x4 block of inputs d;
// with V = B^T d B (16 numbers a channel) and M[e] = sum_c V[e, c] U[e, c, :] for each of the 16
// positions e, the tile is A^T M A: 16 multiplications where the direct sum takes 36. The products
// M are 16 matrix products of (tiles x C) by (C x K), run on chunks of tiles with a
// block of TB tiles by KV vectors of output channels in registers, the transforms around them on
// the chunk while it is in cache. Rows of tiles are split among the process's cores. float32.
// The F(2x2, 3x3) matrices (Lavin and Gray, 2016):
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// C and K must be multiples of the vector width (16 floats with AVX-512, else 8).
#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>
#include <sched.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;
constexpr int TB = 12;  // tiles per register block: 12 x 2 vectors = 24 accumulators
#else
constexpr int V = 8;
constexpr int TB = 6;   // 6 x 2 vectors = 12 accumulators
#endif
constexpr int KV = 2;
constexpr long CHUNK_BYTES = 512 * 1024;  // transformed inputs and products a chunk, about
constexpr long MIN_CHUNK = 48;            // ... but at least this many tiles
typedef float vec __attribute__((vector_size(V * 4)));

inline vec load(const float* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

struct Shape {
  int N, H, W, C, K;
  int CS;  // floats from one tile's transformed inputs to the next's in vbuf: C and a vector
           // (rows a power of two apart would share cache sets)
  int TH, TW;  // tiles a column and a row: ceil(H / 2), ceil(W / 2)
};

// V[e][t][c] of the tiles p0 .. p0 + nt (tiles numbered over images, tile rows and tile
// columns); vbuf is [16][nt][CS].
void input_transform(const float* x, const Shape& s, long p0, int nt, float* vbuf) {
  const int C = s.C;
  const size_t plane = (size_t)nt * s.CS;
  for (int t = 0; t < nt; ++t) {
    const long p = p0 + t;
    const long q = p / s.TW;  // n * TH + th
    const int n = q / s.TH, th = q % s.TH, tw = p % s.TW;
    const int h0 = 2 * th - 1, w0 = 2 * tw - 1;
    const float* rows[4];
    bool row_in[4], col_in[4];
    for (int a = 0; a < 4; ++a) {
      row_in[a] = h0 + a >= 0 && h0 + a < s.H;
      col_in[a] = w0 + a >= 0 && w0 + a < s.W;
      rows[a] = x + ((size_t)n * s.H + (row_in[a] ? h0 + a : 0)) * s.W * C;
    }
    for (int c = 0; c < C; c += V) {
      vec d[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b)
          d[a][b] = row_in[a] && col_in[b] ? load(rows[a] + (size_t)(w0 + b) * C + c) : vec{};
      vec r[4][4];  // B^T d
      for (int b = 0; b < 4; ++b) {
        r[0][b] = d[0][b] - d[2][b];
        r[1][b] = d[1][b] + d[2][b];
        r[2][b] = d[2][b] - d[1][b];
        r[3][b] = d[1][b] - d[3][b];
      }
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        float* out = vbuf + (size_t)(4 * a) * plane + (size_t)t * s.CS + c;
        store(out, r[a][0] - r[a][2]);
        store(out + plane, r[a][1] + r[a][2]);
        store(out + 2 * plane, r[a][2] - r[a][1]);
        store(out + 3 * plane, r[a][1] - r[a][3]);
      }
    }
  }
}

// mbuf[e][t][k0 .. k0 + NKV * V) for tiles t0 .. t0 + NT: the sum over c of vbuf[e][t][c] *
// U[e][c][k], with U[e][:, k0 .. k0 + NKV * V) packed as `ublock` ([C][NKV * V], contiguous:
// read in place from U, its rows K floats apart, it thrashes the caches at large K).
template <int NT, int NKV>
inline void gemm_block(const float* vplane, const float* ublock, int C, int CS, int K, int t0,
                       int k0, float* mplane) {
  vec acc[NT][NKV];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NKV; ++v) acc[t][v] = vec{};
  const float* vp = vplane + (size_t)t0 * CS;
  for (int c = 0; c < C; ++c) {
    const float* up = ublock + (size_t)c * NKV * V;
    vec u[NKV];
    for (int v = 0; v < NKV; ++v) u[v] = load(up + v * V);
    for (int t = 0; t < NT; ++t) {
      const vec b = vec{} + vp[(size_t)t * CS + c];
      for (int v = 0; v < NKV; ++v) acc[t][v] += b * u[v];
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NKV; ++v) store(mplane + (size_t)(t0 + t) * K + k0 + v * V, acc[t][v]);
}

template <int NKV>
void gemm_tiles(const float* vplane, const float* ublock, int C, int CS, int K, int nt, int k0,
                float* mplane) {
  int t0 = 0;
  for (; t0 + TB <= nt; t0 += TB) gemm_block<TB, NKV>(vplane, ublock, C, CS, K, t0, k0, mplane);
  if (TB > 8 && t0 + 8 <= nt) {
    gemm_block<8, NKV>(vplane, ublock, C, CS, K, t0, k0, mplane);
    t0 += 8;
  }
  if (t0 + 4 <= nt) {
    gemm_block<4, NKV>(vplane, ublock, C, CS, K, t0, k0, mplane);
    t0 += 4;
  }
  if (t0 + 2 <= nt) {
    gemm_block<2, NKV>(vplane, ublock, C, CS, K, t0, k0, mplane);
    t0 += 2;
  }
  if (t0 < nt) gemm_block<1, NKV>(vplane, ublock, C, CS, K, t0, k0, mplane);
}

// y of the tiles p0 .. p0 + nt from mbuf ([16][nt][K]): A^T M A, the outputs inside the image.
void output_transform(const float* mbuf, const Shape& s, long p0, int nt, float* y) {
  const int K = s.K;
  const size_t plane = (size_t)nt * K;
  for (int t = 0; t < nt; ++t) {
    const long p = p0 + t;
    const long q = p / s.TW;
    const int n = q / s.TH, th = q % s.TH, tw = p % s.TW;
    const int h = 2 * th, w = 2 * tw;
    const bool h1 = h + 1 < s.H, w1 = w + 1 < s.W;
    float* y0 = y + (((size_t)n * s.H + h) * s.W + w) * K;
    float* y1 = y0 + (size_t)s.W * K;
    for (int k = 0; k < K; k += V) {
      vec m[16];
      for (int e = 0; e < 16; ++e) m[e] = load(mbuf + e * plane + (size_t)t * K + k);
      vec q[2][4];  // A^T M
      for (int b = 0; b < 4; ++b) {
        q[0][b] = m[b] + m[4 + b] + m[8 + b];
        q[1][b] = m[4 + b] - m[8 + b] - m[12 + b];
      }
      store(y0 + k, q[0][0] + q[0][1] + q[0][2]);
      if (w1) store(y0 + K + k, q[0][1] - q[0][2] - q[0][3]);
      if (h1) {
        store(y1 + k, q[1][0] + q[1][1] + q[1][2]);
        if (w1) store(y1 + K + k, q[1][1] - q[1][2] - q[1][3]);
      }
    }
  }
}

// Tiles p0 .. p1, in chunks of at most `chunk` tiles.
void tiles(const float* x, const float* u, const Shape& s, long p0, long p1, int chunk, float* y) {
  std::vector<float> vbuf((size_t)16 * chunk * s.CS), mbuf((size_t)16 * chunk * s.K);
  const size_t uplane = (size_t)s.C * s.K;  // u is packed: see pack()
  for (long c0 = p0; c0 < p1; c0 += chunk) {
    const int nt = std::min<long>(chunk, p1 - c0);
    input_transform(x, s, c0, nt, vbuf.data());
    for (int e = 0; e < 16; ++e) {
      const float* vplane = vbuf.data() + (size_t)e * nt * s.CS;
      float* mplane = mbuf.data() + (size_t)e * nt * s.K;
      int k0 = 0;
      for (; k0 + KV * V <= s.K; k0 += KV * V)
        gemm_tiles<KV>(vplane, u + e * uplane + (size_t)s.C * k0, s.C, s.CS, s.K, nt, k0, mplane);
      if (k0 < s.K)
        gemm_tiles<1>(vplane, u + e * uplane + (size_t)s.C * k0, s.C, s.CS, s.K, nt, k0, mplane);
    }
    output_transform(mbuf.data(), s, c0, nt, y);
  }
}

// U [16][C][K] -> for each e, its blocks of KV * V output channels (the last one V where K is an
// odd number of vectors), each [C][block width], one after the other.
std::vector<float> pack(const float* u, const Shape& s) {
  std::vector<float> packed((size_t)16 * s.C * s.K);
  float* out = packed.data();
  for (int e = 0; e < 16; ++e)
    for (int k0 = 0; k0 < s.K; k0 += KV * V) {
      const int width = std::min(KV * V, s.K - k0);
      for (int c = 0; c < s.C; ++c, out += width)
        std::memcpy(out, u + ((size_t)e * s.C + c) * s.K + k0, width * sizeof(float));
    }
  return packed;
}

int num_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ffi::Error Conv3x3WinogradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                               ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), ud = u.dimensions();
  if (xd.size() != 4 || ud.size() != 3 || ud[0] != 16 || ud[1] != xd[3])
    return ffi::Error::InvalidArgument("expected x [N, H, W, C] and u [16, C, K]");
  Shape s;
  s.N = xd[0], s.H = xd[1], s.W = xd[2], s.C = xd[3], s.K = ud[2];
  if (s.C % V != 0 || s.K % V != 0)
    return ffi::Error::InvalidArgument("C and K must be multiples of the vector width");
  s.TH = (s.H + 1) / 2, s.TW = (s.W + 1) / 2;
  s.CS = s.C + V;
  const long P = (long)s.N * s.TH * s.TW;  // tiles
  if (P == 0 || s.K == 0) return ffi::Error::Success();  // nothing to write
  // At least MIN_CHUNK tiles, so that U, read once a chunk, is read by many tiles where C and K
  // are large; whole register blocks.
  const long per_tile = 16L * (s.C + s.K) * 4;
  const int chunk = std::max(MIN_CHUNK, CHUNK_BYTES / per_tile / TB * TB);
  const int T = std::min<long>(num_threads(), (P + TB - 1) / TB);
  const std::vector<float> packed = pack(u.typed_data(), s);
  std::vector<std::thread> pool;
  for (int t = 1; t < T; ++t)
    pool.emplace_back(tiles, x.typed_data(), packed.data(), std::cref(s), P * t / T,
                      P * (t + 1) / T, chunk, out->typed_data());
  tiles(x.typed_data(), packed.data(), s, 0, P / T, chunk, out->typed_data());
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3Winograd, Conv3x3WinogradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
