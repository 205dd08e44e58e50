// The MAXA adapter's two hot spots on CPU, forward and backward, as small C++ kernels, and the
// streamed probe's float16 -> float32 conversion (3., at the end):
//
// 1. Multi-head cross-attention with the optional additive Gaussian logit term of eq. (3) and its
//    gradient with respect to σ. The adapter's heads are tiny (D/h = 4 dimensions; 2 for the d16
//    variant) while the logit maps are large (784 queries × 196 tokens × 8 heads per image).
//    PyTorch's fused CPU attention is built for wide heads (it blocks keys into GEMMs), and its
//    unfused path writes every logit map to memory several times; here each (batch, head) keeps its
//    keys and values transposed (d, N) in cache and every query row is one vectorised pass over the
//    keys (the compiler's SIMD expf).
//    Layout: q (BH, Q, d), kt and vt (BH, d, N), d2 (Q, N) squared query–token distances, sigma (S)
//    with S = 1 or heads (empty: no mask). Forward builds the mask M (S, Q, N) of eq. (3) and returns
//    out (BH, Q, d), the log-sum-exp (BH, Q) and M; backward returns dq, dkt, dvt and, when asked,
//    ∂L/∂σ for each (batch, head): Σ_{q,n} dS · ∂M/∂σ with ∂M/∂σ = M · (d²/σ³ − 1/σ), summed as two
//    accumulators (Σ dS·M·d² and Σ dS·M) so that ∂M/∂σ is never stored.
//
// 2. The upsampling CNN's full-resolution tail: transposed convolution with kernel = stride = s,
//    ReLU, 1×1 convolution. Each coarse pixel renders its own s×s block, so the block's hidden
//    activations (s·s·M values) live in a small buffer and never reach memory: PyTorch's modules
//    write and re-read them at full resolution several times in forward and backward (memory-bound,
//    ~50 ms per batch of 8 at 224 px here, against a few ms of arithmetic). With few output
//    channels (boundaries, distance, depth) each pixel is a short vectorised loop; with eight or more
//    (semseg, instances) blocks of pixels go through ATen's matrix products, the hidden block held
//    in a per-thread buffer.
//    Layout: x (B, C, h, w); wm (C, L) with L = s·s·M and wm[k][(i·s + j)·M + c] = weight[k, c, i, j];
//    b1 (L) the bias for each (i, j, c); w2 (O, M); b2 (O); output (B, O, h·s, w·s).
// ATen and torch's pybind11 casters only, not <torch/extension.h> (the whole C++ frontend): half
// the first build's time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

// Each query row is two or three vectorised passes over the N keys (the compiler's SIMD expf
// included). The head dimension D is a template constant, so the loops over it unroll and the
// per-dimension sums are plain scalar reductions (written out for D ≤ 8).
#define MAXA_FOR_D(X) X(0) X(1) if constexpr (D > 2) { X(2) X(3) } if constexpr (D > 4) { X(4) X(5) X(6) X(7) }

