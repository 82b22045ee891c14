// CPU kernels for the decode step of `generate`, as XLA FFI custom calls (kernels/cpu.py).
//
// A decode step multiplies a few rows (batch x 1 token) by every weight matrix of the LLM and
// attends over the whole KV cache, so its cost is the time to stream the weights and the cache
// from memory. XLA:CPU reads both at well under the machine's read rate at these shapes
// (BENCHMARKS.md); these kernels stream them once each, at close to it.
//
// PackedMatmul:    y [M, N] = x [M, K] . W, W pre-packed into 32-column panels (Pack, once per
//   generate call; several kernels side by side for fused projections): fp32 [ceil(N / 32), K, 32]; bf16 [ceil(N / 32), ceil(K / 2), 64], rows
//   k = 2i and 2i + 1 of a column side by side (the operand pairs of AVX-512 BF16's dot).
//   Each panel is one contiguous stream, read once per call while up to 8 rows x 32 columns of
//   fp32 accumulators stay in registers (16 AVX-512 registers; GCC vector types keep the
//   source portable to AVX2 / NEON, where it compiles to narrower registers; with AVX-512 the
//   8-row tiles are inline assembly, for broadcasts GCC does not fold). Rows beyond 8 are done
//   in further passes over the panel, which then comes from L2.
// DecodeAttention: softmax attention of a few query rows per (batch, K/V head) over the cache,
//   with the masking and softmax of layers.dot_product_attention, reading only the slots up
//   to the last one any query of the batch row may see.
//
// Both run on fp32 or bf16 data (one type per call). bf16 is computed as XLA:CPU computes a
// bf16 dot: bf16 products (exact in fp32), fp32 sums, results rounded to nearest-even bf16;
// the attention rounds its probabilities to bf16 before the value pass, as
// layers.dot_product_attention does. With AVX512_BF16 (`vdpbf16ps`: one instruction per 32
// products, so a bf16 byte costs what an fp32 byte does) half the bytes take half the time; the
// instruction flushes denormal (< 1e-38) inputs and sums to zero.
//
// Work is split into ranges shared by the calling thread and XLA's intra-op thread pool
// (`Ctx<ThreadPool>`): participants claim ranges from an atomic counter, so a call finishes
// even if no pool thread ever runs its task.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define MLLM_JAX_DPBF16 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;   // columns per packed panel (2 x 16 floats)
constexpr int64_t kRows = 8;     // rows per register tile

typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t bf16;   // bfloat16 bits (XLA FFI's native type for BF16)

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 32 bf16 at p (pairs: elements 2i, 2i + 1) -> fp32 of the even and of the odd elements. A
// bf16 is the upper half of its fp32 (exact), and lane i holds element 2i in its low half.
inline void load_pairs(const bf16* p, v16& even, v16& odd) {
  u32x16 u;
  std::memcpy(&u, p, sizeof(u));
  even = reinterpret_cast<v16>(u << 16);
  odd = reinterpret_cast<v16>(u & 0xffff0000u);
}

