// BatchNorm with per-worker statistics and GroupNorm on the CPU, forward and backward, in float32, bfloat16
// (stored as uint16) or float64: one kernel, since both normalize "units" of a (S, C, H, W) batch by their own
// statistics, a unit being a worker's N samples of one channel (per-worker BN: N samples x 1 channel) or one
// sample's group of C/G channels (GN: 1 sample x C/G channels).
//
// Plain C++ with OpenMP and no torch headers, so that it compiles in about a second (normlab/norms/kernel_library.py
// builds it on first use; normlab/norms/cpu_kernel.py registers it as torch ops, and falls back to torch's ops
// without it). Every pass reads memory in order:
//   NCHW:          a block is one (sample, channel) plane of H*W contiguous values;
//   channels_last: a block is a run of rows of C contiguous values within one sample.
// Each block's mean and sum of squared deviations are taken in two passes over the block (it is in cache by the
// second), and pooled per unit by Chan's formula: no E[x^2] - E[x]^2 cancellation. Blocks are fixed by the shape
// and pooled in one order, so the result does not depend on the thread count.

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

// The batch, its units, and where its blocks lie. Block t covers sample s = t / blocks_per_sample(); it starts at
// element start(t) and holds count(t) positions of lanes() interleaved channels, the first being first_channel(t).
struct Layout {
  int64_t samples, channels, plane;       // S, C, H*W
  int64_t unit_samples, unit_channels;    // a unit's extent: per-worker BN (N, 1), GN (1, C/G)
  bool channels_last;

  int64_t unit(int64_t s, int64_t c) const {
    return (s / unit_samples) * (channels / unit_channels) + c / unit_channels;
  }
  int64_t units() const { return samples / unit_samples * (channels / unit_channels); }
  double unit_count() const { return double(unit_samples) * unit_channels * plane; }
  int64_t lanes() const { return channels_last ? channels : 1; }
  int64_t block_rows() const { return channels_last ? std::clamp<int64_t>(8192 / channels, 1, plane) : plane; }
  int64_t blocks_per_sample() const { return channels_last ? (plane + block_rows() - 1) / block_rows() : channels; }
  int64_t blocks() const { return samples * blocks_per_sample(); }
  int64_t first_row(int64_t t) const { return channels_last ? t % blocks_per_sample() * block_rows() : 0; }
  int64_t count(int64_t t) const { return channels_last ? std::min(block_rows(), plane - first_row(t)) : plane; }
  int64_t first_channel(int64_t t) const { return channels_last ? 0 : t % channels; }
  int64_t start(int64_t t) const {
    const int64_t s = t / blocks_per_sample();
    return channels_last ? (s * plane + first_row(t)) * channels : t * plane;
  }
  int64_t coefficient(int64_t t) const {  // where block t's per-(sample, channel) coefficients start
    return t / blocks_per_sample() * channels + first_channel(t);
  }
};

// For each block in parallel: f(block, first element, positions).
template <typename F>
void for_each_block(const Layout& l, int threads, F f) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < l.blocks(); ++t) f(t, l.start(t), l.count(t));
}

