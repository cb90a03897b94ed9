// CPU kernels of the fused foresight loss (see foresight_kernels.h for the contracts
// and foresight.cpp for the chunked algorithm around them).
//
// Plain C++ loops parallelised over rows with at::parallel_for, using the same
// element math as the CUDA kernels (foresight_math.h). Dtypes: inputs float32,
// bfloat16 or float64 (float64 exists for torch.autograd.gradcheck); math and
// reductions in acc_t = float (float32/bfloat16) or double (float64). The teacher
// may have its own dtype (float32, bfloat16, float64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "foresight/foresight_kernels.h"
#include "foresight/foresight_math.h"

namespace mirai {
namespace foresight {
namespace {

// Calls f(acc_t{}) with acc_t = float or double per the acc tensor's dtype.
template <typename F>
void dispatch_acc(const at::Tensor& acc, F&& f) {
  if (acc.scalar_type() == at::kDouble) {
    f(double{});
  } else {
    f(float{});
  }
}

template <typename teacher_t, typename acc_t>
void teacher_inv_norm_impl(const at::Tensor& teacher, const at::Tensor& inv_tn) {
  const int64_t rows = inv_tn.numel();
  const int64_t C = teacher.size(2);
  const teacher_t* t = teacher.data_ptr<teacher_t>();
  acc_t* out = inv_tn.data_ptr<acc_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const teacher_t* row = t + r * C;  // teacher [B*S, C]
      acc_t sq = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(row[c]);
        sq += v * v;
      }
      out[r] = fs_inv_norm(sq);
    }
  });
}

void teacher_inv_norm_cpu(const at::Tensor& teacher, const at::Tensor& inv_tn) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, teacher.scalar_type(), "foresight_teacher_inv_norm_cpu", [&] {
    using teacher_t = scalar_t;
    dispatch_acc(inv_tn, [&](auto acc) { teacher_inv_norm_impl<teacher_t, decltype(acc)>(teacher, inv_tn); });
  });
}

template <typename scalar_t, typename acc_t>
void bias_silu_impl(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& s) {
  const int64_t M = a.size(0), cols = a.size(1);
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  scalar_t* sp = s.data_ptr<scalar_t>();
  at::parallel_for(0, M, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t z = static_cast<acc_t>(ap[r * cols + c]) + static_cast<acc_t>(bp[c]);
        sp[r * cols + c] = static_cast<scalar_t>(fs_silu(z));
      }
    }
  });
}

void bias_silu_cpu(const at::Tensor& a, const at::Tensor& bias, const at::Tensor& s) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "foresight_bias_silu_cpu", [&] {
    bias_silu_impl<scalar_t, at::opmath_type<scalar_t>>(a, bias, s);
  });
}

template <typename scalar_t, typename teacher_t>
void loss_impl(const LossChunk& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = p.row_loss.size(0), K = p.row_loss.size(1);
  const int64_t C = p.b3.size(1), S = p.teacher.size(1), T = p.T;
  scalar_t* y = p.y.data_ptr<scalar_t>();
  const scalar_t* b3 = p.b3.data_ptr<scalar_t>();
  const teacher_t* teacher = p.teacher.data_ptr<teacher_t>();
  const acc_t* inv_tn = p.inv_tn.data_ptr<acc_t>();
  const int64_t* table = p.table.data_ptr<int64_t>();
  const acc_t* grad_w = p.grad_w.data_ptr<acc_t>();
  acc_t* row_loss = p.row_loss.data_ptr<acc_t>();
  const int64_t ld = p.row_loss.stride(0);  // row stride of row_loss (>= K)
  at::parallel_for(0, M * K, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // row r = (m, k) of y [M, K, C]
      const int64_t m = r / K, k = r - m * K;
      int64_t b, t;
      fs_token_bt(p.m0 + m, T, b, t);
      const int64_t s = fs_target_row(table, k, t, T);
      scalar_t* yr = y + r * C;
      const scalar_t* br = b3 + k * C;
      if (s < 0) {  // no target: no loss, no gradient
        row_loss[m * ld + k] = 0;
        if (p.need_grad) {
          for (int64_t c = 0; c < C; ++c) yr[c] = scalar_t(0);
        }
        continue;
      }
      const teacher_t* tr = teacher + (b * S + s) * C;
      acc_t yy = 0, yt = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t yv = static_cast<acc_t>(yr[c]) + static_cast<acc_t>(br[c]);
        const acc_t tv = static_cast<acc_t>(tr[c]);
        yy += yv * yv;
        yt += yv * tv;
      }
      const CosRow<acc_t> cr = fs_cos_row(yy, yt, inv_tn[b * S + s]);
      row_loss[m * ld + k] = -cr.cos;
      if (p.need_grad) {
        const acc_t g = grad_w[k];
        for (int64_t c = 0; c < C; ++c) {
          const acc_t yv = static_cast<acc_t>(yr[c]) + static_cast<acc_t>(br[c]);
          yr[c] = static_cast<scalar_t>(fs_dcos_dy(yv, static_cast<acc_t>(tr[c]), cr, g));
        }
      }
    }
  });
}

void loss_cpu(const LossChunk& p) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.y.scalar_type(), "foresight_loss_cpu", [&] {
    using y_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, p.teacher.scalar_type(), "foresight_loss_cpu_teacher", [&] {
      loss_impl<y_t, scalar_t>(p);
    });
  });
}

template <typename scalar_t, bool WRITE_S>
void silu_bwd_impl(const at::Tensor& ds, const at::Tensor& a, const at::Tensor& bias, const at::Tensor& partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = ds.size(0), cols = ds.size(1);
  const int64_t tiles = partial.size(0);
  scalar_t* dsp = ds.data_ptr<scalar_t>();
  scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  acc_t* part = partial.data_ptr<acc_t>();
  at::parallel_for(0, tiles, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* prow = part + i * cols;
      for (int64_t c = 0; c < cols; ++c) prow[c] = 0;
      const int64_t r_end = std::min(M, (i + 1) * kColsumRows);
      for (int64_t r = i * kColsumRows; r < r_end; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t e = r * cols + c;
          const acc_t z = static_cast<acc_t>(ap[e]) + static_cast<acc_t>(bp[c]);
          const acc_t dz = static_cast<acc_t>(dsp[e]) * fs_silu_grad(z);
          dsp[e] = static_cast<scalar_t>(dz);
          if (WRITE_S) ap[e] = static_cast<scalar_t>(fs_silu(z));
          prow[c] += dz;
        }
      }
    }
  });
}

void silu_bwd_cpu(const at::Tensor& ds, const at::Tensor& a, const at::Tensor& bias, const at::Tensor& partial,
                  bool write_s) {
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, ds.scalar_type(), "foresight_silu_bwd_cpu", [&] {
    if (write_s) {
      silu_bwd_impl<scalar_t, true>(ds, a, bias, partial);
    } else {
      silu_bwd_impl<scalar_t, false>(ds, a, bias, partial);
    }
  });
}

}  // namespace

const Kernels& cpu_kernels() {
  static const Kernels k{teacher_inv_norm_cpu, bias_silu_cpu, loss_cpu, silu_bwd_cpu};
  return k;
}

}  // namespace foresight
}  // namespace mirai
