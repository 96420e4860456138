// Span-shuffle batching (GLM_SPEC section 1): the per-row algorithm, written once for the CPU and
// the CUDA kernels (host and device functions, no allocation, no exceptions) so that both produce
// the same batch from the same seed. Argument checks and the host driver are in
// batching.cpp, the op entry points in cpu/span_shuffle.cpp and cuda/span_shuffle.cu.
//
// Randomness: PCG32 (O'Neill, 2014), one generator per row and one for the batch-level choice of
// objective, each seeded from a SplitMix64 hash of (seed, stream), so that a row's result depends
// on neither threads nor devices, and rows of nearby seeds are unrelated. Row i of a call draws
// from stream row_offset + i: a batch split into parts (ranks, micro-batches) draws each part's
// rows as the rows of the whole batch they are.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GLM_HD __host__ __device__ inline
#else
#define GLM_HD inline
#endif

namespace glm_ext::span_shuffle {

enum Objective : int32_t { kTokenLevel = 0, kSentenceLevel = 1, kDocumentLevel = 2 };

// Why a row could not be built (0 = it was).
enum RowStatus : int32_t {
  kOk = 0,
  kNoMaskableToken = 1,   // nothing but [CLS]/<eos> (an empty row is fine: it stays empty)
  kTooShortForDocument = 3,
  kOutputTooLong = 4,     // assembled row longer than the requested output length
  kTokenOutOfRange = 5,   // a token id outside [0, vocab_size)
};

// SplitMix64's finaliser (Steele, Lea and Flood, 2014): a bijection of 64-bit words in which every
// input bit changes about half of the output bits.
GLM_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

struct Pcg32 {
  uint64_t state, increment;

  // PCG's seeding with its initial state and stream both drawn from a hash of (seed, stream):
  // seeding with (seed, stream) directly makes (seed + 2, stream - 1) start next to (seed, stream).
  GLM_HD Pcg32(uint64_t seed, uint64_t stream) : state(0) {
    const uint64_t key = splitmix64(splitmix64(seed) ^ stream);
    increment = (splitmix64(key) << 1u) | 1u;
    next();
    state += key;
    next();
  }
  GLM_HD uint32_t next() {
    const uint64_t old = state;
    state = old * 6364136223846793005ULL + increment;
    const uint32_t xorshifted = static_cast<uint32_t>(((old >> 18u) ^ old) >> 27u);
    const uint32_t rot = static_cast<uint32_t>(old >> 59u);
    return (xorshifted >> rot) | (xorshifted << ((32u - rot) & 31u));
  }
  // Uniform in [0, 1) with 53 random bits.
  GLM_HD double uniform() {
    const uint64_t hi = next() >> 5, lo = next() >> 6;
    return (static_cast<double>(hi) * 67108864.0 + static_cast<double>(lo)) * (1.0 / 9007199254740992.0);
  }
  // Uniform integer in [0, bound), unbiased (Lemire's multiply-and-reject).
  GLM_HD uint32_t below(uint32_t bound) {
    uint64_t m = static_cast<uint64_t>(next()) * bound;
    uint32_t low = static_cast<uint32_t>(m);
    if (low < bound) {
      const uint32_t threshold = (0u - bound) % bound;
      while (low < threshold) {
        m = static_cast<uint64_t>(next()) * bound;
        low = static_cast<uint32_t>(m);
      }
    }
    return static_cast<uint32_t>(m >> 32);
  }
};

// The batch-level objective stream sits past every row stream.
constexpr uint64_t kObjectiveStream = 0x7fffffffffffffffULL;

// Everything a row needs besides its tokens. Pointers are host or device memory to match the
// kernel that reads them.
struct Params {
  int64_t vocab_size;
  int64_t cls_id, eos_id, pad_id, mask_id, smask_id, gmask_id, sop_id, eop_id;
  double mask_ratio;           // token- and sentence-level: fraction of the row to cover
  const double* span_cdf;      // truncated Poisson CDF: span_cdf[k - 1] = P(length <= k)
  int32_t max_span_length;
  double min_document_ratio;   // document-level: shortest suffix, as a fraction of the row
  const int64_t* sentence_end_ids;  // sorted
  int32_t num_sentence_end_ids;
  uint64_t seed;
  int32_t max_attempts;        // token-level draws before a row covers what fits
  uint64_t row_offset;         // row i of the call draws from the stream of row row_offset + i
};

// A row's working memory: six arrays of workspace_ints(n) / 6 entries each (n = row length).
// start/end receive the spans (half-open, text order), order the Part B order (a permutation);
// the other three are scratch.
struct RowWorkspace {
  int32_t *start, *end, *order, *lengths, *seg_start, *seg_length;
  int32_t count;