// For each block's lanes in order, serially: f(block, lane, sample, channel).
template <typename F>
void for_each_lane(const Layout& l, F f) {
  for (int64_t t = 0; t < l.blocks(); ++t)
    for (int64_t j = 0; j < l.lanes(); ++j) f(t, j, t / l.blocks_per_sample(), l.first_channel(t) + j);
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

// y = x*scale + shift per (sample, channel): scale = invstd[unit]*weight[c], shift = bias[c] - mean[unit]*scale.
template <typename T, typename Acc>
void forward(const T* x, T* y, const Acc* weight, const Acc* bias, Acc* mean, Acc* var, Acc* invstd, const Layout& l,
             double eps, int threads) {
  const int64_t lanes = l.lanes(), C = l.channels;
  std::vector<Acc> block_mean(l.blocks() * lanes), block_m2(l.blocks() * lanes);
  for_each_block(l, threads, [&](int64_t t, int64_t at, int64_t n) {
    block_moments(x + at, n, lanes, block_mean.data() + t * lanes, block_m2.data() + t * lanes);
  });
  std::vector<double> m(l.units(), 0.0), q(l.units(), 0.0);
  for_each_lane(l, [&](int64_t t, int64_t j, int64_t s, int64_t c) {
    m[l.unit(s, c)] += double(block_mean[t * lanes + j]) * l.count(t);
  });
  for (double& v : m) v /= l.unit_count();
  for_each_lane(l, [&](int64_t t, int64_t j, int64_t s, int64_t c) {
    const double d = double(block_mean[t * lanes + j]) - m[l.unit(s, c)];
    q[l.unit(s, c)] += double(block_m2[t * lanes + j]) + l.count(t) * d * d;
  });
  for (int64_t u = 0; u < l.units(); ++u) {
    const double v = q[u] / l.unit_count();
    mean[u] = Acc(m[u]), var[u] = Acc(v), invstd[u] = Acc(1.0 / std::sqrt(v + eps));
  }
  std::vector<Acc> scale(l.samples * C), shift(l.samples * C);
  for (int64_t s = 0; s < l.samples; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t u = l.unit(s, c);
      const double a = double(invstd[u]) * weight[c];
      scale[s * C + c] = Acc(a), shift[s * C + c] = Acc(bias[c] - m[u] * a);
    }
  for_each_block(l, threads, [&](int64_t t, int64_t at, int64_t n) {
    block_affine(x + at, y + at, n, lanes, scale.data() + l.coefficient(t), shift.data() + l.coefficient(t));
  });
}

// torch's BN update of running_mean/var with `factor`, from per-worker BN's (workers, C) batch means and biased
// variances over `count` values each: the workers' means and unbiased variances averaged (see PerWorkerBatchNorm2d).
template <typename Acc>
void running_update(const Acc* mean, const Acc* var, Acc* running_mean, Acc* running_var, double factor,
                    int64_t groups, int64_t C, double count) {
  const double unbiased = count / (count - 1);
  for (int64_t c = 0; c < C; ++c) {
    double batch_mean = 0, batch_var = 0;
    for (int64_t w = 0; w < groups; ++w) batch_mean += mean[w * C + c], batch_var += var[w * C + c];
    batch_mean /= groups, batch_var *= unbiased / groups;
    running_mean[c] = Acc(running_mean[c] + factor * (batch_mean - running_mean[c]));
    running_var[c] = Acc(running_var[c] + factor * (batch_var - running_var[c]));
  }
}

// With x_hat = (x - mean)*invstd, A = sum over the unit of weight*g and B = sum of weight*g*x_hat:
// grad_x = invstd*(weight*g - A/M - x_hat*B/M) = a*g + b*x + c per (sample, channel), M the unit's count;
// grad_weight[c] = sum of g*x_hat, grad_bias[c] = sum of g, over every sample and position of channel c.
template <typename T, typename Acc>
void backward(const T* g, const T* x, T* gx, const Acc* weight, const Acc* mean, const Acc* invstd, Acc* grad_weight,
              Acc* grad_bias, const Layout& l, int threads) {
  const int64_t lanes = l.lanes(), C = l.channels;
  std::vector<Acc> mean_sc(l.samples * C);
  for (int64_t s = 0; s < l.samples; ++s)
    for (int64_t c = 0; c < C; ++c) mean_sc[s * C + c] = mean[l.unit(s, c)];
  std::vector<Acc> block_g(l.blocks() * lanes), block_gx(l.blocks() * lanes);
  for_each_block(l, threads, [&](int64_t t, int64_t at, int64_t n) {
    block_grad_sums(g + at, x + at, n, lanes, mean_sc.data() + l.coefficient(t), block_g.data() + t * lanes,
                    block_gx.data() + t * lanes);
  });
  std::vector<double> sum_g(l.samples * C, 0.0), sum_gx(l.samples * C, 0.0);  // per (sample, channel)
  for_each_lane(l, [&](int64_t t, int64_t j, int64_t s, int64_t c) {
    sum_g[s * C + c] += double(block_g[t * lanes + j]), sum_gx[s * C + c] += double(block_gx[t * lanes + j]);
  });
  std::vector<double> A(l.units(), 0.0), B(l.units(), 0.0), gw(C, 0.0), gb(C, 0.0);
  for (int64_t s = 0; s < l.samples; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t u = l.unit(s, c), k = s * C + c;
      const double g_xhat = double(invstd[u]) * sum_gx[k];
      A[u] += double(weight[c]) * sum_g[k], B[u] += double(weight[c]) * g_xhat;
      gw[c] += g_xhat, gb[c] += sum_g[k];
    }
  for (int64_t c = 0; c < C; ++c) grad_weight[c] = Acc(gw[c]), grad_bias[c] = Acc(gb[c]);
  const double M = l.unit_count();
  std::vector<Acc> ca(l.samples * C), cb(l.samples * C), cc(l.samples * C);
  for (int64_t s = 0; s < l.samples; ++s)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t u = l.unit(s, c), k = s * C + c;
      const double is = invstd[u], b = -is * is * B[u] / M;
      ca[k] = Acc(is * weight[c]), cb[k] = Acc(b), cc[k] = Acc(-is * A[u] / M - b * double(mean[u]));
    }
  for_each_block(l, threads, [&](int64_t t, int64_t at, int64_t n) {
    const int64_t k = l.coefficient(t);
    block_grad(g + at, x + at, gx + at, n, lanes, ca.data() + k, cb.data() + k, cc.data() + k);
  });
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float64 (statistics and parameters in float64 for float64, else float32).
// Statistics (mean, var, invstd) per unit, in unit order: (S / unit_samples, C / unit_channels).
extern "C" {

// The entry points' argument lists, as normlab/norms/cpu_kernel.py checks them before the first call (i int,
// q int64_t, d double, p pointer). Change it with any prototype below.
const char* normlab_kernel_abi() {
  return "normlab_norm_forward(i,p,p,p,p,p,p,p,q,q,q,q,q,i,d,i);"
         "normlab_norm_backward(i,p,p,p,p,p,p,p,p,q,q,q,q,q,i,i);"
         "normlab_running_update(i,p,p,p,p,d,q,q,d)";
}

int normlab_norm_forward(int dtype, const void* x, void* y, const void* weight, const void* bias, void* mean,
                         void* var, void* invstd, int64_t samples, int64_t channels, int64_t plane,
                         int64_t unit_samples, int64_t unit_channels, int channels_last, double eps, int threads) {
  const Layout l{samples, channels, plane, unit_samples, unit_channels, channels_last != 0};
  using F = float;
  using D = double;
  using B16 = uint16_t;
  switch (dtype) {
    case 0: forward((const F*)x, (F*)y, (const F*)weight, (const F*)bias, (F*)mean, (F*)var, (F*)invstd, l, eps, threads); return 0;
    case 1: forward((const B16*)x, (B16*)y, (const F*)weight, (const F*)bias, (F*)mean, (F*)var, (F*)invstd, l, eps, threads); return 0;
    case 2: forward((const D*)x, (D*)y, (const D*)weight, (const D*)bias, (D*)mean, (D*)var, (D*)invstd, l, eps, threads); return 0;
  }
  return 1;
}

int normlab_norm_backward(int dtype, const void* g, const void* x, void* gx, const void* weight, const void* mean,
                          const void* invstd, void* grad_weight, void* grad_bias, int64_t samples, int64_t channels,
                          int64_t plane, int64_t unit_samples, int64_t unit_channels, int channels_last, int threads) {
  const Layout l{samples, channels, plane, unit_samples, unit_channels, channels_last != 0};
  using F = float;
  using D = double;
  using B16 = uint16_t;
  switch (dtype) {
    case 0: backward((const F*)g, (const F*)x, (F*)gx, (const F*)weight, (const F*)mean, (const F*)invstd, (F*)grad_weight, (F*)grad_bias, l, threads); return 0;
    case 1: backward((const B16*)g, (const B16*)x, (B16*)gx, (const F*)weight, (const F*)mean, (const F*)invstd, (F*)grad_weight, (F*)grad_bias, l, threads); return 0;
    case 2: backward((const D*)g, (const D*)x, (D*)gx, (const D*)weight, (const D*)mean, (const D*)invstd, (D*)grad_weight, (D*)grad_bias, l, threads); return 0;
  }
  return 1;
}

// stat_dtype: 0 float32, 2 float64. mean and var are (workers, channels); the buffers (channels,).
int normlab_running_update(int stat_dtype, const void* mean, const void* var, void* running_mean, void* running_var,
                           double factor, int64_t workers, int64_t channels, double count) {
  switch (stat_dtype) {
    case 0: running_update((const float*)mean, (const float*)var, (float*)running_mean, (float*)running_var, factor, workers, channels, count); return 0;
    case 2: running_update((const double*)mean, (const double*)var, (double*)running_mean, (double*)running_var, factor, workers, channels, count); return 0;
  }
  return 1;
}

}  // extern "C"