template <int D, bool MASK>
void forward_kernel(const float* qp, const float* kp, const float* vp, const float* mp, int64_t S, int64_t H,
                    int64_t BH, int64_t Q, int64_t N, float sc, float* op, float* lp) {
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(2 * N, 0.0f);  // logits, and zeros standing in for an absent mask
    float* t = buf.data();
    const float* zeros = t + N;
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* k = kp + bh * D * N;
      const float* v = vp + bh * D * N;
      const float* mh = mp ? mp + (S == 1 ? 0 : bh % H) * Q * N : nullptr;
      for (int64_t i = 0; i < Q; ++i) {
        float a[D];
        for (int c = 0; c < D; ++c) a[c] = qp[(bh * Q + i) * D + c] * sc;
        const float* mr = mh ? mh + i * N : zeros;
        float mx = -3.0e38f;
#pragma omp simd reduction(max : mx)
        for (int64_t n = 0; n < N; ++n) {
          float x = 0.0f;
          if constexpr (MASK) x = mr[n];
#pragma GCC unroll 8
          for (int c = 0; c < D; ++c) x += a[c] * k[c * N + n];
          t[n] = x;
          mx = x > mx ? x : mx;
        }
        float sum = 0.0f, o0 = 0.0f, o1 = 0.0f, o2 = 0.0f, o3 = 0.0f, o4 = 0.0f, o5 = 0.0f, o6 = 0.0f, o7 = 0.0f;
#pragma omp simd reduction(+ : sum, o0, o1, o2, o3, o4, o5, o6, o7)
        for (int64_t n = 0; n < N; ++n) {
          const float e = expf(t[n] - mx);
          sum += e;
#define MAXA_ACC(c) o##c += e * v[c * N + n];
          MAXA_FOR_D(MAXA_ACC)
#undef MAXA_ACC
        }
        const float inv = 1.0f / sum;
        const float o[8] = {o0, o1, o2, o3, o4, o5, o6, o7};
        for (int c = 0; c < D; ++c) op[(bh * Q + i) * D + c] = o[c] * inv;
        lp[bh * Q + i] = mx + logf(sum);
      }
    }
  });
}

template <int D, bool MASK, bool DMASK>
void backward_kernel(const float* qp, const float* kp, const float* vp, const float* mp, const float* d2p,
                     const float* sigp, int64_t S, int64_t H, int64_t BH, int64_t Q, int64_t N, float sc,
                     const float* op, const float* lp, const float* gp, float* dqp, float* dkp, float* dvp,
                     float* dsp) {
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(N, 0.0f);  // zeros standing in for an absent mask
    const float* zeros = buf.data();
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* k = kp + bh * D * N;
      const float* v = vp + bh * D * N;
      float* dk = dkp + bh * D * N;
      float* dv = dvp + bh * D * N;
      for (int64_t j = 0; j < D * N; ++j) dk[j] = dv[j] = 0.0f;
      const int64_t head = S == 1 ? 0 : bh % H;
      const float* mh = mp ? mp + head * Q * N : nullptr;
      double acc0 = 0.0, acc1 = 0.0;  // Σ dS·M and Σ dS·M·d²
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t row = bh * Q + i;
        float a[D], g[D];
        float Drow = 0.0f;
        for (int c = 0; c < D; ++c) {
          a[c] = qp[row * D + c] * sc;
          g[c] = gp[row * D + c];
          Drow += g[c] * op[row * D + c];
        }
        const float l = lp[row];
        const float* mr = mh ? mh + i * N : zeros;
        const float* d2r = d2p ? d2p + i * N : zeros;
        float s0 = 0.0f, s1 = 0.0f, q0 = 0.0f, q1 = 0.0f, q2 = 0.0f, q3 = 0.0f, q4 = 0.0f, q5 = 0.0f, q6 = 0.0f, q7 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, q0, q1, q2, q3, q4, q5, q6, q7)
        for (int64_t n = 0; n < N; ++n) {
          float x = 0.0f, dp = -Drow;
          if constexpr (MASK) x = mr[n];
#pragma GCC unroll 8
          for (int c = 0; c < D; ++c) {
            x += a[c] * k[c * N + n];
            dp += g[c] * v[c * N + n];
          }
          const float p = expf(x - l);  // P
          const float ds = p * dp;      // dS = P ⊙ (dP − D)
          if constexpr (DMASK) {
            const float w = ds * mr[n];
            s0 += w;
            s1 += w * d2r[n];
          }
#pragma GCC unroll 8
          for (int c = 0; c < D; ++c) {
            dk[c * N + n] += ds * a[c];
            dv[c * N + n] += p * g[c];
          }
#define MAXA_ACC(c) q##c += ds * k[c * N + n];
          MAXA_FOR_D(MAXA_ACC)
#undef MAXA_ACC
        }
        const float dq[8] = {q0, q1, q2, q3, q4, q5, q6, q7};
        for (int c = 0; c < D; ++c) dqp[row * D + c] = dq[c] * sc;
        acc0 += s0;
        acc1 += s1;
      }
      if constexpr (DMASK) {
        const double sg = sigp[head];
        dsp[bh] = static_cast<float>(acc1 / (sg * sg * sg) - acc0 / sg);
      }
    }
  });
}

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dims,
              name, " must be a contiguous CPU float32 tensor with ", dims, " dimensions");
}

}  // namespace