inline float to_f32(float f) { return f; }
inline float to_f32(bf16 b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp32 -> T, round to nearest even (XLA's convert), NaN kept a (quiet) NaN
template <typename T> T from_f32(float f);
template <> inline float from_f32<float>(float f) { return f; }
template <> inline bf16 from_f32<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);
  return static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

// f rounded to T and back: the value a T-typed intermediate holds
template <typename T> inline float round_to(float f) { return to_f32(from_f32<T>(f)); }

inline float hsum(v16 v) {
  float out[16];
  std::memcpy(out, &v, sizeof(out));
  float s[8];
  for (int i = 0; i < 8; ++i) s[i] = out[i] + out[i + 8];
  for (int i = 0; i < 4; ++i) s[i] += s[i + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// Stores R rows x 32 columns of fp32 accumulators (a0: columns 0-15, a1: 16-31) as T.
template <int R, typename T>
inline void store_tile(const v16* a0, const v16* a1, T* y, int64_t N, int64_t col0) {
  const int64_t cols = std::min(kPanel, N - col0);
  for (int m = 0; m < R; ++m) {
    float out[kPanel];
    std::memcpy(out, &a0[m], 64);
    std::memcpy(out + 16, &a1[m], 64);
    for (int64_t c = 0; c < cols; ++c) y[m * N + col0 + c] = from_f32<T>(out[c]);
  }
}

#ifdef __AVX512F__
// acc += w x (row input at x, in all 16 lanes): an fp32 multiply-add, or a bf16 pair dot
// (vdpbf16ps: w's lanes are pairs too), with the broadcast folded into the instruction's memory
// operand ({1to16}). GCC issues a separate vbroadcastss / vpbroadcastd per row and step instead
// (it does not fold _mm512_set1 of a load into either); without them the 8-row loop streams
// bf16 panels 4-9% faster, fp32 ones 2-7%, at the same arithmetic rate from L2: a shorter loop
// keeps more of the weight stream in flight (BENCHMARKS.md, session 11).
inline void mac_bcast(__m512& acc, __m512 w, const float* x) {
  __asm__("vfmadd231ps %[p]%{1to16%}, %[w], %[a]" : [a] "+v"(acc) : [w] "v"(w), [p] "m"(*x));
}
#ifdef MLLM_JAX_DPBF16
inline void mac_bcast(__m512& acc, __m512 w, const bf16* pair) {
  __asm__("vdpbf16ps %[p]%{1to16%}, %[w], %[a]"
          : [a] "+v"(acc)
          : [w] "v"(w), [p] "m"(*reinterpret_cast<const uint32_t*>(pair)));
}
#endif

// The 8-row tile (a batch-8 decode step; larger batches and the prefill in passes of 8 rows) on
// folded broadcasts, for both dtypes: y [8, 32-column panel at col0] = x . one panel of `steps`
// 128-byte steps (fp32: K steps of one input; bf16: K / 2 steps of an input pair), x's rows
// `stride` elements apart. Its 16 accumulators are named variables: an array of them stays in
// memory around the asm statements.
template <typename T>
void panel_tile_8(const T* x, const T* w, T* y, int64_t steps, int64_t stride, int64_t N,
                  int64_t col0) {
  constexpr int64_t per = 4 / sizeof(T), lanes = 64 / sizeof(T);   // inputs per step; T per 64 B
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  __m512 d0 = c0, d1 = c0, d2 = c0, d3 = c0, d4 = c0, d5 = c0, d6 = c0, d7 = c0;
  for (int64_t i = 0; i < steps; ++i) {
    const __m512 w0 = _mm512_loadu_ps(w + 2 * i * lanes);
    const __m512 w1 = _mm512_loadu_ps(w + (2 * i + 1) * lanes);
    const T* p = x + per * i;   // row m's input(s) of step i at p + m * stride
    mac_bcast(c0, w0, p);              mac_bcast(d0, w1, p);
    mac_bcast(c1, w0, p + stride);     mac_bcast(d1, w1, p + stride);
    mac_bcast(c2, w0, p + 2 * stride); mac_bcast(d2, w1, p + 2 * stride);
    mac_bcast(c3, w0, p + 3 * stride); mac_bcast(d3, w1, p + 3 * stride);
    mac_bcast(c4, w0, p + 4 * stride); mac_bcast(d4, w1, p + 4 * stride);
    mac_bcast(c5, w0, p + 5 * stride); mac_bcast(d5, w1, p + 5 * stride);
    mac_bcast(c6, w0, p + 6 * stride); mac_bcast(d6, w1, p + 6 * stride);
    mac_bcast(c7, w0, p + 7 * stride); mac_bcast(d7, w1, p + 7 * stride);
  }
  const __m512 a0[8] = {c0, c1, c2, c3, c4, c5, c6, c7}, a1[8] = {d0, d1, d2, d3, d4, d5, d6, d7};
  v16 b0[8], b1[8];
  std::memcpy(b0, a0, sizeof(b0));
  std::memcpy(b1, a1, sizeof(b1));
  store_tile<8>(b0, b1, y, N, col0);
}
#endif

// y [R, 32-column panel at col0] = x [R, K] . one fp32 panel [K, 32]; R <= 8 rows of
// accumulators stay in registers (R is a template argument so a batch-1 step does 1/8 of the
// arithmetic of a batch-8 one).
template <int R>
void panel_tile_f32(const float* x, const float* w, float* y, int64_t K, int64_t N,
                    int64_t col0) {
#ifdef __AVX512F__
  if constexpr (R == 8) {
    panel_tile_8(x, w, y, K, K, N, col0);
    return;
  }
#endif
  v16 a0[R], a1[R];
  for (int m = 0; m < R; ++m) a0[m] = a1[m] = v16{};
  for (int64_t k = 0; k < K; ++k) {
    const v16 w0 = load16(w + k * kPanel), w1 = load16(w + k * kPanel + 16);
    for (int m = 0; m < R; ++m) {
      const float s = x[m * K + k];
      a0[m] += w0 * s;
      a1[m] += w1 * s;
    }
  }
  store_tile<R>(a0, a1, y, N, col0);
}

// The same for bf16: x [R, Kp] (Kp = 2 * pairs, zero-padded), one panel [pairs, 64] whose
// 32-bit lanes are (row 2i, row 2i + 1) pairs of one column.
template <int R>
void panel_tile_bf16(const bf16* x, const bf16* w, bf16* y, int64_t pairs, int64_t N,
                     int64_t col0) {
  const int64_t Kp = 2 * pairs;
#ifdef MLLM_JAX_DPBF16
  if constexpr (R == 8) {
    panel_tile_8(x, w, y, pairs, Kp, N, col0);
    return;
  }
  __m512 a0[R], a1[R];
  for (int m = 0; m < R; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + i * 64 + 32);
    for (int m = 0; m < R; ++m) {
      uint32_t pair;
      std::memcpy(&pair, x + m * Kp + 2 * i, 4);
      const __m512bh xs = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      a0[m] = _mm512_dpbf16_ps(a0[m], w0, xs);
      a1[m] = _mm512_dpbf16_ps(a1[m], w1, xs);
    }
  }
  v16 b0[R], b1[R];
  std::memcpy(b0, a0, sizeof(b0));
  std::memcpy(b1, a1, sizeof(b1));
  store_tile<R>(b0, b1, y, N, col0);
#else
  v16 a0[R], a1[R];
  for (int m = 0; m < R; ++m) a0[m] = a1[m] = v16{};
  for (int64_t i = 0; i < pairs; ++i) {
    v16 w0e, w0o, w1e, w1o;
    load_pairs(w + i * 64, w0e, w0o);
    load_pairs(w + i * 64 + 32, w1e, w1o);
    for (int m = 0; m < R; ++m) {
      const float xe = to_f32(x[m * Kp + 2 * i]), xo = to_f32(x[m * Kp + 2 * i + 1]);
      a0[m] += w0e * xe + w0o * xo;
      a1[m] += w1e * xe + w1o * xo;
    }
  }
  store_tile<R>(a0, a1, y, N, col0);
#endif
}

template <typename T>
using TileFn = void (*)(const T*, const T*, T*, int64_t, int64_t, int64_t);
constexpr TileFn<float> kTilesF32[kRows + 1] = {
    nullptr,           panel_tile_f32<1>, panel_tile_f32<2>, panel_tile_f32<3>,
    panel_tile_f32<4>, panel_tile_f32<5>, panel_tile_f32<6>, panel_tile_f32<7>,
    panel_tile_f32<8>};
constexpr TileFn<bf16> kTilesBF16[kRows + 1] = {
    nullptr,            panel_tile_bf16<1>, panel_tile_bf16<2>, panel_tile_bf16<3>,
    panel_tile_bf16<4>, panel_tile_bf16<5>, panel_tile_bf16<6>, panel_tile_bf16<7>,
    panel_tile_bf16<8>};

// The element type of a call: all its buffers F32, or all BF16.
bool one_type(std::initializer_list<ffi::DataType> types, ffi::DataType* type) {
  *type = *types.begin();
  if (*type != ffi::DataType::F32 && *type != ffi::DataType::BF16) return false;
  for (auto t : types)
    if (t != *type) return false;
  return true;
}

// A parallel loop over items [0, n) in ranges of `chunk` items.
struct Work {
  std::function<void(int64_t, int64_t)> body;   // (first item, end item)
  int64_t n, chunk, chunks;
  std::atomic<int64_t> next{0}, finished{0};

  // Claims and runs one range; false when none is left to claim.
  bool run_one() {
    const int64_t c = next.fetch_add(1);
    if (c >= chunks) return false;
    body(c * chunk, std::min(n, (c + 1) * chunk));
    finished.fetch_add(1, std::memory_order_release);
    return true;
  }
  bool done() const { return finished.load(std::memory_order_acquire) >= chunks; }
};

// Calls XLA runs concurrently (independent projections, e.g. k and v) share their threads:
// every thread inside a call or in a pool task takes ranges from any unfinished call, so no
// thread sits waiting for another call's ranges while work is left.
std::mutex active_mu;
std::vector<std::shared_ptr<Work>> active;

std::shared_ptr<Work> claimable() {
  std::lock_guard<std::mutex> lock(active_mu);
  for (auto& w : active)
    if (w->next.load(std::memory_order_relaxed) < w->chunks) return w;
  return nullptr;
}

void help_until(const Work* own) {
  while (own == nullptr || !own->done()) {
    auto w = claimable();
    if (w == nullptr) {
      if (own == nullptr) return;
      std::this_thread::yield();   // own ranges still running on another thread
    } else {
      w->run_one();
    }
  }
}

// Runs body over [0, n) on this thread and the pool, ~8 ranges per thread (small enough to
// balance, large enough to keep each thread's memory stream long).
void parallel_for(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t, int64_t)> body) {
  if (n <= 0) return;
  auto work = std::make_shared<Work>();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  work->body = std::move(body);
  work->n = n;
  work->chunk = std::max<int64_t>(1, n / (threads * 8));
  work->chunks = (n + work->chunk - 1) / work->chunk;
  {
    std::lock_guard<std::mutex> lock(active_mu);
    active.push_back(work);
  }
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([] { help_until(nullptr); });
  help_until(work.get());
  std::lock_guard<std::mutex> lock(active_mu);
  active.erase(std::find(active.begin(), active.end(), work));
}

// Rows of a packed panel: K (fp32), or K / 2 rounded up (bf16 row pairs).
template <typename T>
constexpr int64_t panel_rows(int64_t K) {
  return std::is_same_v<T, float> ? K : (K + 1) / 2;
}

void packed_matmul(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t M,
                   int64_t K, int64_t N, int64_t panels) {
  parallel_for(pool, panels, [=](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t r0 = 0; r0 < M; r0 += kRows)   // rows past 8: the panel is in L2 now
        kTilesF32[std::min(kRows, M - r0)](x + r0 * K, w + p * K * kPanel, y + r0 * N, K, N,
                                           p * kPanel);
  });
}

