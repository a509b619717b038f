// The middle of the Conv2Former MLP in the backward pass, in one sweep, on
// channels-last (N, H, W, C) fp32 data, for CPU training:
//
//     h = GELU(f)               f: fc1's output, the one tensor the MLP keeps
//     q = DW3x3(h) + bias
//     s = h + GELU(q)           fc2's input
//
// Given f and the gradient g_s at s, it writes s (for fc2's weight gradient)
// and the gradient at f,
//     g_q = g_s * GELU'(q)
//     g_f = (g_s + DW3x3^T(g_q)) * GELU'(f),
// and adds up the 3x3 weight and bias gradients. Why: done operator by
// operator, these are nine operators on 4C-wide tensors (two GELUs, their
// gradients, the convolution and its two gradients, two sums), each a
// memory-bound pass or more on CPU; here f and g_s are read once and s and
// g_f written once, while h, q and g_q only ever exist as three rows in cache. Rows are streamed: row t of
// q needs rows t-1..t+1 of h, and row t-1 of g_f needs rows t-2..t of g_q.
//
// GELU is the exact one, x * Phi(x), with erf by Abramowitz & Stegun 7.1.26
// (absolute error < 1.5e-7) -- the formula PyTorch's own vectorised CPU GELU
// uses -- and exp by Cody-Waite reduction with Cephes' polynomial.
//
// Built at first use with depthwise_wgrad.cpp by mmconv2former/models/native.py.
#include "common.h"

namespace {

using mmc2f::load;
using mmc2f::store;
using mmc2f::v8;
typedef int i8 __attribute__((vector_size(32)));
inline v8 splat(float a) { return v8{a, a, a, a, a, a, a, a}; }

// exp(x) for x <= 0 (here always -x^2/2).
inline v8 exp_nonpositive(v8 x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const v8 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v8 n = x * splat(1.44269504088896341f) + shifter;
  n -= shifter;
  const v8 r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
  v8 scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// GELU(x) and GELU'(x) = Phi(x) + x * phi(x).
inline void gelu(v8 x, v8* value, v8* slope) {
  const v8 e = exp_nonpositive(splat(-0.5f) * x * x);  // sqrt(2 pi) * phi(x)
  const v8 ax = x < splat(0.0f) ? -x : x;
  const v8 t = splat(1.0f) / (splat(1.0f) + splat(0.3275911f * 0.70710678118654752f) * ax);
  v8 poly = splat(1.061405429f);
  poly = poly * t + splat(-1.453152027f);
  poly = poly * t + splat(1.421413741f);
  poly = poly * t + splat(-0.284496736f);
  poly = poly * t + splat(0.254829592f);
  const v8 tail = splat(0.5f) * poly * t * e;  // 1 - Phi(|x|)
  const v8 cdf = x < splat(0.0f) ? tail : splat(1.0f) - tail;
  *value = x * cdf;
  *slope = cdf + x * e * splat(0.39894228040143268f);
}

struct Job {
  const float* f;
  float* g;  // g_s in, g_f out
  const float* w;  // (3, 3, C)
  const float* b;  // (C) or null
  float* s;
  float* dw;  // (3, 3, C), this thread's partial sums
  float* db;  // (C), this thread's partial sums
  long item0, item1;  // work items [item0, item1): (image, channel block)
  int H, W, C, CB;
};

void run_item(const Job& job, long item, float* scratch) {
  const int H = job.H, W = job.W, C = job.C, CB = job.CB;
  const int blocks = C / CB;
  const long n = item / blocks;
  const int c0 = static_cast<int>(item % blocks) * CB;
  const size_t row = static_cast<size_t>(W) * C;
  const size_t padded = static_cast<size_t>(W + 2) * CB;  // one zero column each side
  const float* f = job.f + n * H * row + c0;
  float* g = job.g + n * H * row + c0;
  float* s = job.s + n * H * row + c0;
  const float* w = job.w + c0;
  // scratch comes zeroed, and only the inner columns of the rings are ever
  // written: the zero row and the rings' padding columns stay zero.
  const float* zero = scratch;
  float* h_ring = scratch + padded;
  float* q_ring = h_ring + 3 * padded;  // g_q rows
  float* slope_ring = q_ring + 3 * padded;  // GELU'(f) rows
  auto h_row = [&](int r) -> const float* { return r < 0 || r >= H ? zero : h_ring + (r % 3) * padded; };
  auto q_row = [&](int r) -> const float* { return r < 0 || r >= H ? zero : q_ring + (r % 3) * padded; };
  auto compute_h = [&](int r) {
    float* hr = h_ring + (r % 3) * padded + CB;
    float* sr = slope_ring + (r % 3) * static_cast<size_t>(W) * CB;
    for (int x = 0; x < W; ++x)
      for (int c = 0; c < CB; c += 8) {
        v8 value, slope;
        gelu(load(f + r * row + static_cast<size_t>(x) * C + c), &value, &slope);
        store(hr + x * CB + c, value);
        store(sr + x * CB + c, slope);
      }
  };
  compute_h(0);
  for (int t = 0; t <= H; ++t) {
    if (t + 1 < H) compute_h(t + 1);
    if (t < H) {  // row t of q, s and g_q; weight gradient of row t
      const float* hr[3] = {h_row(t - 1), h_row(t), h_row(t + 1)};
      float* qr = q_ring + (t % 3) * padded + CB;
      for (int c = 0; c < CB; c += 8) {
        v8 wk[9];
        for (int k = 0; k < 9; ++k) wk[k] = load(w + static_cast<size_t>(k) * C + c);
        const v8 bias = job.b ? load(job.b + c0 + c) : splat(0.0f);
        v8 dwk[9];
        for (int k = 0; k < 9; ++k) dwk[k] = splat(0.0f);
        v8 dbk = splat(0.0f);
        for (int x = 0; x < W; ++x) {
          v8 q = bias;
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) q += wk[3 * i + j] * load(hr[i] + (x + j) * CB + c);
          v8 value, slope;
          gelu(q, &value, &slope);
          const size_t at = t * row + static_cast<size_t>(x) * C + c;
          store(s + at, load(hr[1] + (x + 1) * CB + c) + value);
          const v8 gq = load(g + at) * slope;
          store(qr + x * CB + c, gq);
          dbk += gq;
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) dwk[3 * i + j] += gq * load(hr[i] + (x + j) * CB + c);
        }
        for (int k = 0; k < 9; ++k) {
          float* d = job.dw + static_cast<size_t>(k) * C + c0 + c;
          store(d, load(d) + dwk[k]);
        }
        store(job.db + c0 + c, load(job.db + c0 + c) + dbk);
      }
    }
    if (t >= 1) {  // row y = t - 1 of g_f, written over g_s (its last use)
      const int y = t - 1;
      // q row y+1-i, column x+1-j used tap (i, j) of input (y, x): flipped kernel.
      const float* qr[3] = {q_row(y + 1), q_row(y), q_row(y - 1)};
      const float* sr = slope_ring + (y % 3) * static_cast<size_t>(W) * CB;
      for (int c = 0; c < CB; c += 8) {
        v8 wk[9];
        for (int k = 0; k < 9; ++k) wk[k] = load(w + static_cast<size_t>(k) * C + c);
        for (int x = 0; x < W; ++x) {
          const size_t at = y * row + static_cast<size_t>(x) * C + c;
          v8 gh = load(g + at);
          for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) gh += wk[3 * i + j] * load(qr[i] + (x + 2 - j) * CB + c);
          store(g + at, gh * load(sr + x * CB + c));
        }
      }
    }
  }
}