// M (S, Q, N) of eq. (3): exp(−d²/2σ²) / (σ√(2π)) for each σ.
at::Tensor gaussian_mask(const at::Tensor& d2, const at::Tensor& sigma) {
  check(d2, "d2", 2), check(sigma, "sigma", 1);
  const int64_t S = sigma.size(0);
  auto mask = at::empty({S, d2.size(0), d2.size(1)}, d2.options());
  const float *dp = d2.data_ptr<float>(), *sp = sigma.data_ptr<float>();
  float* mp = mask.data_ptr<float>();
  at::parallel_for(0, S * d2.size(0), 16, [&](int64_t r0, int64_t r1) {
    const int64_t N = d2.size(1);
    for (int64_t r = r0; r < r1; ++r) {
      const float sg = sp[r / d2.size(0)], a = -0.5f / (sg * sg), c = 1.0f / (sg * 2.5066282746310002f);
      const float* dr = dp + (r % d2.size(0)) * N;
      float* mr = mp + r * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) mr[n] = c * expf(a * dr[n]);
    }
  });
  return mask;
}

// Returns out, lse and the mask (empty without σ), which the backward takes back.
std::vector<at::Tensor> attention_forward(at::Tensor q, at::Tensor kt, at::Tensor vt, at::Tensor d2,
                                          at::Tensor sigma, int64_t heads, double scale) {
  check(q, "q", 3), check(kt, "kt", 3), check(vt, "vt", 3);
  const int64_t BH = q.size(0), Q = q.size(1), d = q.size(2), N = kt.size(2);
  const bool has_mask = sigma.numel() > 0;
  at::Tensor mask = has_mask ? gaussian_mask(d2, sigma) : q.new_empty({0});
  if (has_mask) TORCH_CHECK(mask.size(1) == Q && mask.size(2) == N, "d2 must be (queries, tokens)");
  auto out = at::empty({BH, Q, d}, q.options());
  auto lse = at::empty({BH, Q}, q.options());
  const float* mp = has_mask ? mask.data_ptr<float>() : nullptr;
  const int64_t S = has_mask ? mask.size(0) : 1;
  auto run = [&](auto dim) {
    constexpr int Dd = decltype(dim)::value;
    auto f = mp ? forward_kernel<Dd, true> : forward_kernel<Dd, false>;
    f(q.data_ptr<float>(), kt.data_ptr<float>(), vt.data_ptr<float>(), mp, S, heads, BH, Q, N,
      static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>());
  };
  switch (d) {
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "head dimension ", d, " is not supported (2, 4 or 8)");
  }
  return {out, lse, mask};
}

// dq, dkt, dvt and ∂L/∂σ per (batch, head) (zeros unless want_sigma).
std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor kt, at::Tensor vt, at::Tensor mask,
                                           at::Tensor d2, at::Tensor sigma, bool want_sigma, int64_t heads,
                                           double scale, at::Tensor out, at::Tensor lse, at::Tensor grad) {
  check(q, "q", 3), check(kt, "kt", 3), check(vt, "vt", 3), check(out, "out", 3), check(grad, "grad", 3);
  const int64_t BH = q.size(0), Q = q.size(1), d = q.size(2), N = kt.size(2);
  const bool has_mask = mask.numel() > 0, has_dmask = has_mask && want_sigma;
  if (has_mask) check(mask, "mask", 3);
  if (has_dmask) check(d2, "d2", 2), check(sigma, "sigma", 1);
  auto dq = at::empty_like(q), dkt = at::empty_like(kt), dvt = at::empty_like(vt);
  auto dsig = at::zeros({BH}, q.options());
  const int64_t S = has_mask ? mask.size(0) : 1;
  auto run = [&](auto dim) {
    constexpr int Dd = decltype(dim)::value;
    auto f = has_mask ? (has_dmask ? backward_kernel<Dd, true, true> : backward_kernel<Dd, true, false>)
                      : backward_kernel<Dd, false, false>;
    f(q.data_ptr<float>(), kt.data_ptr<float>(), vt.data_ptr<float>(), has_mask ? mask.data_ptr<float>() : nullptr,
      has_dmask ? d2.data_ptr<float>() : nullptr, has_dmask ? sigma.data_ptr<float>() : nullptr, S, heads, BH, Q,
      N, static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>(), grad.data_ptr<float>(),
      dq.data_ptr<float>(), dkt.data_ptr<float>(), dvt.data_ptr<float>(), dsig.data_ptr<float>());
  };
  switch (d) {
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "head dimension ", d, " is not supported (2, 4 or 8)");
  }
  return {dq, dkt, dvt, dsig};
}

