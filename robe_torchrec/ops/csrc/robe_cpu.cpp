// ROBE pooled lookup: CPU kernels (forward, dense backward, fused optimizer backward).
//
// The Python side (robe_torchrec/ops/cpu.py) builds this file with torch.utils.cpp_extension and
// exposes the kernel API of robe_torchrec/ops/reference.py, against which everything here is
// tested. The hash is the spec of robe_torchrec/hashing.py (version 1), reproduced bit for bit.
//
// Sizes: m (the array length) goes up to 2**48 and nnz * D can exceed 2**31, so every element
// position, record number and output offset is int64. Only the hash itself is 32-bit (by spec).
//
// Array dtypes: float32, bfloat16, float16 (check_train_array). Reduced arrays are read as float32
// (the serving readers below) and summed in float32 in the same order; the dense gradient is
// float32; the fused step computes in float32 and rounds on store (ArrayIO: to nearest even, or
// stochastically with a seed). grad_out, weights and optimizer state are always float32.
//
// Threading: plain OpenMP with num_threads(at::get_num_threads()), so torch.set_num_threads and
// OMP_NUM_THREADS apply. torch's wheel ships libgomp.so.1 under the same soname, so the process
// has one OpenMP runtime. Every result is independent of the number of threads (see backward).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// The hash (spec: robe_torchrec/hashing.py, HASH_VERSION 1). Unsigned 32-bit wrap-around is the
// spec's arithmetic, so uint32_t is exact here, unlike the split-int64 PyTorch version.
// ---------------------------------------------------------------------------------------------

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// x / d and x % d for a divisor fixed per call, without a 64-bit hardware division (tens of
// cycles, and the hot loops do one per block). Barrett reduction with inv = floor((2**64-1)/d):
// for x < 2**63, q_est = floor(x * inv / 2**64) is q or q - 1 (the error x/2**64 + x/(d*2**64)
// is below 1), so a single correction step gives the exact quotient and remainder.
// A power-of-two divisor (the usual block size Z) takes a shift and a mask instead.
struct FastDivMod {
  uint64_t d;
  uint64_t inv;
  int shift;  // log2(d) when d is a power of two, else -1
  explicit FastDivMod(uint64_t divisor)
      : d(divisor), inv(~uint64_t(0) / divisor), shift((divisor & (divisor - 1)) == 0 ? __builtin_ctzll(divisor) : -1) {}
  // Requires x < 2**63 (hash values are < 2**62, element positions < 2**48).
  inline void divmod(uint64_t x, uint64_t& q, uint64_t& r) const {
    if (shift >= 0) {
      q = x >> shift;
      r = x & (d - 1);
      return;
    }
    q = static_cast<uint64_t>((static_cast<unsigned __int128>(x) * inv) >> 64);
    r = x - q * d;
    if (r >= d) {
      q += 1;
      r -= d;
    }
  }
  inline uint64_t mod(uint64_t x) const {
    uint64_t q, r;
    divmod(x, q, r);
    return r;
  }
  inline uint64_t div(uint64_t x) const {
    uint64_t q, r;
    divmod(x, q, r);
    return q;
  }
};

// fmix(k0 ^ c) and fmix(k1 ^ c) depend only on (feature, block), not on the id: computed once
// per call for all F * num_blocks pairs instead of once per lookup.
struct HashPrefix {
  std::vector<uint32_t> h0, h1;  // [F * num_blocks]
};

HashPrefix hash_prefix(const int64_t* keys, int64_t num_features, int64_t num_blocks) {
  HashPrefix p;
  p.h0.resize(num_features * num_blocks);
  p.h1.resize(num_features * num_blocks);
  for (int64_t f = 0; f < num_features; ++f) {
    const uint32_t k0 = static_cast<uint32_t>(keys[2 * f]);
    const uint32_t k1 = static_cast<uint32_t>(keys[2 * f + 1]);
    for (int64_t c = 0; c < num_blocks; ++c) {
      p.h0[f * num_blocks + c] = fmix32(k0 ^ static_cast<uint32_t>(c));
      p.h1[f * num_blocks + c] = fmix32(k1 ^ static_cast<uint32_t>(c));
    }
  }
  return p;
}

// Block start in [0, m) from the per-(feature, block) prefixes: the rest of the spec's a, b, v.
inline int64_t block_start(uint32_t h0, uint32_t h1, int64_t id, const FastDivMod& m) {
  const uint64_t u = static_cast<uint64_t>(id);  // two's complement of the int64 id
  const uint32_t lo = static_cast<uint32_t>(u);
  const uint32_t hi = static_cast<uint32_t>(u >> 32);
  const uint32_t a = fmix32(fmix32(h0 ^ lo) ^ hi);
  const uint32_t b = fmix32(fmix32(fmix32(h1 ^ hi) ^ lo) ^ a);
  const uint64_t v = (static_cast<uint64_t>(a & 0x3FFFFFFFu) << 32) | b;  // 62 bits
  return static_cast<int64_t>(m.mod(v));
}

// ---------------------------------------------------------------------------------------------
// The hash, eight ids at a time (AVX2 + FMA, chosen at run time; same bits as block_start).
//
// The scalar hash is about a third of the forward and of the backward's index preparation: seven
// dependent 32-bit multiplies and a 64-bit Barrett reduction per block. AVX2 runs the fmix chains
// on eight ids per instruction. The reduction v mod m is done exactly in float64: with
// A = a & 0x3FFFFFFF = A1 * 2**15 + A0 (A1, A0 < 2**15), T1 = 2**47 mod m and T0 = 2**32 mod m,
//   v = A1 * 2**47 + A0 * 2**32 + b  ==  x = A1 * T1 + A0 * T0 + b   (mod m),
// and for m <= 2**36 every product is below 2**51 and x below 2**53: exact in a double. Then
// q = floor(x / m) (estimated by x * (1/m), off by at most one), r = x - q m (exact: one fused
// rounding of an integer below 2**53), one correction each way. Larger m (arrays over 256 GiB)
// and CPUs without AVX2 use the scalar hash. The build stays generic (no -march): only the
// functions marked ROBE_AVX2 use AVX2, and only after __builtin_cpu_supports says so.
// ---------------------------------------------------------------------------------------------

#if defined(__x86_64__) && defined(__GNUC__)
#define ROBE_HAVE_AVX2_PATH 1
#define ROBE_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#else
#define ROBE_HAVE_AVX2_PATH 0
#endif

constexpr uint64_t kSimdHashMaxElements = uint64_t(1) << 36;

// Which instruction set the hot loops use: ROBE_CPU_ISA=base forces the generic build (tests
// compare both paths; a measurement can A/B them); unset or "auto": AVX2 where the CPU has it.
bool use_avx2() {
#if ROBE_HAVE_AVX2_PATH
  const char* env = std::getenv("ROBE_CPU_ISA");
  const std::string mode = env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "base" || mode == "avx2",
              "robe cpu kernel: ROBE_CPU_ISA must be auto, base or avx2, got '", mode, "'");
  if (mode == "base") return false;
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  TORCH_CHECK(supported || mode == "auto", "robe cpu kernel: ROBE_CPU_ISA=avx2 but this CPU has no AVX2 + FMA");
  return supported;
#else
  const char* env = std::getenv("ROBE_CPU_ISA");
  TORCH_CHECK(env == nullptr || std::strcmp(env, "avx2") != 0,
              "robe cpu kernel: ROBE_CPU_ISA=avx2 needs an x86-64 build");
  return false;
#endif
}

// Block starts of n ids of one (feature, block) pair: out[i] = block_start(h0, h1, ids[i], m).
struct BlockHasher {
  FastDivMod mod_m;
  bool simd;
  double md, inv_m, t1, t0;  // m, 1 / m, 2**47 mod m, 2**32 mod m (the SIMD reduction)
  BlockHasher(uint64_t m, bool avx2)
      : mod_m(m),
        simd(avx2 && m <= kSimdHashMaxElements),
        md(static_cast<double>(m)),
        inv_m(1.0 / static_cast<double>(m)),
        t1(static_cast<double>((uint64_t(1) << 47) % m)),
        t0(static_cast<double>((uint64_t(1) << 32) % m)) {}
  void hash(const int64_t* ids, int64_t n, uint32_t h0, uint32_t h1, int64_t* out) const;
};

#if ROBE_HAVE_AVX2_PATH
ROBE_AVX2 inline __m256i fmix32x8(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

// x mod m for four exact integer doubles x < 2**53, as int64 (see the section comment).
ROBE_AVX2 inline __m256i mod_m_x4(__m256d x, __m256d md, __m256d inv_m) {
  const __m256d q = _mm256_round_pd(_mm256_mul_pd(x, inv_m), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(q, md, x);  // x - q m, exact
  r = _mm256_add_pd(r, _mm256_and_pd(_mm256_cmp_pd(r, _mm256_setzero_pd(), _CMP_LT_OQ), md));
  r = _mm256_sub_pd(r, _mm256_and_pd(_mm256_cmp_pd(r, md, _CMP_GE_OQ), md));
  // 0 <= r < 2**52: r + 2**52 has r as its mantissa bits.
  const __m256d magic = _mm256_set1_pd(4503599627370496.0);
  return _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(r, magic)), _mm256_castpd_si256(magic));
}

// Unsigned 32-bit lanes [4 * half, 4 * half + 4) of v as doubles.
ROBE_AVX2 inline __m256d u32_to_pd(__m256i v, int half) {
  const __m128i x = half == 0 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
  const __m256d flipped = _mm256_cvtepi32_pd(_mm_xor_si128(x, _mm_set1_epi32(static_cast<int>(0x80000000u))));
  return _mm256_add_pd(flipped, _mm256_set1_pd(2147483648.0));
}

