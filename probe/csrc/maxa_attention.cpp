// Fused multi-head cross-attention for the MAXA adapter on CPU, forward and backward, with the
// optional additive Gaussian logit term of eq. (3) and its gradient with respect to σ.
//
// The adapter's heads are tiny (D/h = 4 dimensions; 2 for the d16 variant) while the logit maps
// are large (784 queries × 196 tokens × 8 heads per image). PyTorch's fused CPU attention is built
// for wide heads (it blocks keys into GEMMs), and its unfused path writes every logit map to memory
// several times; here each (batch, head) keeps its keys and values transposed (d, N) in cache and
// every query row is one vectorised pass over the keys (the compiler's SIMD expf).
//
// Layout: q (BH, Q, d), kt and vt (BH, d, N), mask and dmask (S, Q, N) with S = 1 or heads (empty:
// no mask). Forward returns out (BH, Q, d) and the log-sum-exp (BH, Q); backward returns dq, dkt,
// dvt and, when dmask is given, Σ_{q,n} dS · dmask for each (batch, head) — the chain rule for σ.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

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
void backward_kernel(const float* qp, const float* kp, const float* vp, const float* mp, const float* dmp,
                     int64_t S, int64_t H, int64_t BH, int64_t Q, int64_t N, float sc, const float* op,
                     const float* lp, const float* gp, float* dqp, float* dkp, float* dvp, float* dsp) {
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(N, 0.0f);  // zeros standing in for an absent mask or mask derivative
    const float* zeros = buf.data();
    for (int64_t bh = b0; bh < b1; ++bh) {
      const float* k = kp + bh * D * N;
      const float* v = vp + bh * D * N;
      float* dk = dkp + bh * D * N;
      float* dv = dvp + bh * D * N;
      for (int64_t j = 0; j < D * N; ++j) dk[j] = dv[j] = 0.0f;
      const int64_t mo = (S == 1 ? 0 : bh % H) * Q * N;
      const float* mh = mp ? mp + mo : nullptr;
      const float* dmh = dmp ? dmp + mo : nullptr;
      double dsig = 0.0;
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
        const float* dmr = dmh ? dmh + i * N : zeros;
        float sm = 0.0f, q0 = 0.0f, q1 = 0.0f, q2 = 0.0f, q3 = 0.0f, q4 = 0.0f, q5 = 0.0f, q6 = 0.0f, q7 = 0.0f;
#pragma omp simd reduction(+ : sm, q0, q1, q2, q3, q4, q5, q6, q7)
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
          if constexpr (DMASK) sm += ds * dmr[n];
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
        dsig += sm;
      }
      dsp[bh] = static_cast<float>(dsig);
    }
  });
}

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dims,
              name, " must be a contiguous CPU float32 tensor with ", dims, " dimensions");
}

}  // namespace

std::vector<at::Tensor> attention_forward(at::Tensor q, at::Tensor kt, at::Tensor vt, at::Tensor mask, int64_t heads,
                                          double scale) {
  check(q, "q", 3), check(kt, "kt", 3), check(vt, "vt", 3);
  const int64_t BH = q.size(0), Q = q.size(1), d = q.size(2), N = kt.size(2);
  const bool has_mask = mask.numel() > 0;
  if (has_mask) check(mask, "mask", 3);
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
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(at::Tensor q, at::Tensor kt, at::Tensor vt, at::Tensor mask,
                                           at::Tensor dmask, int64_t heads, double scale, at::Tensor out,
                                           at::Tensor lse, at::Tensor grad) {
  check(q, "q", 3), check(kt, "kt", 3), check(vt, "vt", 3), check(out, "out", 3), check(grad, "grad", 3);
  const int64_t BH = q.size(0), Q = q.size(1), d = q.size(2), N = kt.size(2);
  const bool has_mask = mask.numel() > 0, has_dmask = dmask.numel() > 0;
  auto dq = at::empty_like(q), dkt = at::empty_like(kt), dvt = at::empty_like(vt);
  auto dsig = at::zeros({BH}, q.options());
  const int64_t S = has_mask ? mask.size(0) : 1;
  auto run = [&](auto dim) {
    constexpr int Dd = decltype(dim)::value;
    auto f = has_mask ? (has_dmask ? backward_kernel<Dd, true, true> : backward_kernel<Dd, true, false>)
                      : backward_kernel<Dd, false, false>;
    f(q.data_ptr<float>(), kt.data_ptr<float>(), vt.data_ptr<float>(),
                        has_mask ? mask.data_ptr<float>() : nullptr, has_dmask ? dmask.data_ptr<float>() : nullptr, S,
                        heads, BH, Q, N, static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>(),
                        grad.data_ptr<float>(), dq.data_ptr<float>(), dkt.data_ptr<float>(), dvt.data_ptr<float>(),
                        dsig.data_ptr<float>());
  };
  switch (d) {
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 8: run(std::integral_constant<int, 8>{}); break;
    default: TORCH_CHECK(false, "head dimension ", d, " is not supported (2, 4 or 8)");
  }
  return {dq, dkt, dvt, dsig};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &attention_forward, "MAXA attention forward (CPU)");
  m.def("backward", &attention_backward, "MAXA attention backward (CPU)");
}