void packed_matmul(ffi::ThreadPool& pool, const bf16* x, const bf16* w, bf16* y, int64_t M,
                   int64_t K, int64_t N, int64_t panels) {
  // x with an even row length: for odd K a copy with a zero column (the padded weight row is
  // zero too, and 0 * garbage could be NaN); even K, as it is
  const int64_t pairs = panel_rows<bf16>(K), Kp = 2 * pairs;
  std::vector<bf16> xp;
  if (Kp != K) {
    xp.assign(M * Kp, bf16{0});
    for (int64_t m = 0; m < M; ++m) std::memcpy(&xp[m * Kp], x + m * K, K * sizeof(bf16));
  }
  const bf16* xs = Kp != K ? xp.data() : x;
  parallel_for(pool, panels, [=](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t r0 = 0; r0 < M; r0 += kRows)
        kTilesBF16[std::min(kRows, M - r0)](xs + r0 * Kp, w + p * Kp * kPanel, y + r0 * N, pairs,
                                            N, p * kPanel);
  });
}

template <typename T>
ffi::Error packed_matmul(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::AnyBuffer& y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  const int64_t M = xd[0], K = xd[1], N = yd[1], panels = wd[0];
  if (wd[1] != panel_rows<T>(K) || wd[2] * static_cast<int64_t>(sizeof(T)) != kPanel * 4 ||
      yd[0] != M || panels * kPanel < N || (panels - 1) * kPanel >= N)
    return ffi::Error::InvalidArgument("packed_matmul: shapes of x, w and y do not agree");
  if (M > 0 && N > 0)
    packed_matmul(pool, x.reinterpret_data<T>(), w.reinterpret_data<T>(),
                  y.reinterpret_data<T>(), M, K, N, panels);
  return ffi::Error::Success();
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                            ffi::Result<ffi::AnyBuffer> y) {
  ffi::DataType type;
  if (!one_type({x.element_type(), w.element_type(), y->element_type()}, &type))
    return ffi::Error::InvalidArgument("packed_matmul: x, w and y must all be f32 or all bf16");
  if (x.dimensions().size() != 2 || w.dimensions().size() != 3 || y->dimensions().size() != 2)
    return ffi::Error::InvalidArgument(
        "packed_matmul: expected x [M, K], w [P, K, 32] (f32) / [P, K / 2, 64] (bf16), y [M, N]");
  return type == ffi::DataType::F32 ? packed_matmul<float>(pool, x, w, *y)
                                    : packed_matmul<bf16>(pool, x, w, *y);
}