// Ids [0, n - n % 8); the caller hashes the rest with the scalar hash.
ROBE_AVX2 void hash_ids_avx2(const int64_t* ids, int64_t n, uint32_t h0, uint32_t h1, double md, double inv_m,
                             double t1, double t0, int64_t* out) {
  const __m256i H0 = _mm256_set1_epi32(static_cast<int>(h0)), H1 = _mm256_set1_epi32(static_cast<int>(h1));
  const __m256i deinterleave = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256d MD = _mm256_set1_pd(md), INV = _mm256_set1_pd(inv_m), T1 = _mm256_set1_pd(t1),
                T0 = _mm256_set1_pd(t0);
  const __m256i mask30 = _mm256_set1_epi32(0x3FFFFFFF), mask15 = _mm256_set1_epi32(0x7FFF);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // ids i..i+3 and i+4..i+7 as [lo x4 | hi x4] each, then all eight low words and high words.
    const __m256i* at = reinterpret_cast<const __m256i*>(ids + i);
    const __m256i p0 = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(at), deinterleave);
    const __m256i p1 = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(at + 1), deinterleave);
    const __m256i lo = _mm256_permute2x128_si256(p0, p1, 0x20);
    const __m256i hi = _mm256_permute2x128_si256(p0, p1, 0x31);
    const __m256i a = fmix32x8(_mm256_xor_si256(fmix32x8(_mm256_xor_si256(H0, lo)), hi));
    const __m256i b =
        fmix32x8(_mm256_xor_si256(fmix32x8(_mm256_xor_si256(fmix32x8(_mm256_xor_si256(H1, hi)), lo)), a));
    const __m256i A = _mm256_and_si256(a, mask30);
    const __m256i A1 = _mm256_srli_epi32(A, 15), A0 = _mm256_and_si256(A, mask15);
    for (int half = 0; half < 2; ++half) {
      const __m256d x = _mm256_add_pd(
          _mm256_add_pd(_mm256_mul_pd(u32_to_pd(A1, half), T1), _mm256_mul_pd(u32_to_pd(A0, half), T0)),
          u32_to_pd(b, half));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 4 * half), mod_m_x4(x, MD, INV));
    }
  }
}
#endif

void BlockHasher::hash(const int64_t* ids, int64_t n, uint32_t h0, uint32_t h1, int64_t* out) const {
#if ROBE_HAVE_AVX2_PATH
  int64_t i = 0;
  if (simd) {
    hash_ids_avx2(ids, n, h0, h1, md, inv_m, t1, t0, out);
    i = n - n % 8;
  }
#else
  int64_t i = 0;
#endif
  for (; i < n; ++i) out[i] = block_start(h0, h1, ids[i], mod_m);
}

#if ROBE_HAVE_AVX2_PATH
// acc[0, n) += src[0, n) for n a multiple of 8: the forward's unweighted float32 block add, eight
// floats per instruction (the generic build's loop uses four). Same per-element sums and order.
ROBE_AVX2 void add_floats_avx2(float* acc, const float* src, int64_t n) {
  for (int64_t k = 0; k < n; k += 8)
    _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), _mm256_loadu_ps(src + k)));
}

// The same for a bfloat16 array: a bf16 value is the high half of its float32 (an exact upcast).
ROBE_AVX2 void add_bf16_avx2(float* acc, const uint16_t* src, int64_t n) {
  for (int64_t k = 0; k < n; k += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k));
    const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm256_storeu_ps(acc + k, _mm256_add_ps(_mm256_loadu_ps(acc + k), x));
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Input validation, shared by all entry points.
// ---------------------------------------------------------------------------------------------

struct Problem {
  int64_t F, B, D, Z, num_blocks, m, nnz, num_bags;
  at::Tensor indices, offsets, keys, mean, weights;  // contiguous CPU copies (or the inputs)
  const int64_t* idx = nullptr;
  const int64_t* off = nullptr;
  const bool* mean_p = nullptr;
  const float* w = nullptr;  // nullptr when unweighted
};

Problem make_problem(int64_t num_elements, const at::Tensor& indices, const at::Tensor& offsets,
                     const at::Tensor& hash_keys, const at::Tensor& mean,
                     const std::optional<at::Tensor>& per_sample_weights, int64_t batch_size,
                     int64_t dim, int64_t block_size) {
  TORCH_CHECK(indices.device().is_cpu() && offsets.device().is_cpu() && hash_keys.device().is_cpu() &&
                  mean.device().is_cpu(),
              "robe cpu kernel: all tensors must be on the CPU");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "robe cpu kernel: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "robe cpu kernel: offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(hash_keys.scalar_type() == at::kLong, "robe cpu kernel: hash_keys must be int64, got ",
              hash_keys.scalar_type());
  TORCH_CHECK(mean.scalar_type() == at::kBool, "robe cpu kernel: mean must be bool, got ", mean.scalar_type());
  TORCH_CHECK(indices.dim() == 1, "robe cpu kernel: indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK(offsets.dim() == 1, "robe cpu kernel: offsets must be 1-D, got shape ", offsets.sizes());
  TORCH_CHECK(hash_keys.dim() == 2 && hash_keys.size(1) == 2, "robe cpu kernel: hash_keys must be [F, 2], got ",
              hash_keys.sizes());
  TORCH_CHECK(block_size >= 1, "robe cpu kernel: block_size must be >= 1, got ", block_size);
  TORCH_CHECK(dim >= 1 && dim % block_size == 0, "robe cpu kernel: dim (", dim,
              ") must be a positive multiple of block_size (", block_size, ")");
  TORCH_CHECK(dim / block_size <= (int64_t(1) << 31), "robe cpu kernel: at most 2**31 blocks per row");
  TORCH_CHECK(num_elements >= block_size, "robe cpu kernel: num_elements (", num_elements,
              ") must be >= block_size (", block_size, ")");
  TORCH_CHECK(num_elements <= (int64_t(1) << 48), "robe cpu kernel: num_elements must be <= 2**48, got ",
              num_elements);
  TORCH_CHECK(batch_size >= 0, "robe cpu kernel: batch_size must be >= 0");

  Problem p;
  p.F = hash_keys.size(0);
  p.B = batch_size;
  p.D = dim;
  p.Z = block_size;
  p.num_blocks = dim / block_size;
  p.m = num_elements;
  p.nnz = indices.numel();
  p.num_bags = p.F * p.B;
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == p.F, "robe cpu kernel: mean must be [F] = [", p.F,
              "], got shape ", mean.sizes());
  TORCH_CHECK(offsets.numel() == p.num_bags + 1, "robe cpu kernel: offsets must have F * batch_size + 1 = ",
              p.num_bags + 1, " entries, got ", offsets.numel());

  p.indices = indices.contiguous();
  p.offsets = offsets.contiguous();
  p.keys = hash_keys.contiguous();
  p.mean = mean.contiguous();
  p.idx = p.indices.data_ptr<int64_t>();
  p.off = p.offsets.data_ptr<int64_t>();
  p.mean_p = p.mean.data_ptr<bool>();

  // Serial and O(F*B): the parallel loops below trust the offsets (and cannot throw).
  TORCH_CHECK(p.off[0] == 0, "robe cpu kernel: offsets[0] must be 0, got ", p.off[0]);
  TORCH_CHECK(p.off[p.num_bags] == p.nnz, "robe cpu kernel: offsets[-1] (", p.off[p.num_bags],
              ") must equal the number of indices (", p.nnz, ")");
  for (int64_t i = 0; i < p.num_bags; ++i) {
    TORCH_CHECK(p.off[i] <= p.off[i + 1], "robe cpu kernel: offsets must be non-decreasing (offsets[", i,
                "] = ", p.off[i], " > offsets[", i + 1, "] = ", p.off[i + 1], ")");
  }
  const int64_t* k = p.keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < 2 * p.F; ++i) {
    TORCH_CHECK(k[i] >= 0 && k[i] <= 0xFFFFFFFFll, "robe cpu kernel: hash keys must be uint32 values, got ", k[i]);
  }

  if (per_sample_weights.has_value() && per_sample_weights->defined()) {
    const at::Tensor& w = *per_sample_weights;
    TORCH_CHECK(w.device().is_cpu(), "robe cpu kernel: per_sample_weights must be on the CPU");
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "robe cpu kernel: per_sample_weights must be floating point, got ",
                w.scalar_type());
    TORCH_CHECK(w.dim() == 1 && w.numel() == p.nnz, "robe cpu kernel: per_sample_weights must be [nnz] = [",
                p.nnz, "], got shape ", w.sizes());
    // The reference multiplies by w.to(array dtype): the same values as converting here.
    p.weights = w.to(at::kFloat).contiguous();
    p.w = p.weights.data_ptr<float>();
  }
  return p;
}

void check_float_array(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "robe cpu kernel: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "robe cpu kernel: ", name, " must be float32, got ", t.scalar_type());
}

// The training array: float32, or bfloat16 / float16 (read as float32, updated in float32 and
// rounded back on store; optimizer state and gradients stay float32).
void check_train_array(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "robe cpu kernel: array must be on the CPU");
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf,
              "robe cpu kernel: array must be float32, bfloat16 or float16, got ", s);
}

// MEAN scale of a bag, computed as the reference does: 1.0f / float(len), 1 for SUM or empty.
inline float bag_scale(const Problem& p, int64_t f, int64_t bag) {
  const int64_t len = p.off[bag + 1] - p.off[bag];
  return (p.mean_p[f] && len > 0) ? 1.0f / static_cast<float>(len) : 1.0f;
}

int thread_count() { return std::max(1, at::get_num_threads()); }

// Block starts of the lookups of samples [b0, b1), all features, hashed before they are used:
// a feature's lookups of consecutive samples are contiguous in `indices`, so each (feature, block)
// pair hashes one contiguous run of ids (eight at a time with AVX2), and the gather or record
// loops that follow read starts instead of waiting on a hash's dependent multiplies.
// Start of block c of lookup i (a global lookup number) of feature f: at(f, c, i).
class StartTile {
 public:
  void fill(const Problem& p, const HashPrefix& hp, const BlockHasher& h, int64_t b0, int64_t b1) {
    const int64_t F = p.F, B = p.B, nb = p.num_blocks;
    base_.resize(F);
    n_.resize(F);
    i0_.resize(F);
    int64_t total = 0;
    for (int64_t f = 0; f < F; ++f) {
      i0_[f] = p.off[f * B + b0];
      n_[f] = p.off[f * B + b1] - i0_[f];
      base_[f] = total;
      total += n_[f] * nb;
    }
    if (static_cast<int64_t>(s_.size()) < total) s_.resize(total);
    for (int64_t f = 0; f < F; ++f)
      for (int64_t c = 0; c < nb; ++c)
        h.hash(p.idx + i0_[f], n_[f], hp.h0[f * nb + c], hp.h1[f * nb + c], s_.data() + base_[f] + c * n_[f]);
  }
  // Starts of feature f: row(f)[c * stride(f) + (i - first(f))].
  const int64_t* row(int64_t f) const { return s_.data() + base_[f]; }
  int64_t stride(int64_t f) const { return n_[f]; }
  int64_t first(int64_t f) const { return i0_[f]; }

 private:
  std::vector<int64_t> s_, base_, n_, i0_;
};

