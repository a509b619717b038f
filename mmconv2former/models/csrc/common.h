// Shared by the package's native kernels, which native.py builds together
// into one library: 8-float vectors, and a work split over threads in which
// each thread adds into its own partial weight and bias gradients.
#pragma once

#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

namespace mmc2f {

typedef float v8 __attribute__((vector_size(32)));
inline v8 load(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v8 v) { memcpy(p, &v, sizeof v); }

// Runs work items [0, items) on up to num_threads threads, the caller's
// included: thread t runs work(&job) for job = make_job(first, last, dw, db)
// on its share of the items. Thread 0 adds straight into dw (dw_size floats)
// and db (C floats); the others into zeroed partial sums, added in at the end.
// work returns nullptr, or non-null on failure. Returns 0, or -1 on failure.
template <class Job, class MakeJob>
int run_summing(long items, int num_threads, float* dw, size_t dw_size, float* db, int C,
                void* (*work)(void*), MakeJob make_job) {
  const int T = static_cast<int>(
      std::max(1L, std::min<long>({static_cast<long>(num_threads), items, 64L})));
  const size_t part = dw_size + C;
  float* partial = T > 1 ? static_cast<float*>(calloc(part * (T - 1), sizeof(float))) : nullptr;
  const int threads = partial ? T : 1;  // no memory for partial sums: one thread
  Job jobs[64];
  pthread_t tids[64];
  for (int t = 0; t < threads; ++t) {
    float* own = t == 0 ? dw : partial + part * (t - 1);
    jobs[t] = make_job(items * t / threads, items * (t + 1) / threads, own,
                       t == 0 ? db : own + dw_size);
  }
  int started = 1;
  for (int t = 1; t < threads; ++t, ++started)
    if (pthread_create(&tids[t], nullptr, work, &jobs[t]) != 0) break;
  bool failed = false;
  for (int t = started; t < threads; ++t) failed |= work(&jobs[t]) != nullptr;  // not started: run here
  failed |= work(&jobs[0]) != nullptr;
  for (int t = 1; t < started; ++t) {
    void* result = nullptr;
    pthread_join(tids[t], &result);
    failed |= result != nullptr;
  }
  for (int t = 1; t < threads; ++t) {
    const float* own = partial + part * (t - 1);
    for (size_t e = 0; e < dw_size; ++e) dw[e] += own[e];
    for (int c = 0; c < C; ++c) db[c] += own[dw_size + c];
  }
  free(partial);
  return failed ? -1 : 0;
}

}  // namespace mmc2f