// packed = kernel [K, N] as 32-column panels, the last one zero-padded: fp32 [P, K, 32],
// bf16 [P, K / 2, 64] with rows 2i and 2i + 1 of a column side by side (K zero-padded to even).
// In blocks of 64 rows x 8 panels (1 KB reads per row, 8 output streams).
template <typename T>
void pack(ffi::ThreadPool& pool, const T* in, T* out, int64_t K, int64_t N, int64_t P) {
  constexpr int64_t kBlock = 64;
  constexpr int64_t kPair = std::is_same_v<T, float> ? 1 : 2;   // rows per panel row
  const int64_t rows = panel_rows<T>(K);
  const int64_t kb = (K + kBlock - 1) / kBlock, pb = (P + 7) / 8;
  parallel_for(pool, kb * pb, [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p0 = (i % pb) * 8, p1 = std::min(P, p0 + 8);
      const int64_t k0 = (i / pb) * kBlock, k1 = std::min(K, k0 + kBlock);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t cols = std::min(kPanel, N - p * kPanel);
        T* panel = out + p * rows * kPanel * kPair;
        if constexpr (kPair == 1) {
          for (int64_t k = k0; k < k1; ++k) {
            T* o = panel + k * kPanel;
            std::memcpy(o, in + k * N + p * kPanel, cols * sizeof(T));
            std::fill(o + cols, o + kPanel, T{0});
          }
        } else {   // kBlock is even: a block holds whole row pairs, written together
          for (int64_t k = k0; k < k1; k += 2) {
            T* o = panel + (k / 2) * kPanel * 2;
            const T* r0 = in + k * N + p * kPanel;
            const T* r1 = k + 1 < K ? r0 + N : nullptr;   // odd K: the last row's pair is zero
            if (r1 != nullptr && cols == kPanel) {
              for (int64_t c = 0; c < kPanel; ++c) o[2 * c] = r0[c], o[2 * c + 1] = r1[c];
            } else {
              for (int64_t c = 0; c < kPanel; ++c) {
                o[2 * c] = c < cols ? r0[c] : T{0};
                o[2 * c + 1] = (r1 != nullptr && c < cols) ? r1[c] : T{0};
              }
            }
          }
        }
      }
    }
  });
}

// packed = the kernels [K, N_i] side by side (their columns concatenated) as panels. Every N_i
// but the last is a multiple of 32, so each kernel fills whole panels of its own and is packed
// straight into them (fused projections: no concatenated copy first).
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::RemainingArgs kernels,
                    ffi::Result<ffi::AnyBuffer> packed) {
  const auto pd = packed->dimensions();
  const ffi::DataType type = packed->element_type();
  const bool f32 = type == ffi::DataType::F32;
  if (!f32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("pack: kernels and panels must all be f32 or all bf16");
  int64_t K = -1, N = 0;
  std::vector<ffi::AnyBuffer> ins;
  for (size_t i = 0; i < kernels.size(); ++i) {
    auto kernel = kernels.get<ffi::AnyBuffer>(i);
    if (kernel.has_error()) return kernel.error();
    const auto kd = kernel->dimensions();
    if (kernel->element_type() != type)
      return ffi::Error::InvalidArgument("pack: kernels and panels must all be f32 or all bf16");
    if (kd.size() != 2 || (K >= 0 && kd[0] != K) || (N % kPanel != 0))
      return ffi::Error::InvalidArgument(
          "pack: kernels must be [K, N_i] with one K, every N_i but the last a multiple of 32");
    K = kd[0];
    N += kd[1];
    ins.push_back(*kernel);
  }
  if (ins.empty() || pd.size() != 3 || pd[0] != (N + kPanel - 1) / kPanel ||
      pd[1] != (f32 ? panel_rows<float>(K) : panel_rows<bf16>(K)) ||
      pd[2] != (f32 ? kPanel : 2 * kPanel))
    return ffi::Error::InvalidArgument(
        "pack: expected kernels [K, N_i] -> [ceil(sum N_i / 32), K, 32] (f32) / "
        "[ceil(sum N_i / 32), ceil(K / 2), 64] (bf16)");
  int64_t panel0 = 0;
  for (auto& in : ins) {
    const int64_t n = in.dimensions()[1], panels = (n + kPanel - 1) / kPanel;
    if (f32)
      pack(pool, in.typed_data<float>(), packed->typed_data<float>() + panel0 * pd[1] * pd[2],
           K, n, panels);
    else
      pack(pool, in.reinterpret_data<bf16>(),
           packed->reinterpret_data<bf16>() + panel0 * pd[1] * pd[2], K, n, panels);
    panel0 += panels;
  }
  return ffi::Error::Success();
}

// Finite "minus infinity" of layers.NEG_INF: masked logits.
constexpr float kNegInf = -0.7f * 3.4028234663852886e38f;

// 16 vectors of partial sums -> one vector whose lane j is the sum of vector j's lanes: a
// transposing tree (each level folds every owner's lanes in half and packs two vectors into
// one), 15 adds and 30 shuffles for 16 sums instead of 16 serial horizontal sums.
inline v16 fold(v16 a, v16 b, int level) {
  switch (level) {
    case 0:   // owners of 16 lanes -> of 8
      return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                     30, 31);
    case 1:   // 8 -> 4
      return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                     31);
    case 2:   // 4 -> 2
      return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
             __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                     31);
    default:  // 2 -> 1
      return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
             __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  }
}