// Samples per tile: about 1024 block starts (8 KiB, L1-resident), but at least 16 samples
// (multi-hot features with a few ids per sample must still give the AVX2 hash runs of eight ids
// and more) unless that exceeds 64k starts (512 KiB), and at most 64. Measured on shapes a, b, c
// of bench.lookup: 16 samples beat 4, 8 and 32 (a: 1.27 vs 1.54-1.78 ms forward, b: 5.8 vs 6.5-7.1).
int64_t tile_samples(const Problem& p) {
  const int64_t per_sample = std::max<int64_t>(1, p.nnz * p.num_blocks / std::max<int64_t>(1, p.B));
  const int64_t t = std::max<int64_t>(1024 / per_sample, std::min<int64_t>(16, 65536 / per_sample));
  return std::max<int64_t>(1, std::min<int64_t>(64, t));
}

// ---------------------------------------------------------------------------------------------
// Forward: one bag per iteration; each bag's D output floats are written by exactly one thread.
// ---------------------------------------------------------------------------------------------

// Array readers: element e of the stored array as float. The float32 training array, and the
// serving formats of robe_torchrec/ops/stored_lookup.py (bf16 / fp16, and int8 codes with one
// float32 (scale, bias) per aligned Z-element row: value = code * scale[e / Z] + bias[e / Z]).
struct FloatReader {
  const float* M;
  float operator()(int64_t e) const { return M[e]; }
  void prefetch(int64_t e) const { __builtin_prefetch(M + e); }
};
template <typename T>
struct HalfReader {  // at::BFloat16 or at::Half, upcast to float
  const T* M;
  float operator()(int64_t e) const { return static_cast<float>(M[e]); }
  void prefetch(int64_t e) const { __builtin_prefetch(M + e); }
};
struct Int8RowwiseReader {
  const uint8_t* Q;
  const float* SB;  // [rows, 2]: scale, bias
  int64_t Z;
  float operator()(int64_t e) const {
    const int64_t r = e / Z;
    return static_cast<float>(Q[e]) * SB[2 * r] + SB[2 * r + 1];
  }
  void prefetch(int64_t e) const { __builtin_prefetch(Q + e); }
};

// A row-wise shard (LookupBatch.element_range): the array passed holds only the global elements
// [lo, hi) of the m-element array (lo a multiple of Z; hi one too, or m). Hashing still uses m;
// elements outside the range count 0. The unranged path is the instantiation Ranged = false.
struct ElementRange {
  int64_t lo = 0, hi = 0;
};

// out[k] = acc[k] * scale (or acc[k] when scale is 1: the same bits) for k < n, in one pass.
// (Non-temporal stores for large outputs were tried: 5-10% slower here, so plain stores.)
inline void write_row(float* out, const float* acc, int64_t n, float scale) {
  if (scale != 1.0f) {
    for (int64_t k = 0; k < n; ++k) out[k] = acc[k] * scale;
  } else {
    std::copy(acc, acc + n, out);
  }
}

template <bool Ranged, typename Reader>
at::Tensor pooled_forward_with(const Reader& read, const Problem& p, const at::TensorOptions& out_options,
                               ElementRange range = {}) {
  at::Tensor out = at::empty({p.B, p.F * p.D}, out_options.dtype(at::kFloat));
  float* O = out.data_ptr<float>();
  const HashPrefix hp = hash_prefix(p.keys.data_ptr<int64_t>(), p.F, p.num_blocks);
  const bool avx2 = use_avx2();
  const BlockHasher hasher(static_cast<uint64_t>(p.m), avx2);
  const int64_t F = p.F, B = p.B, D = p.D, Z = p.Z, nb = p.num_blocks, m = p.m;
  const int64_t T = tile_samples(p), tiles = (B + T - 1) / T;
  constexpr int64_t kPrefetchBags = 2;
  const bool wide_adds = avx2 && Z % 8 == 0;  // AVX2 block adds (float32 / bf16, unweighted, no wrap)

  // Tiles of samples in the output's memory order (each thread writes contiguous stretches of the
  // output); a tile's block starts are hashed first (StartTile), then its bags are summed. Bags
  // differ in length, hence dynamic scheduling; each bag is still summed by one thread in lookup
  // order, so the result is deterministic. A bag is summed in a per-thread scratch row
  // (L1-resident), then written to the output once, MEAN scale applied on the way: the output is
  // never zeroed nor read back.
#pragma omp parallel num_threads(thread_count())
  {
    std::vector<float> scratch(static_cast<size_t>(D));
    float* acc = scratch.data();
    StartTile tile;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t b0 = t * T, b1 = std::min(B, b0 + T);
      tile.fill(p, hp, hasher, b0, b1);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t f = 0; f < F; ++f) {
          const int64_t bag = f * B + b;
          if (!Ranged && f + kPrefetchBags < F) {  // (a row-wise shard reads local positions)
            // The array is cache-resident but not L1: ask for the blocks of the bag kPrefetchBags
            // on (its first and last element), whose starts the tile already holds.
            const int64_t g = f + kPrefetchBags, ahead = g * B + b;
            const int64_t* st = tile.row(g) - tile.first(g);
            for (int64_t i = p.off[ahead]; i < p.off[ahead + 1]; ++i) {
              for (int64_t c = 0; c < nb; ++c) {
                const int64_t e = st[c * tile.stride(g) + i];
                read.prefetch(e);
                read.prefetch(std::min(e + Z - 1, m - 1));
              }
            }
          }
          std::fill(acc, acc + D, 0.0f);
          const int64_t* starts = tile.row(f) - tile.first(f);
          const int64_t stride = tile.stride(f);
          for (int64_t i = p.off[bag]; i < p.off[bag + 1]; ++i) {
            const float w = p.w ? p.w[i] : 1.0f;
            for (int64_t c = 0; c < nb; ++c) {
              const int64_t s = starts[c * stride + i];
              float* dst = acc + c * Z;
              // A block is Z contiguous elements, wrapping from the end of the array to its start.
              const int64_t first = std::min(Z, m - s);
              if constexpr (Ranged) {
                // Only the block positions k whose element lies in [lo, hi): the head e = s + k
                // (k < first) and the wrapped part e = k - first (k >= first), each one interval of
                // k; `read` takes the local position e - lo.
                const int64_t lo = range.lo, hi = range.hi;
                const int64_t a0 = std::max<int64_t>(0, lo - s), a1 = std::min<int64_t>(first, hi - s);
                const int64_t w0 = std::max<int64_t>(first, lo + first), w1 = std::min<int64_t>(Z, hi + first);
                for (int64_t k = a0; k < a1; ++k) dst[k] += read(s + k - lo) * w;
                for (int64_t k = w0; k < w1; ++k) dst[k] += read(k - first - lo) * w;
              } else if (p.w) {
                for (int64_t k = 0; k < first; ++k) dst[k] += read(s + k) * w;
                for (int64_t k = first; k < Z; ++k) dst[k] += read(k - first) * w;
              } else {
  #if ROBE_HAVE_AVX2_PATH
                if constexpr (std::is_same_v<Reader, FloatReader>) {
                  if (wide_adds && first == Z) {
                    add_floats_avx2(dst, read.M + s, Z);
                    continue;
                  }
                } else if constexpr (std::is_same_v<Reader, HalfReader<at::BFloat16>>) {
                  if (wide_adds && first == Z) {
                    add_bf16_avx2(dst, reinterpret_cast<const uint16_t*>(read.M + s), Z);
                    continue;
                  }
                }
  #endif
                for (int64_t k = 0; k < first; ++k) dst[k] += read(s + k);
                for (int64_t k = first; k < Z; ++k) dst[k] += read(k - first);
              }
            }
          }
          // Reference layout: feature f owns columns [f*D, (f+1)*D) of row b.
          write_row(O + b * (F * D) + f * D, acc, D, bag_scale(p, f, bag));
        }
      }
    }
  }
  return out;
}

// Checks (lo, hi) against m and Z and the local array's length; true when it is a proper shard
// (false for the whole array [0, m), which takes the unranged path).
bool check_range(int64_t lo, int64_t hi, int64_t m, int64_t Z, int64_t local_numel, const char* what) {
  TORCH_CHECK(0 <= lo && lo < hi && hi <= m, "robe cpu kernel: element_range (", lo, ", ", hi,
              ") must satisfy 0 <= lo < hi <= num_elements (", m, ")");
  TORCH_CHECK(lo % Z == 0 && (hi % Z == 0 || hi == m), "robe cpu kernel: element_range (", lo, ", ", hi,
              ") must have lo and hi multiples of block_size (", Z, "), or hi == num_elements");
  TORCH_CHECK(local_numel == hi - lo, "robe cpu kernel: ", what, " has ", local_numel,
              " elements, element_range (", lo, ", ", hi, ") holds ", hi - lo);
  return !(lo == 0 && hi == m);
}

at::Tensor pooled_forward(const at::Tensor& array, const at::Tensor& indices, const at::Tensor& offsets,
                          const at::Tensor& hash_keys, const at::Tensor& mean,
                          const std::optional<at::Tensor>& per_sample_weights, int64_t batch_size, int64_t dim,
                          int64_t block_size, int64_t num_elements, int64_t element_lo, int64_t element_hi) {
  check_train_array(array);
  TORCH_CHECK(array.dim() == 1, "robe cpu kernel: array must be 1-D, got shape ", array.sizes());
  const Problem p = make_problem(num_elements, indices, offsets, hash_keys, mean, per_sample_weights, batch_size,
                                 dim, block_size);
  const bool ranged = check_range(element_lo, element_hi, p.m, p.Z, array.numel(), "array");
  const at::Tensor arr = array.contiguous();
  const ElementRange range{element_lo, element_hi};
  // bf16 / fp16 arrays go through the serving path's readers: float32 accumulation, same order.
  const auto run = [&](const auto& read) {
    return ranged ? pooled_forward_with<true>(read, p, array.options(), range)
                  : pooled_forward_with<false>(read, p, array.options());
  };
  switch (arr.scalar_type()) {
    case at::kBFloat16:
      return run(HalfReader<at::BFloat16>{arr.data_ptr<at::BFloat16>()});
    case at::kHalf:
      return run(HalfReader<at::Half>{arr.data_ptr<at::Half>()});
    default:
      return run(FloatReader{arr.data_ptr<float>()});
  }
}