namespace {

// Hidden activations of one coarse pixel: hb[l] = b1[l] + Σ_k x_k · wm[k][l] (before the ReLU).
inline void tail_hidden(const float* xv, const float* wm, const float* b1, int64_t C, int64_t L, float* hb) {
  for (int64_t l = 0; l < L; ++l) hb[l] = b1[l];
  for (int64_t k = 0; k < C; ++k) {
    const float a = xv[k];
    const float* wk = wm + k * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) hb[l] += a * wk[l];
  }
}

struct TailShape {
  int64_t B, C, h, w, s, M, O, L, H, W;
};

TailShape tail_shape(const at::Tensor& x, const at::Tensor& wm, const at::Tensor& w2, int64_t s) {
  check(x, "x", 4), check(wm, "wm", 2), check(w2, "w2", 2);
  TailShape t{x.size(0), x.size(1), x.size(2), x.size(3), s, w2.size(1), w2.size(0), wm.size(1), 0, 0};
  TORCH_CHECK(wm.size(0) == t.C && t.L == s * s * t.M, "tail weights do not match the input");
  t.H = t.h * s, t.W = t.w * s;
  return t;
}

}  // namespace

namespace {

// Wide tails (eight or more output channels): blocks of pixels through ATen's matrix products
// (single-threaded inside the parallel loop), the hidden block kept in a per-thread buffer.
int64_t tail_block(const TailShape& t) { return std::max<int64_t>(16, std::min<int64_t>(256, 32768 / t.L)); }

void gather_block(const float* xp, const TailShape& t, int64_t p0, int64_t n, float* X) {
  const int64_t hw = t.h * t.w;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = (p0 + i) / hw, r = (p0 + i) % hw;
    for (int64_t k = 0; k < t.C; ++k) X[i * t.C + k] = xp[(b * t.C + k) * hw + r];
  }
}

// Offsets into the output (or its gradient), channel 0: coarse pixel p's s×s block starts at
// pixel_base(p); sub-position ij = i·s + j of the block is sub_offset(ij) further.
inline int64_t pixel_base(const TailShape& t, int64_t p) {
  const int64_t hw = t.h * t.w, b = p / hw, r = p % hw;
  return b * t.O * t.H * t.W + (r / t.w) * t.s * t.W + (r % t.w) * t.s;
}
inline int64_t sub_offset(const TailShape& t, int64_t ij) { return (ij / t.s) * t.W + ij % t.s; }

