// Random rows and parameters over the whole range span_shuffle_batch accepts, through the per-row
// algorithm of csrc/batching/span_shuffle.h (the code the CPU and CUDA kernels share), built with
// AddressSanitizer and UndefinedBehaviorSanitizer by test_blank_infilling.py. Every buffer has
// exactly the size the kernels give it, so a read or write past a row's workspace or past the
// assembled row is reported. Each row must either be refused with a RowStatus or come out valid:
// spans inside the row, in text order, apart from each other (token level) and off [CLS] / <eos>
// (token and sentence level), the Part B order a permutation, and Part A the text with one mask
// per span.
//
// Usage: harness CASES SEED. Prints "ok <rows built> <rows refused>", or the first broken case
// (exit status 1); the sanitizers abort on their own findings.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "batching/span_shuffle.h"

using namespace glm_ext::span_shuffle;

namespace {

constexpr int64_t kPad = 0, kCls = 1, kEos = 7, kMask = 2, kSop = 3, kEop = 4, kGmask = 5, kSmask = 6;
constexpr int64_t kSentenceEnd[] = {20, 21};
constexpr int64_t kVocab = 64;

struct Case {
  std::vector<int64_t> row;
  Params params;
  int32_t objective;
  std::vector<double> cdf;
};

// A row of n tokens: text with sentence ends, and either the authors' layout ([CLS], then a few
// documents each ending with <eos>) or [CLS] / <eos> at a random density (none to most tokens).
std::vector<int64_t> random_row(std::mt19937_64& gen, int32_t n) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double sentence_share = unit(gen) < 0.3 ? 0.0 : unit(gen) * 0.3;
  const bool documents = unit(gen) < 0.6;
  const double protected_share = documents || unit(gen) < 0.2 ? 0.0 : std::pow(unit(gen), 3.0);
  std::vector<int64_t> row(n);
  for (auto& token : row) {
    const double u = unit(gen);
    if (u < protected_share) {
      token = unit(gen) < 0.5 ? kCls : kEos;
    } else if (u < protected_share + sentence_share) {
      token = kSentenceEnd[gen() % 2];
    } else {
      token = 22 + static_cast<int64_t>(gen() % (kVocab - 22));
    }
  }
  if (documents && n > 0) {
    row.front() = kCls;
    row.back() = kEos;
    for (int d = static_cast<int>(gen() % 5); d > 0; --d) row[gen() % n] = kEos;
  }
  return row;
}

Case random_case(std::mt19937_64& gen) {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  Case c;
  const double size = unit(gen);
  const int32_t n = size < 0.05 ? 0 : size < 0.2 ? static_cast<int32_t>(gen() % 8)
                                                  : static_cast<int32_t>(gen() % (size < 0.95 ? 300 : 3000));
  c.row = random_row(gen, n);
  // The accepted ranges: mask_ratio in (0, 1], lambda > 0, max_span_length in [1, 4096],
  // min_document_ratio in [0, 1]; edges often.
  const double ratio_draw = unit(gen);
  const double mask_ratio = ratio_draw < 0.1 ? 1.0 : ratio_draw < 0.15 ? 1e-9 : 1.0 - unit(gen);
  const double lambda = unit(gen) < 0.05 ? (unit(gen) < 0.5 ? 1e-300 : 1e300) : std::pow(10.0, -3.0 + 6.0 * unit(gen));
  const int32_t max_span_length = unit(gen) < 0.1 ? 4096 : 1 + static_cast<int32_t>(std::pow(4096.0, unit(gen))) % 4096;
  const double min_document_ratio = unit(gen) < 0.1 ? (unit(gen) < 0.5 ? 0.0 : 1.0) : unit(gen);
  c.objective = static_cast<int32_t>(gen() % 3);
  c.cdf.resize(max_span_length);
  span_length_cdf(lambda, max_span_length, c.cdf.data());
  c.params = Params{kVocab, kCls, kEos, kPad, kMask, kSmask, kGmask, kSop, kEop, mask_ratio, c.cdf.data(),
                    max_span_length, min_document_ratio, kSentenceEnd, 2, gen(), 16};
  return c;
}

bool fail(const char* what, const Case& c, int32_t count) {
  std::printf("broken row: %s (n=%zu objective=%d mask_ratio=%.17g max_span_length=%d seed=%llu spans=%d)\n", what,
              c.row.size(), c.objective, c.params.mask_ratio, c.params.max_span_length,
              static_cast<unsigned long long>(c.params.seed), count);
  return false;
}

