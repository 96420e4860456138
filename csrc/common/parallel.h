// Work over CPU threads shared by the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace glm_ext {

// Runs fn(begin, end) over contiguous ranges of the items [0, costs.size()) in parallel: ranges of
// about the same total cost (any unit: multiply-adds, bytes), a few per thread, each thread taking
// the next one as it becomes free, so that a thread the OS runs late (on a shared machine) leaves
// its share to the others. Which thread runs a range never changes a result. Small problems
// (decoding one token, tiny test shapes) run on the calling thread: starting threads would cost
// more than the work.
template <typename F>
void parallel_over_items(const std::vector<int64_t>& costs, const F& fn) {
  constexpr int64_t kMinParallelWork = int64_t{1} << 20, kRangesPerThread = 4;
  const int64_t items = static_cast<int64_t>(costs.size()), threads = at::get_num_threads();
  int64_t total = 0;
  for (int64_t cost : costs) total += cost;
  if (total < kMinParallelWork || threads <= 1 || items <= 1) {
    if (items > 0) fn(0, items);
    return;
  }
  const int64_t ranges = std::min(items, kRangesPerThread * threads);
  std::vector<int64_t> bounds(ranges + 1, items);
  bounds[0] = 0;
  int64_t item = 0, done = 0;
  for (int64_t r = 1; r < ranges; ++r) {
    const int64_t target = total * r / ranges;
    while (item < items && done + costs[item] / 2 < target) done += costs[item++];
    bounds[r] = item;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t r = next++; r < ranges; r = next++) {
      if (bounds[r] < bounds[r + 1]) fn(bounds[r], bounds[r + 1]);
    }
  });
}

}  // namespace glm_ext