at::Tensor tail_forward_wide(const at::Tensor& x, const at::Tensor& wm, const at::Tensor& b1, const at::Tensor& w2,
                             const at::Tensor& b2, const TailShape& t) {
  auto y = at::empty({t.B, t.O, t.H, t.W}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t P = tail_block(t), ss = t.s * t.s, plane = t.H * t.W;
  const at::Tensor w2t = w2.t();
  at::parallel_for(0, t.B * t.h * t.w, P, [&](int64_t p0, int64_t p1) {
    at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads do not inherit the caller's
    at::Tensor X = at::empty({P, t.C}, x.options()), Hb = at::empty({P, t.L}, x.options());
    at::Tensor Y = at::empty({P * ss, t.O}, x.options());
    for (int64_t q0 = p0; q0 < p1; q0 += P) {
      const int64_t n = std::min(P, p1 - q0);
      gather_block(xp, t, q0, n, X.data_ptr<float>());
      at::Tensor Hn = Hb.narrow(0, 0, n), Yn = Y.narrow(0, 0, n * ss);
      Hn.copy_(b1.unsqueeze(0).expand({n, t.L}));
      Hn.addmm_(X.narrow(0, 0, n), wm);
      Hn.clamp_min_(0.0f);
      Yn.copy_(b2.unsqueeze(0).expand({n * ss, t.O}));
      Yn.addmm_(Hn.view({n * ss, t.M}), w2t);
      const float* yr = Yn.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t ij = 0; ij < ss; ++ij) {
          float* out = yp + pixel_base(t, q0 + i) + sub_offset(t, ij);
          const float* src = yr + (i * ss + ij) * t.O;
          for (int64_t o = 0; o < t.O; ++o) out[o * plane] = src[o];
        }
    }
  });
  return y;
}

void tail_backward_wide(const at::Tensor& x, const at::Tensor& wm, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& grad, const TailShape& t, at::Tensor& dx, at::Tensor& acc) {
  const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  const int64_t P = tail_block(t), ss = t.s * t.s, plane = t.H * t.W, hw = t.h * t.w, nt = acc.size(0);
  const at::Tensor wmt = wm.t();
  at::parallel_for(0, t.B * hw, P, [&](int64_t p0, int64_t p1) {
    at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads do not inherit the caller's
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < nt, "unexpected thread id");
    at::Tensor a = acc.select(0, tid);
    int64_t off = 0;
    auto part = [&](int64_t n) { auto v = a.narrow(0, off, n); off += n; return v; };
    at::Tensor dwm = part(t.C * t.L).view({t.C, t.L}), db1 = part(t.L);
    at::Tensor dw2 = part(t.O * t.M).view({t.O, t.M}), db2 = part(t.O);
    at::Tensor X = at::empty({P, t.C}, x.options()), Hb = at::empty({P, t.L}, x.options());
    at::Tensor G = at::empty({P * ss, t.O}, x.options());
    for (int64_t q0 = p0; q0 < p1; q0 += P) {
      const int64_t n = std::min(P, p1 - q0);
      gather_block(xp, t, q0, n, X.data_ptr<float>());
      float* gr = G.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t ij = 0; ij < ss; ++ij) {
          const float* g = gp + pixel_base(t, q0 + i) + sub_offset(t, ij);
          float* dst = gr + (i * ss + ij) * t.O;
          for (int64_t o = 0; o < t.O; ++o) dst[o] = g[o * plane];
        }
      at::Tensor Xn = X.narrow(0, 0, n), Hn = Hb.narrow(0, 0, n), Gn = G.narrow(0, 0, n * ss);
      Hn.copy_(b1.unsqueeze(0).expand({n, t.L}));
      Hn.addmm_(Xn, wm);
      at::Tensor live = Hn > 0;
      Hn.clamp_min_(0.0f);
      db2.add_(Gn.sum(0));
      dw2.addmm_(Gn.t(), Hn.view({n * ss, t.M}));
      at::Tensor dH = at::mm(Gn, w2).view({n, t.L}).mul_(live);
      db1.add_(dH.sum(0));
      dwm.addmm_(Xn.t(), dH);
      at::Tensor dX = at::mm(dH, wmt);
      const float* dr = dX.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = (q0 + i) / hw, r = (q0 + i) % hw;
        for (int64_t k = 0; k < t.C; ++k) dxp[(b * t.C + k) * hw + r] = dr[i * t.C + k];
      }
    }
  });
}