bool check_cdf(const Case& c) {
  double last = 0;
  for (double value : c.cdf) {
    if (!(value >= last && value <= 1.0)) return fail("span length table is not a distribution", c, 0);
    last = value;
  }
  return last == 1.0 || fail("span length table does not end at 1", c, 0);
}

// Samples and assembles one row in buffers of exactly the kernels' sizes; checks the result.
bool run_case(const Case& c, uint64_t row_index, int64_t& built, int64_t& refused) {
  const int32_t n = static_cast<int32_t>(c.row.size());
  std::vector<int32_t> memory(RowWorkspace::workspace_ints(n));
  RowWorkspace ws(memory.data(), n);
  const int32_t status = sample_row(c.row.data(), n, c.objective, c.params, row_index, ws);
  if (status != kOk) {
    ++refused;
    const bool expected = status == kNoMaskableToken || status == kTooShortForDocument;
    return expected || fail("unexpected status", c, ws.count);
  }
  ++built;
  const int32_t count = ws.count;
  if (count < 0 || count > n) return fail("span count outside [0, n]", c, count);
  auto is_protected_token = [&](int64_t t) { return t == kCls || t == kEos; };
  int32_t covered = 0;
  for (int32_t s = 0; s < count; ++s) {
    const int32_t a = ws.start[s], b = ws.end[s];
    if (!(0 <= a && a < b && b <= n)) return fail("span outside the row", c, count);
    if (s > 0 && a < ws.end[s - 1] + (c.objective == kTokenLevel ? 1 : 0)) return fail("spans overlap or touch", c, count);
    if (c.objective != kDocumentLevel) {
      for (int32_t i = a; i < b; ++i) {
        if (is_protected_token(c.row[i])) return fail("span covers [CLS] or <eos>", c, count);
      }
    }
    covered += b - a;
  }
  if (c.objective == kDocumentLevel && n > 0 && !(count == 1 && ws.end[0] == n && ws.start[0] >= 2)) {
    return fail("document-level span is not a suffix after two tokens", c, count);
  }
  std::vector<bool> seen(count, false);
  for (int32_t s = 0; s < count; ++s) {
    const int32_t k = ws.order[s];
    if (k < 0 || k >= count || seen[k]) return fail("Part B order is not a permutation", c, count);
    seen[k] = true;
  }
  const bool document = c.objective == kDocumentLevel;
  const int32_t width = assembled_length(n, count, document);
  std::vector<int64_t> tokens(width), targets(width), loss(width), positions(width), blocks(width);
  const int32_t sep = assemble_row(c.row.data(), n, ws.start, ws.end, ws.order, count, kMask, document, c.params,
                                   width, tokens.data(), targets.data(), loss.data(), positions.data(), blocks.data(),
                                   ws.lengths);
  if (sep != n - covered + count) return fail("sep is not the length of Part A", c, count);
  // Part A: the text with each span replaced by one mask.
  for (int32_t s = 0, out = 0, last = 0; s <= count; ++s) {
    const int32_t run_end = s < count ? ws.start[s] : n;
    for (int32_t i = last; i < run_end; ++i, ++out) {
      if (tokens[out] != c.row[i]) return fail("Part A differs from the text", c, count);
    }
    if (s < count) {
      if (tokens[out++] != kMask) return fail("no mask in place of a span", c, count);
      last = ws.end[s];
    }
  }
  for (int32_t i = sep; i < width; ++i) {
    if (loss[i] != 1) return fail("Part B outside the loss", c, count);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASES SEED\n", argv[0]);
    return 2;
  }
  const long cases = std::atol(argv[1]);
  std::mt19937_64 gen(std::strtoull(argv[2], nullptr, 10));
  int64_t built = 0, refused = 0;
  for (long i = 0; i < cases; ++i) {
    const Case c = random_case(gen);
    if (!check_cdf(c)) return 1;
    for (uint64_t row_index : {uint64_t{0}, gen()}) {
      if (!run_case(c, row_index, built, refused)) return 1;
    }
  }
  std::printf("ok %lld %lld\n", static_cast<long long>(built), static_cast<long long>(refused));
  return 0;
}