// Forward on a stored (serving) array: float32, bfloat16, float16, or uint8 codes with
// scale_bias [ceil(m / Z), 2] float32 (int8 row-wise). Float32 accumulation, same order as above.
at::Tensor pooled_forward_stored(const at::Tensor& data, const std::optional<at::Tensor>& scale_bias,
                                 const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& hash_keys,
                                 const at::Tensor& mean, const std::optional<at::Tensor>& per_sample_weights,
                                 int64_t batch_size, int64_t dim, int64_t block_size) {
  TORCH_CHECK(data.device().is_cpu() && data.dim() == 1, "robe cpu kernel: data must be a 1-D CPU tensor");
  const Problem p = make_problem(data.numel(), indices, offsets, hash_keys, mean, per_sample_weights, batch_size,
                                 dim, block_size);
  const at::Tensor d = data.contiguous();
  switch (d.scalar_type()) {
    case at::kFloat:
      return pooled_forward_with<false>(FloatReader{d.data_ptr<float>()}, p, d.options());
    case at::kBFloat16:
      return pooled_forward_with<false>(HalfReader<at::BFloat16>{d.data_ptr<at::BFloat16>()}, p, d.options());
    case at::kHalf:
      return pooled_forward_with<false>(HalfReader<at::Half>{d.data_ptr<at::Half>()}, p, d.options());
    case at::kByte: {
      TORCH_CHECK(scale_bias.has_value() && scale_bias->defined(), "robe cpu kernel: int8 data needs scale_bias");
      const at::Tensor sb = scale_bias->contiguous();
      const int64_t rows = (p.m + p.Z - 1) / p.Z;
      TORCH_CHECK(sb.scalar_type() == at::kFloat && sb.dim() == 2 && sb.size(0) == rows && sb.size(1) == 2,
                  "robe cpu kernel: scale_bias must be float32 [", rows, ", 2], got ", sb.scalar_type(), " ",
                  sb.sizes());
      return pooled_forward_with<false>(Int8RowwiseReader{d.data_ptr<uint8_t>(), sb.data_ptr<float>(), p.Z}, p, d.options());
    }
    default:
      TORCH_CHECK(false, "robe cpu kernel: stored arrays are float32, bfloat16, float16 or uint8, got ",
                  d.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.
//
// A record is one (lookup, block) pair: it adds its Z gradient values (grad_out[b, f*D + c*Z + k]
// * MEAN scale * weight) to the Z elements from its block start s. Records are numbered in
// grad_out's memory order (sample b, feature f, lookup, block c), the order step 4 streams in.
// Chunk j is the aligned range [j*Z, min((j+1)*Z, m)). A record's block is made of up to three
// pieces: the head, in its first chunk j = s / Z; the tail, in chunk j + 1 when s is not aligned
// and chunk j + 1 exists; the wrap, at the start of chunk 0 when the block runs past m (head, tail
// and wrap all occur only when a block crosses a partial last chunk entirely).
//
// The backward never builds a gradient of the whole array. Two index preparations give the same
// bits: the sort-free chunk map (touched_map_backward, the default) and the records path
// (records_backward, for huge sparsely touched arrays; see use_touched_map). The records path
//   1. computes every record's start, and its sort key (first chunk, spills into j + 1?);
//   2. stable-sorts (key, record) pairs (parallel LSD radix sort over the bits a chunk number has);
//   3. walks them once to list the touched chunks in increasing order (the compact slots) and
//      give every record the slot of its first chunk. Slots are consecutive for consecutive
//      touched chunks, so a record's tail is in slot + 1; chunk 0, when touched, is slot 0;
//   4. accumulates into a compact gradient [touched chunks, Z] with thread ownership: thread t
//      owns a contiguous range of slots (balanced by records) and scans every record in order
//      (one sequential pass over grad_out and the record arrays), adding only the pieces that
//      fall in its slots. The scan of non-owned records costs 8 bytes each (their slot number);
//      with many threads a per-owner bucketing pass would avoid it, at 2-16 threads it is cheap;
//   5. hands each touched chunk's gradient to the consumer (optimizer step or dense copy),
//      in parallel over slots (chunks are disjoint: no two threads write the same element).
// No atomics, no races; every element sums its contributions in record order whatever
// the number of threads, so results are bit-identical run to run and across thread counts.
// Memory is O(records + touched chunks * Z), never O(m) (except the dense API's own output).
// ---------------------------------------------------------------------------------------------

struct KeyedRecord {
  uint64_t key;  // (first chunk << 1) | (1 if the block has a tail in chunk first + 1)
  uint64_t record;
};

// The pieces of the block starting at s: fn(kind, position_in_chunk, position_in_block, length),
// kind 0 = head (first chunk), 1 = tail (first chunk + 1), 2 = wrap (chunk 0). Needs m >= Z.
template <typename Fn>
inline void for_each_piece(uint64_t s, uint64_t Z, uint64_t m, const FastDivMod& div_z, Fn&& fn) {
  uint64_t j, at;
  div_z.divmod(s, j, at);
  const uint64_t head = std::min(Z - at, m - s);  // the first chunk may be the partial last one
  fn(0, at, uint64_t(0), head);
  uint64_t done = head;
  if (done < Z && s + head < m) {  // the tail starts chunk j + 1, which exists
    const uint64_t tail = std::min(Z - done, m - (s + head));
    fn(1, uint64_t(0), done, tail);
    done += tail;
  }
  if (done < Z) fn(2, uint64_t(0), done, Z - done);  // ran past m: the rest wraps into chunk 0
}

// dst[k] += src[k] (times the bag's MEAN scale and the lookup's weight) for k < n, rounded as the
// reference: (g * bag_scale) * weight, each product in float32. n is the block size Z on the fast
// path; Z = 32 (the default) gets a loop of known length.
inline void add_block(float* dst, const float* src, uint64_t n, bool weighted, float scale, float w) {
  if (weighted) {
    for (uint64_t e = 0; e < n; ++e) dst[e] += (src[e] * scale) * w;
  } else if (scale != 1.0f) {
    for (uint64_t e = 0; e < n; ++e) dst[e] += src[e] * scale;
  } else if (n == 32) {
    for (uint64_t e = 0; e < 32; ++e) dst[e] += src[e];
  } else {
    for (uint64_t e = 0; e < n; ++e) dst[e] += src[e];
  }
}

// Splits [0, n) into `parts` contiguous ranges of near-equal size: range t is [bound(t), bound(t+1)).
inline int64_t even_bound(int64_t n, int64_t parts, int64_t t) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(n) * t) / parts);
}

// Uninitialised storage that only reallocates to grow: the backward runs every training step with
// similar sizes, and fresh multi-megabyte allocations would cost a page fault per 4 KiB each time
// (about a fifth of the backward's time at batch 2048 x 26 features).
template <typename T>
class Buffer {
 public:
  T* resize(size_t n) {
    if (n > capacity_) {
      capacity_ = n + n / 8;
      data_.reset(new T[capacity_]);  // trivial T: default-initialised, i.e. not zeroed
    }
    size_ = n;
    return data_.get();
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  size_t size() const { return size_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
  size_t capacity_ = 0, size_ = 0;
};

// A record on the chunk map path's owner lists: 24 bytes in general, 16 when every bag is a SUM
// bag without weights (scale = w = 1: DLRM's usual case), since list traffic is most of the
// listing phase on multi-hot batches (1.8M records at shape (b): 42 MB written, then read).
struct OwnedRecord {
  int64_t start;  // block start
  int64_t grad;   // offset of the block's gradient in grad_out
  float scale;    // MEAN scale of its bag
  float w;        // its per-sample weight (1 when unweighted)
};
struct PlainRecord {
  int64_t start;
  int64_t grad;
};
template <bool Plain>
using ListRecord = std::conditional_t<Plain, PlainRecord, OwnedRecord>;
template <bool Plain>
inline ListRecord<Plain> list_record(int64_t start, int64_t grad, float scale, float w) {
  if constexpr (Plain) {
    return PlainRecord{start, grad};
  } else {
    return OwnedRecord{start, grad, scale, w};
  }
}
template <bool Plain>
inline float record_scale(const ListRecord<Plain>& r) {
  if constexpr (Plain) return 1.0f; else return r.scale;
}
template <bool Plain>
inline float record_weight(const ListRecord<Plain>& r) {
  if constexpr (Plain) return 1.0f; else return r.w;
}

// Scratch of one backward call: the compact gradient, plus about 48 bytes per record on the records
// path, 16 or 24 on the chunk map path.
struct Workspace {
  Buffer<int64_t> start;        // [R] block start of each record
  Buffer<KeyedRecord> sorted;   // [R] (key, record), sorted by key after the radix sort
  Buffer<KeyedRecord> scratch;  // [R] the radix sort's other half
  Buffer<int64_t> first_slot;   // [R] compact slot of each record's first chunk
  Buffer<int64_t> record_base;  // [F * B] number of each bag's first record
  Buffer<float> grad;           // [U * Z] compact gradient of the touched chunks
  Buffer<uint32_t> slot_of_chunk;  // [ceil(m / Z)] chunk map path: 1 if touched, then its slot
  std::vector<Buffer<OwnedRecord>> owned;  // chunk map path: [producer * owners + owner] lists
  std::vector<Buffer<PlainRecord>> owned_plain;  // the same, 16-byte records (SUM bags, no weights)
  std::vector<int64_t> owned_count;        // [producer * owners + owner]: records in each list
  std::vector<uint64_t> chunk_of_slot;  // [U] touched chunks, increasing
  bool any_wrap = false;                // some block runs past m: chunk 0 is touched
};

// The process keeps one workspace (the largest batch's scratch stays allocated). A call that finds
// it in use (backward running concurrently from another Python thread) gets a private one.
class WorkspaceLease {
 public:
  WorkspaceLease() : lock_(mutex(), std::try_to_lock) {
    if (lock_.owns_lock()) {
      ws_ = &shared();
    } else {
      own_ = std::make_unique<Workspace>();
      ws_ = own_.get();
    }
  }
  Workspace& operator*() { return *ws_; }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static Workspace& shared() {
    static Workspace w;
    return w;
  }
  std::unique_lock<std::mutex> lock_;
  std::unique_ptr<Workspace> own_;
  Workspace* ws_ = nullptr;
};

// Records are numbered in grad_out's memory order (sample, feature, lookup, block), the order
// the accumulation streams through: bag (f, b)'s first record, serially (O(F*B)).
const int64_t* record_bases(const Problem& p, Workspace& ws) {
  const int64_t B = p.B, F = p.F, nb = p.num_blocks;
  int64_t* base = ws.record_base.resize(p.num_bags);
  int64_t next = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      base[f * B + b] = next;
      next += (p.off[f * B + b + 1] - p.off[f * B + b]) * nb;
    }
  }
  return base;
}

