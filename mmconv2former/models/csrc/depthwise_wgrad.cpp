// Weight and bias gradients of a stride-1, "same"-padded depthwise
// convolution on channels-last (N, H, W, C) fp32 data, for CPU training.
//
// Why this exists: oneDNN's depthwise weight gradient runs 4-35x slower than
// its own forward pass on the shapes Conv2Former trains (11x11 kernels, 7-128
// pixel maps), which made it the largest cost of a Conv2Former training step
// on CPU after the matrix products. The gradient is a per-channel correlation,
//     dw[i, j, c] = sum_{n, h, w} x[n, h + i - P, w + j - P, c] * g[n, h, w, c],
// and vectorises over the contiguous channel dimension: for one input row i
// and a block of 8 channels, the K taps of kernel row i stay in registers
// while the output row is swept once. Work is split by output rows over
// threads, each with its own partial sums, added up at the end.
//
// Built at first use by mmconv2former/models/native.py (g++ -O3
// -march=native); everything else of the convolution stays with PyTorch.
#include "common.h"

namespace {

using mmc2f::load;
using mmc2f::store;
using mmc2f::v8;

struct Job {
  const float* x;
  const float* g;
  float* dw;  // (K, K, C), accumulated into
  float* db;  // (C), accumulated into
  long r0, r1;  // output rows [r0, r1) of the N * H rows
  int H, W, C, K;
};

template <int K>
void weight_grad_rows(const Job& job) {
  constexpr int P = K / 2;
  const int H = job.H, W = job.W, C = job.C;
  for (long r = job.r0; r < job.r1; ++r) {
    const long n = r / H;
    const int h = static_cast<int>(r % H);
    const int i0 = std::max(0, P - h), i1 = std::min(K, H + P - h);  // rows inside the map
    const float* grow = job.g + static_cast<size_t>(r) * W * C;
    for (int c = 0; c < C; c += 8) {
      v8 bias_sum{};
      for (int w = 0; w < W; ++w) bias_sum += load(grow + static_cast<size_t>(w) * C + c);
      store(job.db + c, load(job.db + c) + bias_sum);
      for (int i = i0; i < i1; ++i) {
        const float* xrow = job.x + (static_cast<size_t>(n * H + h + i - P) * W) * C + c;
        v8 acc[K];
        for (int j = 0; j < K; ++j) acc[j] = v8{};
        for (int w = 0; w < W; ++w) {
          const v8 gv = load(grow + static_cast<size_t>(w) * C + c);
          if (w >= P && w + P < W) {  // all K taps inside the row
            const float* xp = xrow + static_cast<size_t>(w - P) * C;
            for (int j = 0; j < K; ++j) acc[j] += gv * load(xp + static_cast<size_t>(j) * C);
          } else {
            for (int j = 0; j < K; ++j) {
              const int col = w + j - P;
              if (col >= 0 && col < W) acc[j] += gv * load(xrow + static_cast<size_t>(col) * C);
            }
          }
        }
        float* d = job.dw + static_cast<size_t>(i) * K * C + c;
        for (int j = 0; j < K; ++j) store(d + static_cast<size_t>(j) * C, load(d + static_cast<size_t>(j) * C) + acc[j]);
      }
    }
  }
}

void* run(void* arg) {
  const Job& job = *static_cast<Job*>(arg);
  switch (job.K) {
    case 3: weight_grad_rows<3>(job); break;
    case 5: weight_grad_rows<5>(job); break;
    case 7: weight_grad_rows<7>(job); break;
    case 9: weight_grad_rows<9>(job); break;
    case 11: weight_grad_rows<11>(job); break;
    case 13: weight_grad_rows<13>(job); break;
  }
  return nullptr;
}

}  // namespace

extern "C" {

int mmc2f_dw_supported(int kernel_size, int channels) {
  const bool k_ok = kernel_size == 3 || kernel_size == 5 || kernel_size == 7 ||
                    kernel_size == 9 || kernel_size == 11 || kernel_size == 13;
  return k_ok && channels > 0 && channels % 8 == 0;
}

// x, g: (N, H, W, C) contiguous; dw: (K, K, C) and db: (C), zeroed by the
// caller. Returns 0, or -1 when the arguments are not supported.
int mmc2f_dw_weight_grad(const float* x, const float* g, float* dw, float* db,
                         long N, int H, int W, int C, int K, int num_threads) {
  if (!mmc2f_dw_supported(K, C) || N < 1 || H < 1 || W < 1) return -1;
  return mmc2f::run_summing<Job>(
      N * H, num_threads, dw, static_cast<size_t>(K) * K * C, db, C, run,
      [=](long r0, long r1, float* own_dw, float* own_db) {
        return Job{x, g, own_dw, own_db, r0, r1, H, W, C, K};
      });
}

}  // extern "C"