  GLM_HD static int64_t ints_per_array(int64_t n) { return n + 1; }
  GLM_HD static int64_t workspace_ints(int64_t n) { return 6 * ints_per_array(n); }
  GLM_HD RowWorkspace(int32_t* memory, int64_t n) : count(0) {
    const int64_t k = ints_per_array(n);
    start = memory; end = start + k; order = end + k;
    lengths = order + k; seg_start = lengths + k; seg_length = seg_start + k;
  }
};

GLM_HD bool is_protected(int64_t token, const Params& p) {
  return token == p.cls_id || token == p.eos_id;
}

GLM_HD bool is_sentence_end(int64_t token, const Params& p) {
  int32_t lo = 0, hi = p.num_sentence_end_ids;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (p.sentence_end_ids[mid] < token) lo = mid + 1; else hi = mid;
  }
  return lo < p.num_sentence_end_ids && p.sentence_end_ids[lo] == token;
}

// Truncated Poisson(lambda) over 1..max_length, renormalised, as a cumulative table:
// cdf[k - 1] = P(length <= k). The terms lambda^k / k! (the factor e^-lambda cancels) are taken
// in log space relative to the largest, so that no positive lambda makes them all underflow or
// overflow (host code; the table is copied to the kernel's device).
inline void span_length_cdf(double lambda, int32_t max_length, double* cdf) {
  double log_factorial = 0, log_max = -INFINITY;
  for (int32_t k = 1; k <= max_length; ++k) {
    log_factorial += std::log(static_cast<double>(k));
    cdf[k - 1] = k * std::log(lambda) - log_factorial;
    log_max = std::fmax(log_max, cdf[k - 1]);
  }
  double total = 0;
  for (int32_t k = 0; k < max_length; ++k) total += (cdf[k] = std::exp(cdf[k] - log_max));
  double running = 0;
  for (int32_t k = 0; k < max_length; ++k) cdf[k] = std::fmin(running += cdf[k] / total, 1.0);
  cdf[max_length - 1] = 1.0;
}

GLM_HD int32_t draw_span_length(Pcg32& rng, const Params& p) {
  const double u = rng.uniform();
  for (int32_t k = 1; k < p.max_span_length; ++k) {
    if (u < p.span_cdf[k - 1]) return k;
  }
  return p.max_span_length;
}

template <typename T>
GLM_HD void shuffle(T* values, int32_t n, Pcg32& rng) {
  for (int32_t i = n - 1; i > 0; --i) {
    const int32_t j = static_cast<int32_t>(rng.below(static_cast<uint32_t>(i + 1)));
    const T tmp = values[i];
    values[i] = values[j];
    values[j] = tmp;
  }
}

template <typename T>
GLM_HD void insertion_sort(T* values, int32_t n) {  // span counts are small; no allocation
  for (int32_t i = 1; i < n; ++i) {
    const T v = values[i];
    int32_t j = i - 1;
    while (j >= 0 && values[j] > v) { values[j + 1] = values[j]; --j; }
    values[j + 1] = v;
  }
}