// ROBE_CPU_PROFILE=1: the backward prints its phases' wall times to stderr (a profiling aid; the
// phases are separated by the parallel regions' barriers, so the times add up to the call's).
class PhaseClock {
 public:
  PhaseClock() : on_(profiling()), last_(on_ ? omp_get_wtime() : 0.0) {}
  void lap(const char* phase) {
    if (!on_) return;
    const double now = omp_get_wtime();
    char buf[96];
    std::snprintf(buf, sizeof(buf), " %s %.3f ms;", phase, (now - last_) * 1e3);
    line_ += buf;
    last_ = now;
  }
  ~PhaseClock() {
    if (on_ && !line_.empty()) std::fprintf(stderr, "[robe cpu backward]%s\n", line_.c_str());
  }

 private:
  static bool profiling() {
    const char* env = std::getenv("ROBE_CPU_PROFILE");
    return env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0;
  }
  bool on_;
  double last_;
  std::string line_;
};

void compute_records(const Problem& p, const FastDivMod& div_z, Workspace& ws) {
  const int64_t nb = p.num_blocks, R = p.nnz * nb;
  int64_t* start = ws.start.resize(R);
  KeyedRecord* sorted = ws.sorted.resize(R);
  const HashPrefix hp = hash_prefix(p.keys.data_ptr<int64_t>(), p.F, nb);
  const FastDivMod mod_m(static_cast<uint64_t>(p.m));
  const int64_t B = p.B, F = p.F;
  const uint64_t Z = p.Z, m = p.m;
  const int64_t* base = record_bases(p, ws);
  bool any_wrap = false;
  // Parallel over samples, so that each thread writes one contiguous stretch of records.
#pragma omp parallel for schedule(dynamic, 16) num_threads(thread_count()) reduction(|| : any_wrap)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t f = 0; f < F; ++f) {
      const int64_t bag = f * B + b;
      const uint32_t* h0 = hp.h0.data() + f * nb;
      const uint32_t* h1 = hp.h1.data() + f * nb;
      int64_t r = base[bag];
      for (int64_t i = p.off[bag]; i < p.off[bag + 1]; ++i) {
        for (int64_t c = 0; c < nb; ++c, ++r) {
          const uint64_t s = static_cast<uint64_t>(block_start(h0[c], h1[c], p.idx[i], mod_m));
          uint64_t j, at;
          div_z.divmod(s, j, at);
          const bool tail = at != 0 && (j + 1) * Z < m;
          start[r] = static_cast<int64_t>(s);
          sorted[r] = KeyedRecord{(j << 1) | uint64_t(tail), static_cast<uint64_t>(r)};
          any_wrap = any_wrap || s + Z > m;
        }
      }
    }
  }
  ws.any_wrap = any_wrap;
}

// Stable LSD radix sort by key, only over the bits a key can have (ceil(m / Z) chunks, plus the
// tail bit: 15 bits for a 1.3M-element array with Z = 32, so two passes). Each pass: per-task
// digit histograms, one serial scan in (digit, task) order, per-task scatter. A stable sort has
// one possible output, so the result does not depend on the number of tasks.
// Returns where the sorted data ended up: `a` or `tmp` (both n long).
KeyedRecord* radix_sort(KeyedRecord* a, KeyedRecord* tmp, int64_t n, uint64_t max_key) {
  int key_bits = 0;
  while (key_bits < 64 && (max_key >> key_bits) != 0) ++key_bits;
  if (n <= 1 || key_bits == 0) return a;
  const int passes = (key_bits + 10) / 11;
  const int digit_bits = (key_bits + passes - 1) / passes;
  const int64_t buckets = int64_t(1) << digit_bits;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(thread_count(), n / 32768 + 1));
  std::vector<int64_t> hist(tasks * buckets);
  KeyedRecord* src = a;
  KeyedRecord* dst = tmp;
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * digit_bits;
    const uint64_t mask = static_cast<uint64_t>(buckets - 1);
    std::fill(hist.begin(), hist.end(), 0);
#pragma omp parallel for schedule(static, 1) num_threads(thread_count())
    for (int64_t t = 0; t < tasks; ++t) {
      int64_t* h = hist.data() + t * buckets;
      for (int64_t i = even_bound(n, tasks, t); i < even_bound(n, tasks, t + 1); ++i) ++h[(src[i].key >> shift) & mask];
    }
    int64_t sum = 0;
    for (int64_t d = 0; d < buckets; ++d) {
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t c = hist[t * buckets + d];
        hist[t * buckets + d] = sum;
        sum += c;
      }
    }
#pragma omp parallel for schedule(static, 1) num_threads(thread_count())
    for (int64_t t = 0; t < tasks; ++t) {
      int64_t* h = hist.data() + t * buckets;
      for (int64_t i = even_bound(n, tasks, t); i < even_bound(n, tasks, t + 1); ++i)
        dst[h[(src[i].key >> shift) & mask]++] = src[i];
    }
    std::swap(src, dst);
  }
  return src;
}

void check_grad_out(const Problem& p, const at::Tensor& grad_out) {
  check_float_array(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == p.B && grad_out.size(1) == p.F * p.D,
              "robe cpu kernel: grad_out must be [batch_size, F * dim] = [", p.B, ", ", p.F * p.D, "], got shape ",
              grad_out.sizes());
}

// Steps 1-5 above (grad_out already checked): calls consume(chunk, first_element, length, gradient)
// exactly once per touched chunk, with `gradient` holding that chunk's `length` summed values.
// With a row-wise shard `range` (bounds on chunk boundaries: every chunk is wholly in or out), only
// the touched chunks inside [range.lo, range.hi) are accumulated and consumed: they are one
// contiguous run of slots (slots follow chunk order), and steps 4-5 are restricted to it, so pieces
// of blocks that fall on other ranks' elements are skipped by the same ownership test as the
// slots of other threads. The whole array is range [0, m): the unranged path, unchanged.
template <typename Consume>
void records_backward(const Problem& p, const float* G, ElementRange range, const FastDivMod& div_z, Workspace& ws,
                      PhaseClock& clock, Consume&& consume) {
  const uint64_t Z = p.Z, m = p.m;
  const uint64_t num_chunks = (m + Z - 1) / Z;

  // Steps 1 and 2.
  compute_records(p, div_z, ws);
  clock.lap("records");
  const int64_t R = static_cast<int64_t>(ws.start.size());
  const KeyedRecord* sorted =
      radix_sort(ws.sorted.data(), ws.scratch.resize(R), R, ((num_chunks - 1) << 1) | 1);
  clock.lap("radix sort");

  // Step 3, serial: one pass over the sorted keys (cheap next to the gradient traffic).
  std::vector<uint64_t>& chunk_of_slot = ws.chunk_of_slot;
  chunk_of_slot.clear();
  int64_t* first_slot = ws.first_slot.resize(R);
  if (ws.any_wrap) chunk_of_slot.push_back(0);  // wraps land in chunk 0: it must be slot 0
  {
    uint64_t cur = ~uint64_t(0);
    int64_t slot = -1;
    bool tail_listed = false;
    for (int64_t k = 0; k < R; ++k) {
      const uint64_t j = sorted[k].key >> 1;
      if (j != cur) {
        cur = j;
        // The previous chunk's tails (or the wrap) may have listed j already: then it is last.
        if (chunk_of_slot.empty() || chunk_of_slot.back() != j) chunk_of_slot.push_back(j);
        slot = static_cast<int64_t>(chunk_of_slot.size()) - 1;
        tail_listed = false;
      }
      first_slot[sorted[k].record] = slot;
      if ((sorted[k].key & 1) && !tail_listed) {
        chunk_of_slot.push_back(j + 1);
        tail_listed = true;
      }
    }
  }
  const int64_t U = static_cast<int64_t>(chunk_of_slot.size());
  clock.lap("slots");
  // The slots [slot_lo, slot_hi) of the chunks in the range, and the sorted records [k_lo, k_hi)
  // whose first chunk is in it (to balance the threads over).
  const uint64_t chunk_lo = static_cast<uint64_t>(range.lo) / Z;
  const uint64_t chunk_hi = (static_cast<uint64_t>(range.hi) + Z - 1) / Z;
  const int64_t slot_lo =
      std::lower_bound(chunk_of_slot.begin(), chunk_of_slot.end(), chunk_lo) - chunk_of_slot.begin();
  const int64_t slot_hi =
      std::lower_bound(chunk_of_slot.begin(), chunk_of_slot.end(), chunk_hi) - chunk_of_slot.begin();
  if (slot_lo >= slot_hi) return;  // nothing in the range was touched
  const auto first_at_or_after = [&](uint64_t chunk) -> int64_t {
    return std::lower_bound(sorted, sorted + R, chunk << 1,
                            [](const KeyedRecord& a, uint64_t key) { return a.key < key; }) -
           sorted;
  };
  const int64_t k_lo = chunk_lo == 0 ? 0 : first_at_or_after(chunk_lo);
  const int64_t k_hi = chunk_hi >= num_chunks ? R : first_at_or_after(chunk_hi);

  // Step 4. Slot ranges cut where the sorted records split evenly (so hot chunks do not pile onto
  // one thread), moved to a first-chunk boundary. One task per thread; each scans all records (a
  // sequential read of first_slot) and reads the gradient rows of those with a piece in its range.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(thread_count(), R / 8192 + 1));
  std::vector<int64_t> slot_cut(tasks + 1);
  slot_cut[0] = slot_lo;
  slot_cut[tasks] = slot_hi;
  for (int64_t t = 1; t < tasks; ++t) {
    int64_t k = k_lo + even_bound(k_hi - k_lo, tasks, t);
    while (k < k_hi && k > 0 && (sorted[k].key >> 1) == (sorted[k - 1].key >> 1)) ++k;
    slot_cut[t] = k < k_hi ? first_slot[sorted[k].record] : slot_hi;
  }
  float* grad_c = ws.grad.resize(static_cast<size_t>(U) * Z);  // compact gradient [U, Z]
  const int64_t* start = ws.start.data();
  const bool any_wrap = ws.any_wrap;
  const float* W = p.w;
  const int64_t F = p.F, B = p.B, D = p.D, nb = p.num_blocks;
  constexpr int64_t kAhead = 8;
#pragma omp parallel for schedule(static, 1) num_threads(thread_count())
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t lo = slot_cut[t], hi = slot_cut[t + 1];
    if (lo >= hi) continue;
    std::fill(grad_c + lo * Z, grad_c + hi * Z, 0.0f);  // the owner zeroes its slots (first touch)
    const bool owns_wraps = any_wrap && lo == 0;
    // Records in their (grad_out memory) order: the gradient and the per-record arrays are
    // read as sequential streams. The compact gradient is not: prefetch the destination of the
    // record kAhead places on (a block's head and tail are contiguous there, slots j and j+1).
    int64_t r = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t f = 0; f < F; ++f) {
        const int64_t bag = f * B + b;
        const float* g_bag = G + b * (F * D) + f * D;
        const float scale = bag_scale(p, f, bag);
        for (int64_t i = p.off[bag]; i < p.off[bag + 1]; ++i) {
          const float w = W ? W[i] : 1.0f;
          for (int64_t c = 0; c < nb; ++c, ++r) {
            if (r + kAhead < R) {  // a hint: may point past the buffer's end, never faults
              const float* ahead =
                  grad_c + first_slot[r + kAhead] * Z + div_z.mod(static_cast<uint64_t>(start[r + kAhead]));
              __builtin_prefetch(ahead, 1);
              __builtin_prefetch(ahead + Z - 1, 1);
            }
            const int64_t slot = first_slot[r];
            // Head in `slot`, tail in `slot + 1`, wrap in slot 0: skip records with nothing here.
            const bool wraps = static_cast<uint64_t>(start[r]) + Z > m;
            if ((slot + 1 < lo || slot >= hi) && !(owns_wraps && wraps)) continue;
            const float* g = g_bag + c * Z;
            for_each_piece(start[r], Z, m, div_z, [&](int kind, uint64_t at, uint64_t from, uint64_t len) {
              const int64_t target = kind == 0 ? slot : kind == 1 ? slot + 1 : 0;
              if (target < lo || target >= hi) return;
              float* dst = grad_c + target * Z + at;
              const float* src = g + from;
              // Rounded as the reference: (g * bag_scale) * weight, each product in float32.
              if (W) {
                for (uint64_t k = 0; k < len; ++k) dst[k] += (src[k] * scale) * w;
              } else if (scale != 1.0f) {
                for (uint64_t k = 0; k < len; ++k) dst[k] += src[k] * scale;
              } else {
                for (uint64_t k = 0; k < len; ++k) dst[k] += src[k];
              }
            });
          }
        }
      }
    }
  }

  clock.lap("accumulate");

  // Step 5.
