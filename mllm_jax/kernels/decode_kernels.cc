// CPU kernels for the decode step of `generate`, as XLA FFI custom calls (kernels/cpu.py).
//
// A decode step multiplies a few rows (batch x 1 token) by every weight matrix of the LLM and
// attends over the whole KV cache, so its cost is the time to stream the weights and the cache
// from memory. XLA:CPU reads both at well under the machine's read rate at these shapes
// (BENCHMARKS.md); these kernels stream them once each, at close to it.
//
// PackedMatmul:    y [M, N] = x [M, K] . W, W pre-packed as [ceil(N / 32), K, 32] (Pack, once
//   per generate call).
//   Each 32-column panel is one contiguous K x 128-byte stream, read once per call while up to
//   8 rows x 32 columns of accumulators stay in registers (16 AVX-512 registers; GCC vector
//   types keep the source portable to AVX2 / NEON, where it compiles to narrower registers).
//   Rows beyond 8 are done in further passes over the panel, which then comes from L2.
// DecodeAttention: softmax attention of a few query rows per (batch, K/V head) over the cache,
//   with the masking and softmax of layers.dot_product_attention, reading only the slots up
//   to the last one any query of the batch row may see.
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
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;   // columns per packed panel (2 x 16 floats)
constexpr int64_t kRows = 8;     // rows per register tile

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// y [R, 32-column panel at col0] = x [R, K] . one packed panel [K, 32]; R <= 8 rows of
// accumulators stay in registers (R is a template argument so a batch-1 step does 1/8 of the
// arithmetic of a batch-8 one).
template <int R>
void panel_tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t col0) {
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
  const int64_t cols = std::min(kPanel, N - col0);
  for (int m = 0; m < R; ++m) {
    float out[kPanel];
    std::memcpy(out, &a0[m], 64);
    std::memcpy(out + 16, &a1[m], 64);
    std::memcpy(y + m * N + col0, out, cols * sizeof(float));
  }
}

using TileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr TileFn kTiles[kRows + 1] = {nullptr,           panel_tile<1>, panel_tile<2>,
                                      panel_tile<3>,     panel_tile<4>, panel_tile<5>,
                                      panel_tile<6>,     panel_tile<7>, panel_tile<8>};

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

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2)
    return ffi::Error::InvalidArgument("packed_matmul: expected x [M, K], w [P, K, 32], y [M, N]");
  const int64_t M = xd[0], K = xd[1], N = yd[1], panels = wd[0];
  if (wd[1] != K || wd[2] != kPanel || yd[0] != M || panels * kPanel < N ||
      (panels - 1) * kPanel >= N)
    return ffi::Error::InvalidArgument("packed_matmul: shapes of x, w and y do not agree");
  if (M == 0 || N == 0) return ffi::Error::Success();

  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, panels, [=](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t r0 = 0; r0 < M; r0 += kRows)   // rows past 8: the panel is in L2 now
        kTiles[std::min(kRows, M - r0)](xp + r0 * K, wp + p * K * kPanel, yp + r0 * N, K, N,
                                        p * kPanel);
  });
  return ffi::Error::Success();
}

