// Per-worker BatchNorm on the CPU: W workers' chunks of one (W*N, C, H, W) batch, each normalized by its own
// statistics, forward and backward, in float32, bfloat16 (stored as uint16) or float64.
//
// Plain C++ with OpenMP and no torch headers, so that it compiles in about a second (normlab/norms/cpu_kernel.py
// builds it on first use and falls back to torch's ops without a compiler). Every pass reads memory in order:
//   NCHW:          a block is one (sample, channel) plane of H*W contiguous values;
//   channels_last: a block is a run of rows of C contiguous values within one worker's N*H*W rows.
// Each block's mean and sum of squared deviations are taken in two passes over the block (it is in cache by the
// second), and pooled per worker and channel by Chan's formula: no E[x^2] - E[x]^2 cancellation.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  const uint32_t bits = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, as torch's bfloat16 does
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t rounded = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  p[i] = std::isnan(v) ? uint16_t(0x7FC0) : rounded;
}

// Where a layout's blocks lie: block b of worker w starts at element start(w, b), holds count(b) positions of
// `lanes` interleaved channels (NCHW: 1 lane, the plane's channel; channels_last: C lanes).
struct Layout {
  int64_t workers, per_worker, channels, plane;  // plane = H*W
  bool channels_last;

  int64_t lanes() const { return channels_last ? channels : 1; }
  int64_t rows() const { return per_worker * plane; }  // positions per worker and channel
  int64_t block_rows() const { return channels_last ? std::max<int64_t>(1, 8192 / channels) : plane; }
  int64_t blocks() const {  // per worker
    return channels_last ? (rows() + block_rows() - 1) / block_rows() : per_worker * channels;
  }
  int64_t count(int64_t b) const { return channels_last ? std::min(block_rows(), rows() - b * block_rows()) : plane; }
  int64_t start(int64_t w, int64_t b) const {
    return channels_last ? (w * rows() + b * block_rows()) * channels : (w * per_worker * channels + b) * plane;
  }
  int64_t first_channel(int64_t b) const { return channels_last ? 0 : b % channels; }
};

// For each (worker, block) in parallel: f(w, b, first element, positions, first channel).
template <typename F>
void for_each_block(const Layout& l, int threads, F f) {
  const int64_t blocks = l.blocks();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < l.workers * blocks; ++t) {
    const int64_t w = t / blocks, b = t % blocks;
    f(w, b, l.start(w, b), l.count(b), l.first_channel(b));
  }
}


// The passes over one block of n positions of `lanes` interleaved channels. One lane (an NCHW plane): a
// vectorized reduction over the plane. Several (channels_last rows): the channels taken V at a time, each
// chunk's sums held in registers while the rows stream by (Full: a whole chunk, its width known at compile time).
constexpr int64_t V = 16;

template <typename F>
void by_chunks(int64_t lanes, F f) {
  for (int64_t c0 = 0; c0 < lanes; c0 += V)
    if (c0 + V <= lanes)
      f(c0, std::integral_constant<bool, true>{});
    else
      f(c0, std::integral_constant<bool, false>{});
}

template <typename T, typename Acc>
void block_moments(const T* x, int64_t n, int64_t lanes, Acc* mean, Acc* m2) {
  if (lanes == 1) {
    Acc s = 0, q = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += load(x, i);
    const Acc m = s / Acc(n);
#pragma omp simd reduction(+ : q)
    for (int64_t i = 0; i < n; ++i) q += (load(x, i) - m) * (load(x, i) - m);
    *mean = m, *m2 = q;
    return;
  }
  by_chunks(lanes, [&](int64_t c0, auto full) {
    const int64_t width = decltype(full)::value ? V : lanes - c0;
    Acc s[V] = {}, q[V] = {};
    for (int64_t r = 0; r < n; ++r)
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) s[j] += load(x, r * lanes + c0 + j);
    for (int64_t j = 0; j < width; ++j) s[j] /= Acc(n);
    for (int64_t r = 0; r < n; ++r)
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const Acc d = load(x, r * lanes + c0 + j) - s[j];
        q[j] += d * d;
      }
    std::copy(s, s + width, mean + c0);
    std::copy(q, q + width, m2 + c0);
  });
}