// The authors' placement: `count` spans of the given lengths inside [offset, offset + length),
// uniformly at random, in the given order, each at least one token from the next. The caller
// guarantees that they fit: sum(lengths) + count - 1 <= length.
GLM_HD void place_spans(const int32_t* lengths, int32_t count, int32_t length, int32_t offset,
                        Pcg32& rng, RowWorkspace& out) {
  int32_t total = 0;
  for (int32_t i = 0; i < count; ++i) total += lengths[i];
  const int32_t slack = length - total - count + 1;  // free choices for each span
  int32_t* places = out.order + out.count;  // order[] is free until the Part B shuffle
  for (int32_t i = 0; i < count; ++i) places[i] = static_cast<int32_t>(rng.below(static_cast<uint32_t>(slack + 1)));
  insertion_sort(places, count);
  for (int32_t i = 0; i < count; ++i) {
    out.start[out.count] = offset + places[i];
    out.end[out.count] = offset + places[i] + lengths[i];
    ++out.count;
    offset += lengths[i] + 1;
  }
}

// Token-level: Poisson span lengths until they cover int(ratio * n) (at least one token),
// distributed over the segments between [CLS]/<eos> the authors' way (shorter segments take their
// share of the ratio first, the longest takes the rest) and placed uniformly. A segment takes a
// span only while its spans and the gaps between them fit in it (the authors check this for the
// longest segment only; for the others their budget implies it up to mask_ratio 0.5, and above
// that their placement fails).
//
// When no draw fits (a row of documents too short for the ratio: a corpus of short documents, or
// a ratio near 0.5; the authors skip such a row), the row covers what fits rather than stopping a
// training run: spans drawn the same way fill the segments, longest first, each shortened to the
// room left, until they cover the target or no segment has room. Returns a RowStatus.
GLM_HD int32_t sample_token_spans(const int64_t* row, int32_t n, const Params& p, Pcg32& rng,
                                  RowWorkspace& out) {
  // Segments: maximal runs of maskable tokens, stably sorted by length.
  int32_t* seg_start = out.seg_start;
  int32_t* seg_length = out.seg_length;
  int32_t num_segments = 0;
  for (int32_t i = 0; i < n;) {
    if (is_protected(row[i], p)) { ++i; continue; }
    int32_t j = i;
    while (j < n && !is_protected(row[j], p)) ++j;
    int32_t k = num_segments++;
    for (; k > 0 && seg_length[k - 1] > j - i; --k) {
      seg_start[k] = seg_start[k - 1];
      seg_length[k] = seg_length[k - 1];
    }
    seg_start[k] = i;
    seg_length[k] = j - i;
    i = j;
  }
  if (num_segments == 0) return kNoMaskableToken;
  const int32_t target = static_cast<int32_t>(p.mask_ratio * n) > 0 ? static_cast<int32_t>(p.mask_ratio * n) : 1;
  int32_t* lengths = out.lengths;
  for (int32_t attempt = 0; attempt < p.max_attempts; ++attempt) {
    int32_t num_lengths = 0, covered = 0;
    while (covered < target) {
      lengths[num_lengths] = draw_span_length(rng, p);
      covered += lengths[num_lengths++];
    }
    shuffle(lengths, num_lengths, rng);
    out.count = 0;
    int32_t next = 0;
    for (int32_t k = 0; k < num_segments; ++k) {
      const bool longest = k == num_segments - 1;
      const int32_t budget = static_cast<int32_t>(seg_length[k] * p.mask_ratio);
      int32_t taken = 0, sum = 0;
      while (next + taken < num_lengths) {
        const int32_t l = lengths[next + taken];
        const bool fits = sum + l + taken <= seg_length[k] && (longest || sum + l <= budget);
        if (!fits) break;
        sum += l;
        ++taken;
      }
      if (taken > 0) place_spans(lengths + next, taken, seg_length[k], seg_start[k], rng, out);
      next += taken;
    }
    if (next == num_lengths) return kOk;
  }
  out.count = 0;
  int32_t covered = 0, next = 0;
  for (int32_t k = num_segments - 1; k >= 0 && covered < target; --k) {
    int32_t taken = 0, sum = 0;
    // room: the longest span that still fits, after one gap per span already in the segment
    for (int32_t room = seg_length[k]; room > 0 && covered + sum < target; room = seg_length[k] - sum - taken) {
      const int32_t drawn = draw_span_length(rng, p);
      lengths[next + taken] = drawn < room ? drawn : room;
      sum += lengths[next + taken++];
    }
    if (taken > 0) place_spans(lengths + next, taken, seg_length[k], seg_start[k], rng, out);
    next += taken;
    covered += sum;
  }
  return kOk;
}