#pragma omp parallel for schedule(static) num_threads(thread_count())
  for (int64_t u = slot_lo; u < slot_hi; ++u) {
    const uint64_t first = chunk_of_slot[u] * Z;
    consume(chunk_of_slot[u], static_cast<int64_t>(first), static_cast<int64_t>(std::min(Z, m - first)),
            grad_c + u * Z);
  }
  clock.lap("update");
}

// Sort-free path (the GPU's default, robe_torchrec/ops/triton/fused.py), same result bits as the
// records path: every element still sums its contributions in record order.
//   1. the range's chunks are cut into `tasks` contiguous owner ranges (evenly: hashed starts are
//      uniform). Producer task p takes samples [B p / tasks, B (p + 1) / tasks) (records in
//      order), computes each record's start, marks the chunks its block touches (first chunk,
//      the tail's chunk + 1, chunk 0 on a wrap) in a ceil(m / Z) map (relaxed stores of 1: every
//      writer stores the same value), and appends the record to list (p, owner) of each owner
//      of a chunk it touches (start, gradient offset, scale, weight: 24 bytes; 16 without the
//      last two when every bag is an unweighted SUM bag);
//   2. one serial pass over the map numbers the touched chunks in increasing order (the compact
//      slots; chunk 0, when touched, is slot 0);
//   3. owner t zeroes its compact rows, reads lists (0, t), (1, t), ... in that order (so in
//      record order), adds the pieces that fall in its chunks, then hands its touched chunks to
//      the consumer while they are still in its cache.
// No sort, no atomics on the gradient, and no thread scans records it does not own. Extra
// memory: 4 bytes per chunk, about 24 per record and the compact gradient.

template <bool Plain, typename Consume>
void touched_map_backward(const Problem& p, const float* G, ElementRange range, const FastDivMod& div_z,
                          Workspace& ws, PhaseClock& clock, Consume&& consume) {
  const uint64_t Z = p.Z, m = p.m;
  const uint64_t num_chunks = (m + Z - 1) / Z;
  const int64_t nb = p.num_blocks, R = p.nnz * nb, F = p.F, B = p.B, D = p.D;
  uint32_t* map = ws.slot_of_chunk.resize(num_chunks);
  std::memset(map, 0, num_chunks * sizeof(uint32_t));
  const HashPrefix hp = hash_prefix(p.keys.data_ptr<int64_t>(), F, nb);
  const BlockHasher hasher(m, use_avx2());
  const int64_t T = tile_samples(p);
  const uint64_t chunk_lo = static_cast<uint64_t>(range.lo) / Z;
  const uint64_t chunk_hi = (static_cast<uint64_t>(range.hi) + Z - 1) / Z;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(thread_count(), R / 8192 + 1));
  std::vector<uint64_t> chunk_cut(tasks + 1);
  for (int64_t t = 0; t <= tasks; ++t)
    chunk_cut[t] = chunk_lo + static_cast<uint64_t>(even_bound(static_cast<int64_t>(chunk_hi - chunk_lo), tasks, t));
  // The owner of chunk j (-1 outside the range). Hashed chunks are random, so a search loop's
  // branches would mispredict about once per record: count the cuts at or below j instead
  // (compare-and-add, no branch on j) when there are few owners.
  const uint64_t* cut = chunk_cut.data();
  const auto owner_of = [&, cut](uint64_t j) -> int64_t {
    if (j < chunk_lo || j >= chunk_hi) return -1;
    if (tasks <= 16) {
      int64_t t = 0;
      for (int64_t k = 1; k < tasks; ++k) t += static_cast<int64_t>(j >= cut[k]);
      return t;
    }
    return static_cast<int64_t>(std::upper_bound(cut + 1, cut + tasks, j) - (cut + 1));
  };
  using Record = ListRecord<Plain>;
  std::vector<Buffer<Record>>& lists = [&]() -> std::vector<Buffer<Record>>& {
    if constexpr (Plain) return ws.owned_plain; else return ws.owned;
  }();
  if (static_cast<int64_t>(lists.size()) < tasks * tasks) lists.resize(tasks * tasks);
  ws.owned_count.assign(tasks * tasks, 0);
  const auto mark = [map](uint64_t j) {
    __atomic_store_n(map + j, 1u, __ATOMIC_RELAXED);
  };

  // Step 1, a tile of samples at a time: the tile's starts are hashed first (StartTile), then its
  // records are listed in record order. Marks are relaxed stores of 1 (every writer stores the
  // same value; a load-then-store mispredicts on sparsely touched arrays).
#pragma omp parallel for schedule(static, 1) num_threads(thread_count())
  for (int64_t pt = 0; pt < tasks; ++pt) {
    // Each list gets room for all of this producer's records (a record enters a list at most
    // once); the storage is kept between calls and only the pages written are ever touched.
    const int64_t b_begin = even_bound(B, tasks, pt), b_end = even_bound(B, tasks, pt + 1);
    int64_t produced = 0;
    for (int64_t f = 0; f < F; ++f) produced += (p.off[f * B + b_end] - p.off[f * B + b_begin]) * nb;
    std::vector<Record*> out(tasks);
    std::vector<int64_t> count(tasks, 0);
    for (int64_t t = 0; t < tasks; ++t) out[t] = lists[pt * tasks + t].resize(produced);
    const auto append = [&](int64_t owner, const Record& rec) { out[owner][count[owner]++] = rec; };
    StartTile tile;
    for (int64_t b0 = b_begin; b0 < b_end; b0 += T) {
      const int64_t b1 = std::min(b_end, b0 + T);
      tile.fill(p, hp, hasher, b0, b1);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t f = 0; f < F; ++f) {
          const int64_t bag = f * B + b;
          const int64_t* starts = tile.row(f) - tile.first(f);
          const int64_t stride = tile.stride(f);
          const float scale = bag_scale(p, f, bag);
          const int64_t g_bag = b * (F * D) + f * D;
          for (int64_t i = p.off[bag]; i < p.off[bag + 1]; ++i) {
            const float w = p.w ? p.w[i] : 1.0f;
            for (int64_t c = 0; c < nb; ++c) {
              const uint64_t s = static_cast<uint64_t>(starts[c * stride + i]);
              const Record rec = list_record<Plain>(static_cast<int64_t>(s), g_bag + c * p.Z, scale, w);
              uint64_t j, at;
              div_z.divmod(s, j, at);
              mark(j);
              const int64_t o0 = owner_of(j);
              if (o0 >= 0) append(o0, rec);
              int64_t o1 = -1;
              if (at != 0 && (j + 1) * Z < m) {  // a tail in chunk j + 1
                mark(j + 1);
                o1 = owner_of(j + 1);
                if (o1 >= 0 && o1 != o0) append(o1, rec);
              }
              if (s + Z > m) {  // a wrap into chunk 0
                mark(0);
                const int64_t o2 = owner_of(0);
                if (o2 >= 0 && o2 != o0 && o2 != o1) append(o2, rec);
              }
            }
          }
        }
      }
    }
    for (int64_t t = 0; t < tasks; ++t) ws.owned_count[pt * tasks + t] = count[t];
  }
  clock.lap("starts + map + lists");

  // Step 2.
  std::vector<uint64_t>& chunk_of_slot = ws.chunk_of_slot;
  chunk_of_slot.clear();
  uint32_t U = 0;
  for (uint64_t j = 0; j < num_chunks; ++j) {
    if (map[j]) {
      map[j] = U++;
      chunk_of_slot.push_back(j);
    }
  }
  clock.lap("slots");

  // Step 3.
  float* grad_c = ws.grad.resize(static_cast<size_t>(U) * Z);  // compact gradient [U, Z]
  constexpr size_t kAhead = 8, kAheadGrad = 32;