// packed [P, K, 32] = kernel [K, N] as 32-column panels, the last one zero-padded; in blocks of
// 64 rows x 8 panels (1 KB reads per row, 8 output streams), whole cache lines both ways.
ffi::Error PackImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel,
                    ffi::ResultBuffer<ffi::F32> packed) {
  const auto kd = kernel.dimensions(), pd = packed->dimensions();
  if (kd.size() != 2 || pd.size() != 3 || pd[1] != kd[0] || pd[2] != kPanel ||
      pd[0] != (kd[1] + kPanel - 1) / kPanel)
    return ffi::Error::InvalidArgument("pack: expected kernel [K, N] -> [ceil(N / 32), K, 32]");
  const int64_t K = kd[0], N = kd[1], P = pd[0];
  const float* in = kernel.typed_data();
  float* out = packed->typed_data();
  constexpr int64_t kBlock = 64;
  const int64_t kb = (K + kBlock - 1) / kBlock, pb = (P + 7) / 8;
  parallel_for(pool, kb * pb, [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p0 = (i % pb) * 8, p1 = std::min(P, p0 + 8);
      const int64_t k0 = (i / pb) * kBlock, k1 = std::min(K, k0 + kBlock);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t cols = std::min(kPanel, N - p * kPanel);
        for (int64_t k = k0; k < k1; ++k) {
          float* o = out + (p * K + k) * kPanel;
          std::memcpy(o, in + k * N + p * kPanel, cols * sizeof(float));
          std::fill(o + cols, o + kPanel, 0.0f);
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Finite "minus infinity" of layers.NEG_INF: masked logits.
constexpr float kNegInf = -0.7f * 3.4028234663852886e38f;

inline float dot(const float* a, const float* b, int64_t d) {
  if (d % 16 == 0) {
    v16 acc{};
    for (int64_t i = 0; i < d; i += 16) acc += load16(a + i) * load16(b + i);
    float sum = 0.0f;
    for (int i = 0; i < 16; ++i) sum += acc[i];
    return sum;
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// out [B, Hkv, R, D] = softmax(mask ? q . k * scale : NEG_INF) . v per (batch, K/V head), for
// q [B, Hkv, R, D] (R = grouped heads x T new tokens, rows ordered (group, token)),
// k, v [B, Hkv, S, D], mask [B, T, S].
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::PRED> mask, float scale,
                               ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  auto same = [](auto a, auto b) { return std::equal(a.begin(), a.end(), b.begin(), b.end()); };
  if (qd.size() != 4 || kd.size() != 4 || md.size() != 3 || !same(v.dimensions(), kd) ||
      !same(out->dimensions(), qd))
    return ffi::Error::InvalidArgument(
        "decode_attention: expected q [B, Hkv, R, D], k and v [B, Hkv, S, D], mask [B, T, S]");
  const int64_t B = qd[0], H = qd[1], R = qd[2], D = qd[3], S = kd[2], T = md[1];
  if (kd[0] != B || kd[1] != H || kd[3] != D || md[0] != B || md[2] != S || T == 0 || R % T)
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, k, v and mask disagree");
  const bool* mp = mask.typed_data();
  // Per batch row: slots past the last one any of its queries may see hold no probability
  // (exp(NEG_INF - max) == 0 in fp32) and are not read; a query that sees no slot at all gets
  // the uniform softmax over all S slots, as in layers.dot_product_attention.
  std::vector<int64_t> end(B, 0);
  std::vector<char> empty(B * T, 1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < S; ++s)
        if (mp[(b * T + t) * S + s]) {
          end[b] = std::max(end[b], s + 1);
          empty[b * T + t] = 0;
        }
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, B * H, [=, &end, &empty](int64_t i0, int64_t i1) {
    std::vector<float> probs, acc(R * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H;
      const float* qi = qp + i * R * D;
      const float* ki = kp + i * S * D;
      const float* vi = vp + i * S * D;
      const int64_t n = end[b];
      probs.assign(R * n, 0.0f);
      for (int64_t s = 0; s < n; ++s)   // one pass over the keys
        for (int64_t r = 0; r < R; ++r)
          probs[r * n + s] = mp[(b * T + r % T) * S + s] ? dot(qi + r * D, ki + s * D, D) * scale
                                                         : kNegInf;
      for (int64_t r = 0; r < R; ++r) {
        float* pr = probs.data() + r * n;
        float mx = kNegInf;
        for (int64_t s = 0; s < n; ++s) mx = std::max(mx, pr[s]);
        float sum = 0.0f;
        for (int64_t s = 0; s < n; ++s) sum += (pr[s] = std::exp(pr[s] - mx));
        for (int64_t s = 0; s < n; ++s) pr[s] /= sum;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t s = 0; s < n; ++s)   // one pass over the values
        for (int64_t r = 0; r < R; ++r) {
          const float p = probs[r * n + s];
          float* a = acc.data() + r * D;
          const float* vs = vi + s * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * vs[d];
        }
      for (int64_t r = 0; r < R; ++r)
        if (empty[b * T + r % T]) {   // all masked: the mean of every value slot
          float* a = acc.data() + r * D;
          std::fill(a, a + D, 0.0f);
          for (int64_t s = 0; s < S; ++s)
            for (int64_t d = 0; d < D; ++d) a[d] += vi[s * D + d] / static_cast<float>(S);
        }
      std::memcpy(op + i * R * D, acc.data(), R * D * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Pack, PackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