inline v16 transpose_sum(v16* v) {   // v[16], overwritten
  for (int level = 0, n = 16; n > 1; ++level, n /= 2)
    for (int j = 0; j < n / 2; ++j) v[j] = fold(v[2 * j], v[2 * j + 1], level);
  return v[0];
}

// exp(x) for 16 lanes: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes expf,
// ~1 ulp); 0 below -87.3, where exp's results are denormal or 0 (the masked slots' NEG_INF -
// max give exactly 0, as in XLA's softmax).
inline v16 exp16(v16 x) {
  typedef int32_t i16 __attribute__((vector_size(64)));
  const v16 lo = x < -87.3f ? v16{} + 1.0f : v16{};
  x = x > 88.0f ? v16{} + 88.0f : x;   // 2^k stays a normal float
  x = x < -87.3f ? v16{} - 87.3f : x;
  v16 k = x * 1.44269504088896341f;
  k = __builtin_convertvector(__builtin_convertvector(k + (k < 0 ? v16{} - 0.5f : v16{} + 0.5f), i16),
                              v16);   // round to nearest
  v16 r = x - k * 0.693359375f + k * 2.12194440e-4f;
  v16 p = v16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i16 bits = (__builtin_convertvector(k, i16) + 127) << 23;
  v16 out = p * reinterpret_cast<v16>(bits);
  return lo != 0 ? v16{} : out;
}

// x where the 16 mask bytes at m are set, kNegInf elsewhere
inline v16 masked16(v16 x, const bool* m) {
  typedef uint8_t u8x16 __attribute__((vector_size(16)));
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  u8x16 bytes;
  std::memcpy(&bytes, m, 16);
  return __builtin_convertvector(bytes, i32x16) != 0 ? x : v16{} + kNegInf;
}

// 16 floats rounded to T and back (round_to<T> per lane)
template <typename T> inline v16 round16(v16 x);
template <> inline v16 round16<float>(v16 x) { return x; }
template <> inline v16 round16<bf16>(v16 x) {
  const u32x16 u = reinterpret_cast<u32x16>(x);
  const u32x16 nan = (u & 0x7fffffffu) > 0x7f800000u;
  const u32x16 r = (nan ? u | 0x400000u : u + 0x7fffu + ((u >> 16) & 1)) & 0xffff0000u;
  return reinterpret_cast<v16>(r);
}

// Pulls a region into L2 a few cache lines per `next()`, interleaved with other work, so the
// next pass over it finds it there (the attention's compute and its memory stream then
// overlap instead of alternating).
struct Prefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t lines = 0;   // per next()
  void next() {
    for (int64_t l = 0; l < lines && p < end; ++l, p += 64) __builtin_prefetch(p, 0, 2);
  }
};

// One query row against the keys and values of one (batch, K/V head), vectorised over the head
// dim when D is a multiple of 16 (fp32) / 32 (bf16): `partial` gives a slot's score as 16 lanes
// to sum (transpose_sum sums 16 slots at once), `accumulate` adds p[s] * v[s] over the slots
// with the sums in registers, 64 dims at a time. bf16 value sums are kept de-interleaved (a
// 32-dim block's 16 even then 16 odd dims) until `finish`.
struct RowF32 {
  const float* q;
  int64_t D;
  bool vec;   // D % 16 == 0
  RowF32(const float* q_, int64_t D_) : q(q_), D(D_), vec(D_ % 16 == 0) {}
  v16 partial(const float* k) const {
    v16 acc{};
    for (int64_t d = 0; d < D; d += 16) acc += load16(q + d) * load16(k + d);
    return acc;
  }
  float score(const float* k) const {
    float sum = 0.0f;
    for (int64_t d = 0; d < D; ++d) sum += q[d] * k[d];
    return sum;
  }
  template <int NB>
  static void acc_blocks(float* a, const float* p, const float* v, int64_t n, int64_t D,
                         Prefetch& pf) {
    v16 s[NB];
    for (int j = 0; j < NB; ++j) s[j] = load16(a + 16 * j);
    for (int64_t i = 0; i < n; ++i) {
      pf.next();
      for (int j = 0; j < NB; ++j) s[j] += p[i] * load16(v + i * D + 16 * j);
    }
    std::memcpy(a, s, sizeof(s));
  }
  void accumulate(float* a, const float* p, const float* v, int64_t n, Prefetch& pf) const {
    if (!vec) {
      for (int64_t i = 0; i < n; ++i) {
        pf.next();
        for (int64_t d = 0; d < D; ++d) a[d] += p[i] * v[i * D + d];
      }
      return;
    }
    for (int64_t d = 0; d < D; d += 64) {
      switch (std::min<int64_t>(4, (D - d) / 16)) {
        case 4: acc_blocks<4>(a + d, p, v + d, n, D, pf); break;
        case 3: acc_blocks<3>(a + d, p, v + d, n, D, pf); break;
        case 2: acc_blocks<2>(a + d, p, v + d, n, D, pf); break;
        default: acc_blocks<1>(a + d, p, v + d, n, D, pf);
      }
    }
  }
  void finish(const float* acc, float* out) const { std::memcpy(out, acc, D * sizeof(float)); }
};