template <typename T, typename Acc>
void block_affine(const T* x, T* y, int64_t n, int64_t lanes, const Acc* a, const Acc* b) {  // y = a*x + b
  if (lanes == 1) {
    const Acc a0 = *a, b0 = *b;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(y, i, load(x, i) * a0 + b0);
    return;
  }
  by_chunks(lanes, [&](int64_t c0, auto full) {
    const int64_t width = decltype(full)::value ? V : lanes - c0;
    Acc a1[V] = {}, b1[V] = {};
    std::copy(a + c0, a + c0 + width, a1);
    std::copy(b + c0, b + c0 + width, b1);
    for (int64_t r = 0; r < n; ++r)
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) store(y, r * lanes + c0 + j, load(x, r * lanes + c0 + j) * a1[j] + b1[j]);
  });
}

template <typename T, typename Acc>
void block_grad_sums(const T* g, const T* x, int64_t n, int64_t lanes, const Acc* mean, Acc* sum_g, Acc* sum_gx) {
  if (lanes == 1) {  // sum_g = sum(g), sum_gx = sum(g * (x - mean))
    const Acc m = *mean;
    Acc s = 0, u = 0;
#pragma omp simd reduction(+ : s, u)
    for (int64_t i = 0; i < n; ++i) {
      const Acc gi = load(g, i);
      s += gi, u += gi * (load(x, i) - m);
    }
    *sum_g = s, *sum_gx = u;
    return;
  }
  by_chunks(lanes, [&](int64_t c0, auto full) {
    const int64_t width = decltype(full)::value ? V : lanes - c0;
    Acc m[V] = {}, s[V] = {}, u[V] = {};
    std::copy(mean + c0, mean + c0 + width, m);
    for (int64_t r = 0; r < n; ++r)
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const int64_t i = r * lanes + c0 + j;
        const Acc gi = load(g, i);
        s[j] += gi, u[j] += gi * (load(x, i) - m[j]);
      }
    std::copy(s, s + width, sum_g + c0);
    std::copy(u, u + width, sum_gx + c0);
  });
}

template <typename T, typename Acc>
void block_grad(const T* g, const T* x, T* gx, int64_t n, int64_t lanes, const Acc* a, const Acc* b, const Acc* c) {
  if (lanes == 1) {  // gx = a*g + b*x + c
    const Acc a0 = *a, b0 = *b, c1 = *c;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) store(gx, i, a0 * load(g, i) + b0 * load(x, i) + c1);
    return;
  }
  by_chunks(lanes, [&](int64_t c0, auto full) {
    const int64_t width = decltype(full)::value ? V : lanes - c0;
    Acc a1[V] = {}, b1[V] = {}, c2[V] = {};
    std::copy(a + c0, a + c0 + width, a1);
    std::copy(b + c0, b + c0 + width, b1);
    std::copy(c + c0, c + c0 + width, c2);
    for (int64_t r = 0; r < n; ++r)
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const int64_t i = r * lanes + c0 + j;
        store(gx, i, a1[j] * load(g, i) + b1[j] * load(x, i) + c2[j]);
      }
  });
}

template <typename T, typename Acc>
void forward(const T* x, T* y, const Acc* weight, const Acc* bias, Acc* mean, Acc* var, Acc* invstd, const Layout& l,
             double eps, int threads) {
  const int64_t lanes = l.lanes(), blocks = l.blocks(), C = l.channels;
  std::vector<Acc> block_mean(l.workers * blocks * lanes), block_m2(l.workers * blocks * lanes);
  for_each_block(l, threads, [&](int64_t w, int64_t b, int64_t at, int64_t n, int64_t) {
    const int64_t k = (w * blocks + b) * lanes;
    block_moments(x + at, n, lanes, block_mean.data() + k, block_m2.data() + k);
  });
  std::vector<Acc> scale(l.workers * C), shift(l.workers * C);
  for (int64_t w = 0; w < l.workers; ++w) {
    std::vector<double> m(C, 0.0), q(C, 0.0);
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t c = 0; c < lanes; ++c) m[l.first_channel(b) + c] += double(block_mean[(w * blocks + b) * lanes + c]) * l.count(b);
    for (int64_t c = 0; c < C; ++c) m[c] /= double(l.rows());
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t c = 0; c < lanes; ++c) {
        const int64_t k = (w * blocks + b) * lanes + c, ch = l.first_channel(b) + c;
        const double d = double(block_mean[k]) - m[ch];
        q[ch] += double(block_m2[k]) + l.count(b) * d * d;
      }
    for (int64_t c = 0; c < C; ++c) {
      const double v = q[c] / double(l.rows()), is = 1.0 / std::sqrt(v + eps);
      const int64_t k = w * C + c;
      mean[k] = Acc(m[c]), var[k] = Acc(v), invstd[k] = Acc(is);
      scale[k] = Acc(is * weight[c]), shift[k] = Acc(bias[c] - m[c] * is * weight[c]);
    }
  }
  for_each_block(l, threads, [&](int64_t w, int64_t, int64_t at, int64_t n, int64_t first) {
    block_affine(x + at, y + at, n, lanes, scale.data() + w * C + first, shift.data() + w * C + first);
  });
}