void* run(void* arg) {
  const Job& job = *static_cast<Job*>(arg);
  const size_t padded = static_cast<size_t>(job.W + 2) * job.CB;
  float* scratch = static_cast<float*>(
      calloc(7 * padded + 3 * static_cast<size_t>(job.W) * job.CB, sizeof(float)));
  if (scratch == nullptr) return arg;  // reported as a failure
  for (long item = job.item0; item < job.item1; ++item) run_item(job, item, scratch);
  free(scratch);
  return nullptr;
}

}  // namespace

extern "C" {

int mmc2f_mlp_supported(int channels) { return channels > 0 && channels % 8 == 0; }

// f, g, s: (N, H, W, C) contiguous, g overwritten; w: (3, 3, C); b: (C) or
// null; dw: (3, 3, C) and db: (C), zeroed by the caller. Returns 0, or -1
// when the arguments are not supported or memory ran out.
int mmc2f_mlp_backward(const float* f, float* g, const float* w, const float* b, float* s,
                       float* dw, float* db, long N, int H, int W, int C, int num_threads) {
  if (!mmc2f_mlp_supported(C) || N < 1 || H < 1 || W < 1) return -1;
  // Channel blocks of 32 (128-byte runs of each pixel) keep the nine rows in
  // flight per block within L2 for maps up to a few hundred pixels wide.
  const int CB = C % 32 == 0 ? 32 : C % 16 == 0 ? 16 : 8;
  return mmc2f::run_summing<Job>(
      N * (C / CB), num_threads, dw, static_cast<size_t>(9) * C, db, C, run,
      [=](long item0, long item1, float* own_dw, float* own_db) {
        return Job{f, g, w, b, s, own_dw, own_db, item0, item1, H, W, C, CB};
      });
}

}  // extern "C"