struct RowBF16 {
  const bf16* q;
  int64_t D;
  bool vec;          // D % 32 == 0
  float qf[512];     // q in fp32, de-interleaved per 32-dim block (vec) or as is; D <= 512
  RowBF16(const bf16* q_, int64_t D_) : q(q_), D(D_), vec(D_ % 32 == 0) {
    for (int64_t d = 0; d < D; ++d)
      qf[vec ? (d / 32) * 32 + (d % 2) * 16 + (d % 32) / 2 : d] = to_f32(q[d]);
  }
  v16 partial(const bf16* k) const {
#ifdef MLLM_JAX_DPBF16
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(k + d),
                             (__m512bh)_mm512_loadu_si512(q + d));
    v16 a;
    std::memcpy(&a, &acc, 64);
    return a;
#else
    v16 acc{};
    for (int64_t d = 0; d < D; d += 32) {
      v16 ke, ko;
      load_pairs(k + d, ke, ko);
      acc += ke * load16(qf + d) + ko * load16(qf + d + 16);
    }
    return acc;
#endif
  }
  float score(const bf16* k) const {
    float sum = 0.0f;
    for (int64_t d = 0; d < D; ++d) sum += qf[d] * to_f32(k[d]);
    return sum;
  }
  template <int NB>   // NB 32-dim blocks
  static void acc_blocks(float* a, const float* p, const bf16* v, int64_t n, int64_t D,
                         Prefetch& pf) {
    v16 se[NB], so[NB];
    for (int j = 0; j < NB; ++j) se[j] = load16(a + 32 * j), so[j] = load16(a + 32 * j + 16);
    for (int64_t i = 0; i < n; ++i, pf.next())
      for (int j = 0; j < NB; ++j) {
        v16 ve, vo;
        load_pairs(v + i * D + 32 * j, ve, vo);
        se[j] += p[i] * ve;
        so[j] += p[i] * vo;
      }
    for (int j = 0; j < NB; ++j) {
      std::memcpy(a + 32 * j, &se[j], 64);
      std::memcpy(a + 32 * j + 16, &so[j], 64);
    }
  }
  void accumulate(float* a, const float* p, const bf16* v, int64_t n, Prefetch& pf) const {
    if (!vec) {
      for (int64_t i = 0; i < n; ++i, pf.next())
        for (int64_t d = 0; d < D; ++d) a[d] += p[i] * to_f32(v[i * D + d]);
      return;
    }
    for (int64_t d = 0; d < D; d += 64) {
      if (D - d >= 64) acc_blocks<2>(a + d, p, v + d, n, D, pf);
      else acc_blocks<1>(a + d, p, v + d, n, D, pf);
    }
  }
  void finish(const float* acc, float* out) const {
    for (int64_t d = 0; d < D; ++d)
      out[d] = acc[vec ? (d / 32) * 32 + (d % 2) * 16 + (d % 32) / 2 : d];
  }
};

template <typename T>
using Row = std::conditional_t<std::is_same_v<T, float>, RowF32, RowBF16>;