// grad_x = a*g + b*x + c per worker and channel, with a = invstd*weight, b = -a*invstd*sum_g_xhat/count and
// c = -a*sum_g/count - b*mean: F.batch_norm's backward for each worker's chunk.
template <typename T, typename Acc>
void backward(const T* g, const T* x, T* gx, const Acc* weight, const Acc* mean, const Acc* invstd, Acc* sum_g_xhat,
              Acc* sum_g, const Layout& l, int threads) {
  const int64_t lanes = l.lanes(), blocks = l.blocks(), C = l.channels;
  std::vector<Acc> block_g(l.workers * blocks * lanes), block_gx(l.workers * blocks * lanes);
  for_each_block(l, threads, [&](int64_t w, int64_t b, int64_t at, int64_t n, int64_t first) {
    const int64_t k = (w * blocks + b) * lanes;
    block_grad_sums(g + at, x + at, n, lanes, mean + w * C + first, block_g.data() + k, block_gx.data() + k);
  });
  std::vector<Acc> ca(l.workers * C), cb(l.workers * C), cc(l.workers * C);
  const double count = double(l.rows());
  for (int64_t w = 0; w < l.workers; ++w) {
    std::vector<double> s(C, 0.0), u(C, 0.0);
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t c = 0; c < lanes; ++c) {
        s[l.first_channel(b) + c] += double(block_g[(w * blocks + b) * lanes + c]);
        u[l.first_channel(b) + c] += double(block_gx[(w * blocks + b) * lanes + c]);
      }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t k = w * C + c;
      const double is = invstd[k], sgx = is * u[c];
      const double a = is * weight[c], b = -a * is * sgx / count;
      sum_g_xhat[k] = Acc(sgx), sum_g[k] = Acc(s[c]);
      ca[k] = Acc(a), cb[k] = Acc(b), cc[k] = Acc(-a * s[c] / count - b * mean[k]);
    }
  }
  for_each_block(l, threads, [&](int64_t w, int64_t, int64_t at, int64_t n, int64_t first) {
    const int64_t k = w * C + first;
    block_grad(g + at, x + at, gx + at, n, lanes, ca.data() + k, cb.data() + k, cc.data() + k);
  });
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float64 (its statistics and parameters in float64; float32 otherwise).
extern "C" {

int normlab_pwbn_forward(int dtype, const void* x, void* y, const void* weight, const void* bias, void* mean, void* var,
                         void* invstd, int64_t workers, int64_t per_worker, int64_t channels, int64_t plane,
                         int channels_last, double eps, int threads) {
  const Layout l{workers, per_worker, channels, plane, channels_last != 0};
  using F = float;
  using D = double;
  switch (dtype) {
    case 0: forward((const F*)x, (F*)y, (const F*)weight, (const F*)bias, (F*)mean, (F*)var, (F*)invstd, l, eps, threads); return 0;
    case 1: forward((const uint16_t*)x, (uint16_t*)y, (const F*)weight, (const F*)bias, (F*)mean, (F*)var, (F*)invstd, l, eps, threads); return 0;
    case 2: forward((const D*)x, (D*)y, (const D*)weight, (const D*)bias, (D*)mean, (D*)var, (D*)invstd, l, eps, threads); return 0;
  }
  return 1;
}

int normlab_pwbn_backward(int dtype, const void* g, const void* x, void* gx, const void* weight, const void* mean,
                          const void* invstd, void* sum_g_xhat, void* sum_g, int64_t workers, int64_t per_worker,
                          int64_t channels, int64_t plane, int channels_last, int threads) {
  const Layout l{workers, per_worker, channels, plane, channels_last != 0};
  using F = float;
  using D = double;
  switch (dtype) {
    case 0: backward((const F*)g, (const F*)x, (F*)gx, (const F*)weight, (const F*)mean, (const F*)invstd, (F*)sum_g_xhat, (F*)sum_g, l, threads); return 0;
    case 1: backward((const uint16_t*)g, (const uint16_t*)x, (uint16_t*)gx, (const F*)weight, (const F*)mean, (const F*)invstd, (F*)sum_g_xhat, (F*)sum_g, l, threads); return 0;
    case 2: backward((const D*)g, (const D*)x, (D*)gx, (const D*)weight, (const D*)mean, (const D*)invstd, (D*)sum_g_xhat, (D*)sum_g, l, threads); return 0;
  }
  return 1;
}

}  // extern "C"