#pragma omp parallel for schedule(static, 1) num_threads(thread_count())
  for (int64_t t = 0; t < tasks; ++t) {
    const uint64_t c_lo = chunk_cut[t], c_hi = chunk_cut[t + 1];
    const int64_t lo =
        std::lower_bound(chunk_of_slot.begin(), chunk_of_slot.end(), c_lo) - chunk_of_slot.begin();
    const int64_t hi =
        std::lower_bound(chunk_of_slot.begin(), chunk_of_slot.end(), c_hi) - chunk_of_slot.begin();
    if (lo >= hi) continue;
    std::fill(grad_c + lo * Z, grad_c + hi * Z, 0.0f);  // the owner zeroes its rows (first touch)
    for (int64_t pt = 0; pt < tasks; ++pt) {
      const Record* list = lists[pt * tasks + t].data();
      const size_t n = static_cast<size_t>(ws.owned_count[pt * tasks + t]);
      for (size_t k = 0; k < n; ++k) {
        if (k + kAhead < n) {  // a hint: the destination row of the record kAhead places on
          uint64_t j, at;
          div_z.divmod(static_cast<uint64_t>(list[k + kAhead].start), j, at);
          const float* ahead = grad_c + static_cast<int64_t>(map[j]) * Z + at;
          __builtin_prefetch(ahead, 1);
          __builtin_prefetch(ahead + Z - 1, 1);
        }
        if (k + kAheadGrad < n) {
          // And the gradient row of the record kAheadGrad places on: an owner reads about 1/tasks
          // of grad_out's rows, in increasing order but with random gaps, which the hardware
          // prefetcher does not follow (measured: a third to a half of this phase on shape (a)).
          const float* src = G + list[k + kAheadGrad].grad;
          __builtin_prefetch(src);
          __builtin_prefetch(src + Z - 1);
        }
        const Record& rec = list[k];
        const uint64_t s = static_cast<uint64_t>(rec.start);
        uint64_t j, at;
        div_z.divmod(s, j, at);
        const float* g = G + rec.grad;
        const float scale = record_scale<Plain>(rec), w = record_weight<Plain>(rec);
        // The usual case: no wrap, and the block's chunks (j, and j + 1 when unaligned) are both
        // this owner's. Touched chunks j and j + 1 have consecutive slots, so the block is Z
        // contiguous floats of the compact gradient: one fixed-length add, no pieces.
        if (s + Z <= m && j >= c_lo && (at == 0 ? j : j + 1) < c_hi) {
          add_block(grad_c + static_cast<int64_t>(map[j]) * Z + at, g, Z, p.w != nullptr, scale, w);
          continue;
        }
        for_each_piece(s, Z, m, div_z, [&](int kind, uint64_t pos, uint64_t from, uint64_t len) {
          const uint64_t chunk = kind == 0 ? j : kind == 1 ? j + 1 : 0;
          if (chunk < c_lo || chunk >= c_hi) return;
          float* dst = grad_c + static_cast<int64_t>(map[chunk]) * Z + pos;
          const float* src = g + from;
          // Rounded as the reference: (g * bag_scale) * weight, each product in float32.
          if (p.w) {
            for (uint64_t e = 0; e < len; ++e) dst[e] += (src[e] * scale) * w;
          } else if (scale != 1.0f) {
            for (uint64_t e = 0; e < len; ++e) dst[e] += src[e] * scale;
          } else {
            for (uint64_t e = 0; e < len; ++e) dst[e] += src[e];
          }
        });
      }
    }
    for (int64_t u = lo; u < hi; ++u) {
      const uint64_t first = chunk_of_slot[u] * Z;
      consume(chunk_of_slot[u], static_cast<int64_t>(first), static_cast<int64_t>(std::min(Z, m - first)),
              grad_c + u * Z);
    }
  }
  clock.lap("accumulate + update");
}

// Which index preparation the backward uses. ROBE_CPU_BACKWARD=map or =records forces one (tests
// run both; a measurement can compare them); unset or "auto": the chunk map unless it would be
// much larger than the batch's records (huge, sparsely touched arrays), the rule of the GPU's
// use_touched_map with CPU constants (a 4-byte map entry per chunk, zeroed and scanned serially).
constexpr uint64_t kTouchedMapMin = uint64_t(1) << 22;
constexpr uint64_t kTouchedMapRatio = 8;

bool use_touched_map(uint64_t num_chunks, int64_t records) {
  const bool fits = num_chunks < (uint64_t(1) << 32);  // slots are uint32
  const char* env = std::getenv("ROBE_CPU_BACKWARD");
  const std::string mode = env ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "map" || mode == "records",
              "robe cpu kernel: ROBE_CPU_BACKWARD must be auto, map or records, got '", mode, "'");
  if (mode == "records" || !fits) return false;
  if (mode == "map") return true;
  return num_chunks <= std::max(kTouchedMapMin, kTouchedMapRatio * static_cast<uint64_t>(records));
}

// The backward (grad_out already checked): calls consume(chunk, first_element, length, gradient)
// exactly once per touched chunk, with `gradient` holding that chunk's `length` summed values,
// possibly from several threads at once (for disjoint chunks).
// With a row-wise shard `range` (bounds on chunk boundaries: every chunk is wholly in or out), only
// the touched chunks inside [range.lo, range.hi) are accumulated and consumed: they are one
// contiguous run of slots (slots follow chunk order), and the accumulation is restricted to it, so
// pieces of blocks that fall on other ranks' elements are skipped by the same ownership test as the
// slots of other threads. The whole array is range [0, m).
template <typename Consume>
void for_each_touched_chunk(const Problem& p, const at::Tensor& grad_out_in, ElementRange range, Consume&& consume) {
  if (p.nnz == 0) return;
  PhaseClock clock;
  const at::Tensor grad_out = grad_out_in.contiguous();
  const float* G = grad_out.data_ptr<float>();
  const FastDivMod div_z(static_cast<uint64_t>(p.Z));
  const uint64_t num_chunks = (static_cast<uint64_t>(p.m) + p.Z - 1) / p.Z;
  WorkspaceLease lease;
  Workspace& ws = *lease;
  if (use_touched_map(num_chunks, p.nnz * p.num_blocks)) {
    bool plain = p.w == nullptr;  // every bag SUM and unweighted: 16-byte list records
    for (int64_t f = 0; f < p.F; ++f) plain = plain && !p.mean_p[f];
    if (plain) {
      touched_map_backward<true>(p, G, range, div_z, ws, clock, consume);
    } else {
      touched_map_backward<false>(p, G, range, div_z, ws, clock, consume);
    }
  } else {
    records_backward(p, G, range, div_z, ws, clock, consume);
  }
}

at::Tensor pooled_backward_dense(const at::Tensor& grad_out, int64_t num_elements, const at::Tensor& indices,
                                 const at::Tensor& offsets, const at::Tensor& hash_keys, const at::Tensor& mean,
                                 const std::optional<at::Tensor>& per_sample_weights, int64_t batch_size, int64_t dim,
                                 int64_t block_size, int64_t element_lo, int64_t element_hi) {
  const Problem p = make_problem(num_elements, indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim,
                                 block_size);
  check_range(element_lo, element_hi, p.m, p.Z, element_hi - element_lo, "the gradient");
  check_grad_out(p, grad_out);
  const int64_t lo = element_lo;
  at::Tensor grad = at::zeros({element_hi - element_lo}, grad_out.options());
  float* out = grad.data_ptr<float>();
  // A dense buffer is the API's output here; it is still filled race-free (disjoint chunks).
  for_each_touched_chunk(p, grad_out, ElementRange{element_lo, element_hi},
                         [&](uint64_t, int64_t first, int64_t len, const float* g) {
                           std::copy(g, g + len, out + (first - lo));
                         });
  return grad;
}

// ---------------------------------------------------------------------------------------------
// Element storage of the fused step: load as float32, compute in float32, store rounded.
// ---------------------------------------------------------------------------------------------

// Random bits of element e for one step's rounding seed: a chain of the hash's finaliser, a pure
// function of (seed, global element index), so the result is independent of threads and shards.
inline uint32_t rounding_bits(uint64_t seed, uint64_t e) {
  uint32_t h = fmix32(static_cast<uint32_t>(seed) ^ 0x9E3779B9u);
  h = fmix32(h ^ static_cast<uint32_t>(seed >> 32));
  h = fmix32(h ^ static_cast<uint32_t>(e));
  return fmix32(h ^ static_cast<uint32_t>(e >> 32));
}

// Stochastic rounding of v to T (bf16 / fp16): the neighbour toward zero t or the next one away
// from zero, the latter with probability (|v| - |t|) / (|up| - |t|), so E[result] = v. u is
// uniform in [0, 1) from 24 random bits. Both formats are sign-magnitude, so +-1 on the bits
// steps the magnitude. Exact values, infinities and NaN are returned as round-to-nearest gives.
template <typename T>
inline T round_stochastic(float v, uint32_t bits) {
  const T nearest(v);
  const float n = static_cast<float>(nearest);
  if (n == v || !std::isfinite(v)) return nearest;
  T t = nearest;
  if (std::fabs(n) > std::fabs(v)) t.x = static_cast<uint16_t>(t.x - 1);  // |n| > |v| >= 0: n != 0
  T up = t;
  up.x = static_cast<uint16_t>(up.x + 1);
  const float ft = std::fabs(static_cast<float>(t)), fu = std::fabs(static_cast<float>(up));
  const float prob = (std::fabs(v) - ft) / (fu - ft);
  const float u = static_cast<float>(bits >> 8) * 0x1p-24f;
  return u < prob ? up : t;
}

// The array seen by the update rules: local element i (global e = i + lo). float32 is read and
// written as before; bf16 / fp16 are upcast on load and rounded on store, to nearest even (c10's
// conversion, the same as torch's .to()) or stochastically when seed >= 0.
template <typename T>
struct ArrayIO {
  T* M;
  int64_t lo;
  int64_t seed;  // < 0: round to nearest even
  inline float load(int64_t i) const { return static_cast<float>(M[i]); }
  inline void store(int64_t i, float v) const {
    if constexpr (std::is_same_v<T, float>) {
      M[i] = v;
    } else {
      M[i] = seed < 0 ? T(v) : round_stochastic<T>(v, rounding_bits(static_cast<uint64_t>(seed), uint64_t(i + lo)));
    }
  }
};

// Rounds n float32 values to bfloat16 to nearest even: c10's round_to_nearest_even, bit for bit,
// with its NaN test as a select rather than a branch, so that the loop vectorises.
inline void round_row_nearest(at::BFloat16* out, const float* v, int64_t n) {
  for (int64_t e = 0; e < n; ++e) {
    uint32_t u;
    std::memcpy(&u, v + e, sizeof(u));
    const uint16_t even = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    out[e].x = v[e] != v[e] ? uint16_t(0x7FC0) : even;
  }
}
inline void round_row_nearest(at::Half* out, const float* v, int64_t n) {
  for (int64_t e = 0; e < n; ++e) out[e] = at::Half(v[e]);
}