void tail_backward_narrow(const at::Tensor& x, const at::Tensor& wm, const at::Tensor& b1, const at::Tensor& w2,
                          const at::Tensor& grad, const TailShape& t, at::Tensor& dx, at::Tensor& acc) {
  const int64_t nt = acc.size(0), acc_n = acc.size(1);
  const float *xp = x.data_ptr<float>(), *wp = wm.data_ptr<float>(), *b1p = b1.data_ptr<float>();
  const float *w2p = w2.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *accp = acc.data_ptr<float>();
  const int64_t hw = t.h * t.w;
  at::parallel_for(0, t.B * hw, 64, [&](int64_t p0, int64_t p1) {
    const int64_t tid = at::get_thread_num();
    TORCH_CHECK(tid < nt, "unexpected thread id");
    float* dwm = accp + tid * acc_n;
    float* db1 = dwm + t.C * t.L;
    float* dw2 = db1 + t.L;
    float* db2 = dw2 + t.O * t.M;
    std::vector<float> hb(t.L), dh(t.L), xv(t.C);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / hw, r = p % hw, base = pixel_base(t, p);
      gather_block(xp, t, p, 1, xv.data());
      tail_hidden(xv.data(), wp, b1p, t.C, t.L, hb.data());
      for (int64_t l = 0; l < t.L; ++l) dh[l] = 0.0f;
      for (int64_t ij = 0; ij < t.s * t.s; ++ij) {
        const float* hr = hb.data() + ij * t.M;
        float* dr = dh.data() + ij * t.M;
        const float* g = gp + base + sub_offset(t, ij);
        for (int64_t o = 0; o < t.O; ++o) {
          const float go = g[o * t.H * t.W];
          db2[o] += go;
          const float* wo = w2p + o * t.M;
          float* dwo = dw2 + o * t.M;
#pragma omp simd
          for (int64_t c = 0; c < t.M; ++c) {
            dwo[c] += go * (hr[c] > 0.0f ? hr[c] : 0.0f);
            dr[c] += go * wo[c];
          }
        }
      }
#pragma omp simd
      for (int64_t l = 0; l < t.L; ++l) {
        dh[l] = hb[l] > 0.0f ? dh[l] : 0.0f;
        db1[l] += dh[l];
      }
      for (int64_t k = 0; k < t.C; ++k) {
        const float a = xv[k];
        const float* wk = wp + k * t.L;
        float* dwk = dwm + k * t.L;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < t.L; ++l) {
          dwk[l] += a * dh[l];
          sum += wk[l] * dh[l];
        }
        dxp[(b * t.C + k) * hw + r] = sum;
      }
    }
  });
}

bool tail_is_wide(const TailShape& t) { return t.O >= 8; }

}  // namespace

at::Tensor tail_forward(at::Tensor x, at::Tensor wm, at::Tensor b1, at::Tensor w2, at::Tensor b2, int64_t s) {
  const TailShape t = tail_shape(x, wm, w2, s);
  check(b1, "b1", 1), check(b2, "b2", 1);
  if (tail_is_wide(t)) return tail_forward_wide(x, wm, b1, w2, b2, t);
  auto y = at::empty({t.B, t.O, t.H, t.W}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = wm.data_ptr<float>(), *b1p = b1.data_ptr<float>();
  const float *w2p = w2.data_ptr<float>(), *b2p = b2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t hw = t.h * t.w;
  at::parallel_for(0, t.B * hw, 64, [&](int64_t p0, int64_t p1) {
    std::vector<float> hb(t.L), xv(t.C);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t base = pixel_base(t, p);
      gather_block(xp, t, p, 1, xv.data());
      tail_hidden(xv.data(), wp, b1p, t.C, t.L, hb.data());
      for (int64_t l = 0; l < t.L; ++l) hb[l] = hb[l] > 0.0f ? hb[l] : 0.0f;
      for (int64_t ij = 0; ij < t.s * t.s; ++ij) {
        const float* rr = hb.data() + ij * t.M;
        float* out = yp + base + sub_offset(t, ij);
        for (int64_t o = 0; o < t.O; ++o) {
          const float* wo = w2p + o * t.M;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t c = 0; c < t.M; ++c) acc += wo[c] * rr[c];
          out[o * t.H * t.W] = acc + b2p[o];
        }
      }
    }
  });
  return y;
}