// out [B, Hkv, R, D] = softmax(mask ? q . k * scale : NEG_INF) . v per (batch, K/V head), for
// q [B, Hkv, R, D] (R = grouped heads x T new tokens, rows ordered (group, token)),
// k, v [B, Hkv, S, D], mask [B, T, S].
template <typename T>
void decode_attention(ffi::ThreadPool& pool, const T* qp, const T* kp, const T* vp,
                      const bool* mp, T* op, int64_t B, int64_t H, int64_t R, int64_t D,
                      int64_t S, int64_t T_, float scale) {
  // Per batch row: slots past the last one any of its queries may see hold no probability
  // (exp(NEG_INF - max) == 0 in fp32) and are not read; a query that sees no slot at all gets
  // the uniform softmax over all S slots, as in layers.dot_product_attention.
  std::vector<int64_t> end(B, 0);
  std::vector<char> empty(B * T_, 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t s = 0; s < S; ++s)
        if (mp[(b * T_ + t) * S + s]) {
          end[b] = std::max(end[b], s + 1);
          empty[b * T_ + t] = 0;
        }
  // the uniform probability of an all-masked query, as the value pass sees it (rounded to T)
  const float uniform = round_to<T>(1.0f / static_cast<float>(S));
  parallel_for(pool, B * H, [=, &end, &empty](int64_t i0, int64_t i1) {
    std::vector<float> probs, acc(R * D), out(D), flat;
    std::vector<Row<T>> rows;
    rows.reserve(R);
    v16 parts[16];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H;
      const T* ki = kp + i * S * D;
      const T* vi = vp + i * S * D;
      const int64_t n = end[b], n16 = (n + 15) / 16 * 16;
      rows.clear();
      for (int64_t r = 0; r < R; ++r) rows.emplace_back(qp + (i * R + r) * D, D);
      probs.assign(R * n16, 0.0f);
      // The score pass pulls this item's values into L2 and the value pass the next item's
      // keys, so the two streams stay in flight while the other pass computes (without it the
      // kernel read ~22 GB/s where its reads alone run at ~30 and its arithmetic at ~90).
      const int64_t slot_lines = (D * static_cast<int64_t>(sizeof(T)) + 63) / 64;
      Prefetch values{reinterpret_cast<const char*>(vi),
                      reinterpret_cast<const char*>(vi + n * D), slot_lines};
      for (int64_t r = 0; r < R; ++r) {   // scores, 16 slots at a time
        float* pr = probs.data() + r * n16;
        const bool* mr = mp + (b * T_ + r % T_) * S;
        for (int64_t s0 = 0; s0 < n; s0 += 16) {
          const int64_t cnt = std::min<int64_t>(16, n - s0);
          for (int64_t j = 0; j < cnt; ++j) values.next();
          if (rows[r].vec) {
            for (int64_t j = 0; j < 16; ++j)
              parts[j] = j < cnt ? rows[r].partial(ki + (s0 + j) * D) : v16{};
            v16 sc = transpose_sum(parts) * scale;
            if (cnt == 16) sc = masked16(sc, mr + s0);
            std::memcpy(pr + s0, &sc, 64);
          } else {
            for (int64_t j = 0; j < cnt; ++j) pr[s0 + j] = rows[r].score(ki + (s0 + j) * D) * scale;
          }
          if (cnt < 16 || !rows[r].vec)   // the last block of slots, or unvectorised rows
            for (int64_t j = 0; j < 16; ++j)
              if (j >= cnt || !mr[s0 + j]) pr[s0 + j] = kNegInf;
        }
        v16 mx = v16{} + kNegInf, sum{};
        for (int64_t s = 0; s < n16; s += 16) {
          const v16 x = load16(pr + s);
          mx = x > mx ? x : mx;
        }
        float m = kNegInf;
        for (int l = 0; l < 16; ++l) m = std::max(m, mx[l]);
        for (int64_t s = 0; s < n16; s += 16) {
          const v16 e = exp16(load16(pr + s) - m);
          sum += e;
          std::memcpy(pr + s, &e, 64);
        }
        const float total = hsum(sum);
        for (int64_t s = 0; s < n16; s += 16) {   // (slots n .. n16 hold 0 and stay 0)
          const v16 p = round16<T>(load16(pr + s) / total);
          std::memcpy(pr + s, &p, 64);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      Prefetch keys;   // the next item's, if this range has one
      if (i + 1 < i1) {
        const T* next = kp + (i + 1) * S * D;
        keys = {reinterpret_cast<const char*>(next),
                reinterpret_cast<const char*>(next + end[(i + 1) / H] * D), slot_lines};
      }
      for (int64_t r = 0; r < R; ++r) {   // one pass over the values per query row
        float* a = acc.data() + r * D;
        if (empty[b * T_ + r % T_]) {   // all masked: the mean of every value slot
          flat.assign(S, uniform);
          rows[r].accumulate(a, flat.data(), vi, S, keys);
        } else {
          rows[r].accumulate(a, probs.data() + r * n16, vi, n, keys);
        }
        rows[r].finish(a, out.data());
        for (int64_t d = 0; d < D; ++d) op[(i * R + r) * D + d] = from_f32<T>(out[d]);
      }
    }
  });
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                               ffi::AnyBuffer v, ffi::Buffer<ffi::PRED> mask, float scale,
                               ffi::Result<ffi::AnyBuffer> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  auto same = [](auto a, auto b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); };
  ffi::DataType type;
  if (!one_type({q.element_type(), k.element_type(), v.element_type(), out->element_type()},
                &type))
    return ffi::Error::InvalidArgument(
        "decode_attention: q, k, v and the output must all be f32 or all bf16");
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || !same(v.dimensions(), kd) ||
      !same(out->dimensions(), qd))
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [B, Hkv, R, D], k and v [B, Hkv, S, D], mask [B, T, S]");
  const int64_t B = qd[0], H = qd[1], R = qd[2], D = qd[3], S = kd[2], T = md[1];
  if (kd[0] != B || kd[1] != H || kd[3] != D || md[0] != B || md[2] != S || T == 0 || R % T)
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, k, v and mask disagree");
  if (D > 512) return ffi::Error::InvalidArgument("decode_attention: head dim over 512");
  if (type == ffi::DataType::F32)
    decode_attention(pool, q.typed_data<float>(), k.typed_data<float>(), v.typed_data<float>(),
                     mask.typed_data(), out->typed_data<float>(), B, H, R, D, S, T, scale);
  else
    decode_attention(pool, q.reinterpret_data<bf16>(), k.reinterpret_data<bf16>(), v.reinterpret_data<bf16>(),
                     mask.typed_data(), out->reinterpret_data<bf16>(), B, H, R, D, S, T, scale);
  return ffi::Error::Success();
}