// Replaces local elements [x, x + len) by step(e, value) (e the position in the run), computed in
// float32. A float32 array is stepped in place; a 16-bit one through a float32 row, 64 elements
// at a time: upcast, step, round back, three simple loops the compiler vectorises, instead of one
// loop with a conversion and a rounding per element (measured: 1.1 ms more than float32 per
// row-wise step at shape (c), whose every chunk is touched). step is called once per element, in
// order, so it may update optimizer state.
template <typename T, typename Step>
inline void step_elements(const ArrayIO<T>& io, int64_t x, int64_t len, Step&& step) {
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t e = 0; e < len; ++e) io.M[x + e] = step(e, io.M[x + e]);
  } else {
    constexpr int64_t kRow = 64;
    float row[kRow];
    for (int64_t base = 0; base < len; base += kRow) {
      const int64_t n = std::min(kRow, len - base);
      for (int64_t e = 0; e < n; ++e) row[e] = static_cast<float>(io.M[x + base + e]);
      for (int64_t e = 0; e < n; ++e) row[e] = step(base + e, row[e]);
      if (io.seed < 0) {
        round_row_nearest(io.M + x + base, row, n);
      } else {
        for (int64_t e = 0; e < n; ++e) io.store(x + base + e, row[e]);
      }
    }
  }
}

// One optimizer step on the touched chunks of the shard [lo, hi) (the whole array when lo = 0,
// hi = m): the array and the state hold only its elements / chunks, so global element e is local
// e - lo and global chunk q is local q - lo / Z. S: the float32 state (unused for sgd).
template <typename T>
void fused_step(const Problem& p, const at::Tensor& grad_out, ElementRange range, const ArrayIO<T>& io, float* S,
                const std::string& optimizer, float lrf, float epsf) {
  const int64_t lo = range.lo, chunk_lo = range.lo / p.Z;
  if (optimizer == "sgd") {
    for_each_touched_chunk(p, grad_out, range, [&](uint64_t, int64_t first, int64_t len, const float* g) {
      const int64_t x = first - lo;
      step_elements(io, x, len, [&](int64_t e, float v) { return v - lrf * g[e]; });
    });
  } else if (optimizer == "adagrad") {
    for_each_touched_chunk(p, grad_out, range, [&](uint64_t, int64_t first, int64_t len, const float* g) {
      const int64_t x = first - lo;
      float* s = S + x;
      step_elements(io, x, len, [&](int64_t e, float v) {
        s[e] += g[e] * g[e];
        return v - (lrf * g[e]) / (std::sqrt(s[e]) + epsf);
      });
    });
  } else {  // rowwise_adagrad (the caller checked the name)
    for_each_touched_chunk(p, grad_out, range, [&](uint64_t chunk, int64_t first, int64_t len, const float* g) {
      const int64_t q = static_cast<int64_t>(chunk) - chunk_lo;
      float sum_sq = 0.0f;
      for (int64_t e = 0; e < len; ++e) sum_sq += g[e] * g[e];
      // Mean over the chunk's real elements: the last chunk may be shorter than Z.
      S[q] += sum_sq / static_cast<float>(len);
      const float denom = std::sqrt(S[q]) + epsf;
      const int64_t x = first - lo;
      step_elements(io, x, len, [&](int64_t e, float v) { return v - (lrf * g[e]) / denom; });
    });
  }
}

void pooled_backward_fused(const at::Tensor& grad_out, const at::Tensor& array, const at::Tensor& state,
                           const at::Tensor& indices, const at::Tensor& offsets, const at::Tensor& hash_keys,
                           const at::Tensor& mean, const std::optional<at::Tensor>& per_sample_weights,
                           int64_t batch_size, int64_t dim, int64_t block_size, const std::string& optimizer,
                           double lr, double eps, int64_t num_elements, int64_t element_lo, int64_t element_hi,
                           int64_t rounding_seed) {
  check_train_array(array);
  TORCH_CHECK(array.dim() == 1, "robe cpu kernel: array must be 1-D, got shape ", array.sizes());
  // Updated in place through the raw pointer: a non-contiguous tensor cannot be.
  TORCH_CHECK(array.is_contiguous(), "robe cpu kernel: array must be contiguous (it is updated in place)");
  TORCH_CHECK(optimizer == "sgd" || optimizer == "adagrad" || optimizer == "rowwise_adagrad",
              "robe cpu kernel: unknown fused optimizer '", optimizer, "': sgd, adagrad or rowwise_adagrad");
  const Problem p = make_problem(num_elements, indices, offsets, hash_keys, mean, per_sample_weights, batch_size, dim,
                                 block_size);
  check_range(element_lo, element_hi, p.m, p.Z, array.numel(), "array");
  check_grad_out(p, grad_out);
  const ElementRange range{element_lo, element_hi};
  const int64_t local = element_hi - element_lo;
  const int64_t num_chunks = (local + p.Z - 1) / p.Z;
  float* S = nullptr;
  if (optimizer == "adagrad") {
    check_float_array(state, "state");
    TORCH_CHECK(state.dim() == 1 && state.numel() == local && state.is_contiguous(),
                "robe cpu kernel: adagrad state must be a contiguous [array elements] = [", local,
                "] tensor, got shape ", state.sizes());
    S = state.data_ptr<float>();
  } else if (optimizer == "rowwise_adagrad") {
    check_float_array(state, "state");
    TORCH_CHECK(state.dim() == 1 && state.numel() == num_chunks && state.is_contiguous(),
                "robe cpu kernel: rowwise_adagrad state must be a contiguous [ceil(array elements / block_size)] = [",
                num_chunks, "] tensor, got shape ", state.sizes());
    S = state.data_ptr<float>();
  }
  // The reference computes in float32 with the Python scalars cast to float: same here.
  const float lrf = static_cast<float>(lr), epsf = static_cast<float>(eps);
  switch (array.scalar_type()) {
    case at::kBFloat16:
      fused_step(p, grad_out, range, ArrayIO<at::BFloat16>{array.data_ptr<at::BFloat16>(), element_lo, rounding_seed},
                 S, optimizer, lrf, epsf);
      break;
    case at::kHalf:
      fused_step(p, grad_out, range, ArrayIO<at::Half>{array.data_ptr<at::Half>(), element_lo, rounding_seed}, S,
                 optimizer, lrf, epsf);
      break;
    default:
      fused_step(p, grad_out, range, ArrayIO<float>{array.data_ptr<float>(), element_lo, -1}, S, optimizer, lrf,
                 epsf);
  }
}

// Block starts [n, num_blocks] for ids of one table: exposed to test the C++ hash against the
// golden vectors and the PyTorch implementation.
at::Tensor block_offsets(const at::Tensor& ids, int64_t k0, int64_t k1, int64_t num_blocks, int64_t num_elements) {
  TORCH_CHECK(ids.device().is_cpu(), "robe cpu kernel: ids must be on the CPU");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "robe cpu kernel: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(num_elements >= 1 && num_elements <= (int64_t(1) << 48),
              "robe cpu kernel: num_elements must be in [1, 2**48], got ", num_elements);
  TORCH_CHECK(num_blocks >= 0 && num_blocks <= (int64_t(1) << 31), "robe cpu kernel: bad num_blocks ", num_blocks);
  TORCH_CHECK(k0 >= 0 && k0 <= 0xFFFFFFFFll && k1 >= 0 && k1 <= 0xFFFFFFFFll,
              "robe cpu kernel: hash keys must be uint32 values");
  const at::Tensor x = ids.contiguous().view({-1});
  const int64_t keys[2] = {k0, k1};
  const HashPrefix hp = hash_prefix(keys, 1, num_blocks);
  const BlockHasher hasher(static_cast<uint64_t>(num_elements), use_avx2());
  // Hashed block by block (the kernels' StartTile path, AVX2 where available), stored [n, num_blocks].
  at::Tensor out = at::empty({num_blocks, x.numel()}, ids.options());
  const int64_t* in = x.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t c = 0; c < num_blocks; ++c) hasher.hash(in, x.numel(), hp.h0[c], hp.h1[c], o + c * x.numel());
  return out.t().contiguous();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ROBE pooled lookup CPU kernels (robe-torchrec)";
  m.def("pooled_forward", &pooled_forward, "pooled [B, F*dim] float32", py::arg("array"), py::arg("indices"),
        py::arg("offsets"), py::arg("hash_keys"), py::arg("mean"), py::arg("per_sample_weights"),
        py::arg("batch_size"), py::arg("dim"), py::arg("block_size"), py::arg("num_elements"),
        py::arg("element_lo"), py::arg("element_hi"));
  m.def("pooled_forward_stored", &pooled_forward_stored, "pooled [B, F*dim] float32 from a stored array",
        py::arg("data"), py::arg("scale_bias"), py::arg("indices"), py::arg("offsets"), py::arg("hash_keys"),
        py::arg("mean"), py::arg("per_sample_weights"), py::arg("batch_size"), py::arg("dim"),
        py::arg("block_size"));
  m.def("pooled_backward_dense", &pooled_backward_dense, "dense gradient [m] of sum(pooled * grad_out)",
        py::arg("grad_out"), py::arg("num_elements"), py::arg("indices"), py::arg("offsets"), py::arg("hash_keys"),
        py::arg("mean"), py::arg("per_sample_weights"), py::arg("batch_size"), py::arg("dim"),
        py::arg("block_size"), py::arg("element_lo"), py::arg("element_hi"));
  m.def("pooled_backward_fused", &pooled_backward_fused, "one fused optimizer step, in place", py::arg("grad_out"),
        py::arg("array"), py::arg("state"), py::arg("indices"), py::arg("offsets"), py::arg("hash_keys"),
        py::arg("mean"), py::arg("per_sample_weights"), py::arg("batch_size"), py::arg("dim"),
        py::arg("block_size"), py::arg("optimizer"), py::arg("lr"), py::arg("eps"), py::arg("num_elements"),
        py::arg("element_lo"), py::arg("element_hi"), py::arg("rounding_seed"));
  m.def("block_offsets", &block_offsets, "block starts [n, num_blocks] (hash v1)", py::arg("ids"), py::arg("k0"),
        py::arg("k1"), py::arg("num_blocks"), py::arg("num_elements"));
}