// Gradients of tail_forward: dx, dwm, db1, dw2, db2. The hidden activations are recomputed per pixel;
// weight gradients are summed per thread, then across threads.
std::vector<at::Tensor> tail_backward(at::Tensor x, at::Tensor wm, at::Tensor b1, at::Tensor w2, at::Tensor grad,
                                      int64_t s) {
  const TailShape t = tail_shape(x, wm, w2, s);
  check(b1, "b1", 1), check(grad, "grad", 4);
  TORCH_CHECK(grad.size(0) == t.B && grad.size(1) == t.O && grad.size(2) == t.H && grad.size(3) == t.W,
              "tail gradient has the wrong shape");
  const int64_t nt = at::get_num_threads(), acc_n = t.C * t.L + t.L + t.O * t.M + t.O;
  auto acc = at::zeros({nt, acc_n}, x.options());
  auto dx = at::empty_like(x);
  (tail_is_wide(t) ? tail_backward_wide : tail_backward_narrow)(x, wm, b1, w2, grad, t, dx, acc);
  auto total = acc.sum(0);
  int64_t o0 = 0;
  auto part = [&](int64_t n) { auto v = total.narrow(0, o0, n); o0 += n; return v; };
  auto dwm = part(t.C * t.L).view({t.C, t.L});
  auto db1 = part(t.L);
  auto dw2 = part(t.O * t.M).view({t.O, t.M});
  auto db2 = part(t.O);
  return {dx, dwm, db1, dw2, db2};
}

// 3. float16 -> float32 for the streamed probe's batches (probe.data): one image's values, read into
//    a small buffer still in cache, into its row of the float32 batch, on the calling thread (the
//    GIL released). With F16C (x86-64-v3 and up) eight values per instruction; torch's own copy on
//    one thread was about 1.35x slower there. Without F16C, has_f16c() is false and the caller keeps
//    torch's copy.
//    A copy of at least kStreamBytes of output writes with non-temporal (streaming) stores: the batch
//    is written once and read once by the training step, so fetching each destination line into the
//    cache before overwriting it (what a plain store does) only doubles the memory traffic. On the
//    2-core build machine that halved the copy (100 -> 50 us per ViT-B image) and left the consumer's
//    read of the batch as fast. Smaller copies keep plain stores (their output may stay in cache).
bool has_f16c() {
#if defined(__F16C__)
  return true;
#else
  return false;
#endif
}

constexpr int64_t kStreamBytes = 256 * 1024;

void half_to_float(at::Tensor dst, at::Tensor src) {
  TORCH_CHECK(src.scalar_type() == at::kHalf && dst.scalar_type() == at::kFloat, "half_to_float: float16 into float32");
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous() && src.numel() == dst.numel(),
              "half_to_float: contiguous tensors of the same size");
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src.data_ptr<at::Half>());
  float* d = dst.data_ptr<float>();
  const int64_t n = src.numel();
  auto scalar = [&](int64_t i) { d[i] = static_cast<float>(c10::Half(s[i], c10::Half::from_bits())); };
  int64_t i = 0;
#if defined(__F16C__)
  if (n * 4 >= kStreamBytes) {
    for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 31); ++i) scalar(i);  // up to a 32-byte boundary
    for (; i + 8 <= n; i += 8)
      _mm256_stream_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    _mm_sfence();  // the streamed stores are visible before the caller hands the batch on
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  }
#endif
  for (; i < n; ++i) scalar(i);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("has_f16c", &has_f16c, "whether half_to_float uses F16C instructions");
  m.def("half_to_float", &half_to_float, "float16 -> float32 copy on the calling thread (CPU)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_forward", &attention_forward, "MAXA attention forward (CPU)");
  m.def("attention_backward", &attention_backward, "MAXA attention backward (CPU)");
  m.def("tail_forward", &tail_forward, "upsampling tail forward: transposed conv (k = s) + ReLU + 1x1 conv (CPU)");
  m.def("tail_backward", &tail_backward, "upsampling tail backward (CPU)");
}