// cache [B, H, L, D] with new [B, H, T, D] written at slots [index, index + T), in place (the
// output aliases the cache): what dynamic_update_slice does, for any element type. XLA:CPU
// runs a bf16 dynamic_update_slice through fp32, rewriting the whole cache every decode step.
ffi::Error CacheWriteImpl(ffi::AnyBuffer cache, ffi::AnyBuffer update,
                          ffi::Buffer<ffi::S32> index, ffi::Result<ffi::AnyBuffer> out) {
  const auto cd = cache.dimensions(), ud = update.dimensions();
  if (cd.size() != 4 || ud.size() != 4 || cache.element_type() != update.element_type() ||
      out->element_type() != cache.element_type() || ud[0] != cd[0] || ud[1] != cd[1] ||
      ud[3] != cd[3] || ud[2] > cd[2] || index.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "cache_write: expected cache [B, H, L, D], new [B, H, T <= L, D] of its dtype, index []");
  const int64_t L = cd[2], T = ud[2];
  const size_t row = ffi::ByteWidth(cache.element_type()) * cd[3];
  // dynamic_update_slice clamps the start so the update fits
  const int64_t at = std::clamp<int64_t>(*index.typed_data(), 0, L - T);
  char* dst = static_cast<char*>(out->untyped_data());
  const char* src = static_cast<const char*>(update.untyped_data());
  if (dst != cache.untyped_data())   // not aliased after all: start from the cache
    std::memcpy(dst, cache.untyped_data(), cache.size_bytes());
  for (int64_t bh = 0; bh < cd[0] * cd[1]; ++bh)
    std::memcpy(dst + (bh * L + at) * row, src + bh * T * row, T * row);
  return ffi::Error::Success();
}

// 16 logits at p as fp32 (bf16 -> fp32 is exact)
inline v16 load16_f32(const float* p) { return load16(p); }
inline v16 load16_f32(const bf16* p) {
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<v16>(__builtin_convertvector(h, u32x16) << 16);
}

// The first index of the row's largest value, or of its first NaN if it has one (argmax), in
// one pass: each of 16 lanes keeps its largest value with the first index it was seen at
// (strictly greater replaces: ties keep the earlier index) and its first NaN index.
template <typename T>
int64_t first_argmax(const T* row, int64_t V) {
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  constexpr int32_t kNone = INT32_MAX;
  float best;   // the largest value so far (set by each branch below)
  int64_t first = 0, nan_first = kNone, i = 0;
  if (V >= 16) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    v16 top = load16_f32(row);
    i32x16 at = lane, nan_at = top != top ? lane : i32x16{} + kNone;
    for (i = 16; i + 16 <= V; i += 16) {
      const v16 x = load16_f32(row + i);
      const i32x16 idx = lane + static_cast<int32_t>(i);
      const i32x16 gt = x > top;   // false for NaN x (and for every x once top is NaN)
      top = gt ? x : top;
      at = gt ? idx : at;
      nan_at = (x != x) & (nan_at == kNone) ? idx : nan_at;
    }
    best = top[0];
    for (int l = 1; l < 16; ++l) best = top[l] > best ? top[l] : best;   // (a NaN lane: nan_at says)
    first = kNone;
    for (int l = 0; l < 16; ++l) {
      if (top[l] == best) first = std::min<int64_t>(first, at[l]);
      nan_first = std::min<int64_t>(nan_first, nan_at[l]);
    }   // (first stays kNone only when best is a NaN, and then nan_first is set)
  } else {
    best = to_f32(row[0]);
    if (best != best) nan_first = 0;
    i = 1;
  }
  for (; i < V; ++i) {   // the tail past the last 16-lane block (or a short row)
    const float x = to_f32(row[i]);
    if (x != x) nan_first = std::min<int64_t>(nan_first, i);
    else if (x > best) best = x, first = i;
  }
  return nan_first != kNone ? nan_first : first;
}

// tokens [B] = argmax of each row of logits [B, V] (fp32, or bf16: the lm_head's own output,
// no fp32 copy first). XLA:CPU's reductions over the [8, 32000] logits of a batch-8 decode
// step took ~0.3 ms; this takes one pass per row.
ffi::Error GreedyTokenImpl(ffi::ThreadPool pool, ffi::AnyBuffer logits,
                           ffi::ResultBuffer<ffi::S32> tokens) {
  const auto ld = logits.dimensions();
  const ffi::DataType type = logits.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("greedy_token: logits must be f32 or bf16");
  if (ld.size() != 2 || tokens->dimensions().size() != 1 || tokens->dimensions()[0] != ld[0] ||
      ld[1] == 0 || ld[1] >= INT32_MAX)
    return ffi::Error::InvalidArgument(
        "greedy_token: expected logits [B, 0 < V < 2^31 - 1] -> tokens [B]");
  const int64_t V = ld[1];
  const bool f32 = type == ffi::DataType::F32;
  const float* lf = f32 ? logits.reinterpret_data<float>() : nullptr;
  const bf16* lb = f32 ? nullptr : logits.reinterpret_data<bf16>();
  int32_t* tp = tokens->typed_data();
  parallel_for(pool, ld[0], [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      tp[b] = static_cast<int32_t>(f32 ? first_argmax(lf + b * V, V) : first_argmax(lb + b * V, V));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Pack, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacheWrite, CacheWriteImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GreedyToken, GreedyTokenImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