// Sentence-level: whole sentences (runs ending with a sentence-end token, or just before [CLS] /
// <eos> or the row's end), in random order until they cover int(ratio * n) tokens.
GLM_HD int32_t sample_sentence_spans(const int64_t* row, int32_t n, const Params& p, Pcg32& rng,
                                     RowWorkspace& out) {
  int32_t num_sentences = 0, begin = 0;
  for (int32_t i = 0; i <= n; ++i) {
    const bool at_end = i == n;
    if (at_end || is_protected(row[i], p)) {
      if (begin < i) { out.start[num_sentences] = begin; out.end[num_sentences++] = i; }
      begin = i + 1;
    } else if (is_sentence_end(row[i], p)) {
      out.start[num_sentences] = begin;
      out.end[num_sentences++] = i + 1;
      begin = i + 1;
    }
  }
  if (num_sentences == 0) return kNoMaskableToken;
  int32_t* picked = out.lengths;
  for (int32_t i = 0; i < num_sentences; ++i) picked[i] = i;
  shuffle(picked, num_sentences, rng);
  const int32_t target = static_cast<int32_t>(p.mask_ratio * n);
  int32_t count = 0, covered = 0;
  do {
    const int32_t s = picked[count++];
    covered += out.end[s] - out.start[s];
  } while (covered < target && count < num_sentences);
  // Keep the chosen sentences, in text order.
  insertion_sort(picked, count);
  for (int32_t i = 0; i < count; ++i) {
    const int32_t s = picked[i];
    out.start[i] = out.start[s];
    out.end[i] = out.end[s];
  }
  out.count = count;
  return kOk;
}

// Document-level: one suffix of uniform length in [int(min_ratio * n), n - 2] (at least one
// token); the source keeps at least two tokens ([CLS] and one more).
GLM_HD int32_t sample_document_span(int32_t n, const Params& p, Pcg32& rng, RowWorkspace& out) {
  if (n < 3) return kTooShortForDocument;
  int32_t lo = static_cast<int32_t>(p.min_document_ratio * n);
  const int32_t hi = n - 2;
  lo = lo < 1 ? 1 : (lo > hi ? hi : lo);
  const int32_t length = lo + static_cast<int32_t>(rng.below(static_cast<uint32_t>(hi - lo + 1)));
  out.start[0] = n - length;
  out.end[0] = n;
  out.count = 1;
  return kOk;
}

// Samples the spans and Part B order of row `row_index` of a call. Returns a RowStatus.
GLM_HD int32_t sample_row(const int64_t* row, int32_t n, int32_t objective, const Params& p,
                          uint64_t row_index, RowWorkspace& out) {
  Pcg32 rng(p.seed, p.row_offset + row_index);
  out.count = 0;
  bool in_range = true;
  for (int32_t i = 0; i < n; ++i) in_range &= row[i] >= 0 && row[i] < p.vocab_size;
  if (!in_range) return kTokenOutOfRange;
  if (n == 0) return kOk;  // an empty row stays empty: no text, no blanks
  int32_t status;
  if (objective == kTokenLevel) status = sample_token_spans(row, n, p, rng, out);
  else if (objective == kSentenceLevel) status = sample_sentence_spans(row, n, p, rng, out);
  else status = sample_document_span(n, p, rng, out);
  if (status != kOk) return status;
  if (objective == kTokenLevel) {  // placement visits segments by length: restore text order
    for (int32_t i = 1; i < out.count; ++i) {
      const int32_t s = out.start[i], e = out.end[i];
      int32_t j = i - 1;
      while (j >= 0 && out.start[j] > s) { out.start[j + 1] = out.start[j]; out.end[j + 1] = out.end[j]; --j; }
      out.start[j + 1] = s;
      out.end[j + 1] = e;
    }
  }
  for (int32_t i = 0; i < out.count; ++i) out.order[i] = i;
  shuffle(out.order, out.count, rng);
  return kOk;
}

// Length of the assembled row: each span becomes one mask token in Part A and contributes
// span + 1 tokens to Part B; the document-level row drops Part B's final <eop> step.
GLM_HD int32_t assembled_length(int32_t n, int32_t num_spans, bool document_level) {
  return n + 2 * num_spans - (document_level && num_spans > 0 ? 1 : 0);
}

// Writes one row: tokens, targets, loss mask, positions, block positions (each `width` long,
// right-padded) and returns sep = len(Part A). `document_level` drops the last Part B input and
// the <eop> target (the authors' generation rows: Part B is <sop> + the continuation). Each
// output is written by its own plain loop so that compilers vectorise them.
GLM_HD int32_t assemble_row(const int64_t* __restrict__ row, int32_t n, const int32_t* start,
                            const int32_t* end, const int32_t* order, int32_t count,
                            int64_t mask_token, bool document_level, const Params& p,
                            int32_t width, int64_t* __restrict__ tokens,
                            int64_t* __restrict__ targets, int64_t* __restrict__ loss_mask,
                            int64_t* __restrict__ positions, int64_t* __restrict__ block_positions,
                            int32_t* mask_position) {
  // Part A: the text with each span replaced by one mask token; targets repeat it.
  int32_t out = 0, last = 0;
  for (int32_t s = 0; s <= count; ++s) {
    const int32_t run_end = s < count ? start[s] : n;
    for (int32_t i = last; i < run_end; ++i) tokens[out + i - last] = row[i];
    out += run_end - last;
    if (s < count) {
      mask_position[s] = out;
      tokens[out++] = mask_token;
      last = end[s];
    }
  }
  const int32_t sep = out;
  for (int32_t i = 0; i < sep; ++i) targets[i] = tokens[i];
  for (int32_t i = 0; i < sep; ++i) positions[i] = i;
  for (int32_t i = 0; i < sep; ++i) loss_mask[i] = 0;
  for (int32_t i = 0; i < sep; ++i) block_positions[i] = 0;
  // Part B, in the shuffled order: <sop> s1..sk -> s1..sk <eop>, at the mask's position.
  for (int32_t k = 0; k < count; ++k) {
    const int32_t s = order[k];
    const int32_t span = end[s] - start[s];
    const int32_t steps = span + 1 - (document_level ? 1 : 0);
    const int64_t* text = row + start[s];
    tokens[out] = p.sop_id;
    for (int32_t j = 1; j < steps; ++j) tokens[out + j] = text[j - 1];
    for (int32_t j = 0; j < span && j < steps; ++j) targets[out + j] = text[j];
    if (!document_level) targets[out + span] = p.eop_id;
    for (int32_t j = 0; j < steps; ++j) positions[out + j] = mask_position[s];
    for (int32_t j = 0; j < steps; ++j) block_positions[out + j] = j + 1;
    for (int32_t j = 0; j < steps; ++j) loss_mask[out + j] = 1;
    out += steps;
  }
  for (int32_t i = out; i < width; ++i) tokens[i] = p.pad_id;
  for (int32_t i = out; i < width; ++i) targets[i] = p.pad_id;
  for (int32_t i = out; i < width; ++i) loss_mask[i] = 0;
  for (int32_t i = out; i < width; ++i) positions[i] = 0;
  for (int32_t i = out; i < width; ++i) block_positions[i] = 0;
  return sep;
}

}  // namespace glm_ext::span_shuffle
