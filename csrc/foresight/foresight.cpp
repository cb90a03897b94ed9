// Fused foresight loss: K projection-head MLPs + neighbour-table gather + cosine
// alignment loss, forward AND backward in one call (issue 4). Host side: input checks,
// the chunked driver (all GEMMs through ATen, so cuBLAS on CUDA), pybind11 registration.
//
// Op (raw, registered as mirai._C.foresight_fused_cpu / foresight_fused_cuda):
//   foresight_fused_*(h[B,T,D], w1[K,H,D], b1[K,H], w2[K,H,H], b2[K,H], w3[K,C,H], b3[K,C],
//                     teacher[B,S,C], table[K,T] int64, coeffs[K], chunk_tokens, group_heads,
//                     need_grad, check_table)
//     -> [total, per_head[K], dh[B,T,D], dw1, db1, dw2, db2, dw3, db3]
//   y_k = W3_k silu(W2_k silu(W1_k x + b1_k) + b2_k) + b3_k for every token x of h;
//   per_head[k] = mean over (b, t) with table[k,t] >= 0 of -cos(y_k[b,t], teacher[b, table[k,t]])
//   (0 for a head without valid positions); total = sum_k coeffs[k] * per_head[k].
//   The grads are those of `total` (d total / d h and / d each head parameter); the
//   autograd wrapper (mirai/ops/foresight.py) scales them by the incoming gradient.
//   With need_grad = false only the loss is computed and the grads come back empty.
//
// Algorithm. The loss is a leaf of the graph, so d total / d y is known as soon as the
// loss of a token is known; the backward through the heads therefore runs inside this
// call, chunk by chunk, and nothing of size K*tokens*H outlives a chunk:
//   N_k = B * #{t : table[k,t] >= 0}; grad_w[k] = -coeffs[k] / max(N_k, 1)   (device ops, no sync)
//   inv_tn[b,s] = 1 / max(|teacher[b,s]|, eps)                              (one kernel, once)
//   for each group of G heads (G = group_heads; G = K: all heads at once)
//    for each chunk of M tokens x [M, D] (token-major buffers [M, G*H], head k's columns at k*H):
//     P1 = x @ W1cat^T                     one GEMM of width G*H (W1cat = the group's w1 as [G*H, D])
//     Q  = silu(P1 + b1)                   fused bias + SiLU (S1)
//     P2 = bmm(Q, W2^T)                    strided-batched over heads (A2)
//     Q  = silu(P2 + b2)                   (S2; S1 is recomputed later instead of kept)
//     Y  = bmm(Q, W3^T)                    [M, G*C], b3 is added inside the loss kernel
//     loss kernel: per (token, head) row reads teacher[b, table[k,t]] through the table,
//       writes -cos to row_loss and dY = grad_w[k] * d cos / d y in place of Y
//     dW3 += bmm(dY^T, Q); db3 += colsum(dY)
//     Q  = bmm(dY, W3)                     (dS2)
//     Q  = Q * silu'(P2 + b2)              (dZ2) + column partials -> db2
//     P2 = bmm(Q, W2)                      (dS1)
//     P2 = P2 * silu'(P1 + b1), P1 = silu(P1 + b1)   (dA1 and S1 in one pass) -> db1
//     dW2 += bmm(Q^T, P1); dW1cat += P2^T @ x        (weight grads)
//     dh[chunk] (+)= P2 @ W1cat            one GEMM summing over the group's heads; the
//                                          first group writes, later groups add
//   per_head = row_loss.sum(tokens) / max(N_k, 1); total = sum coeffs * per_head.
// Memory (beyond the outputs): 3 buffers [chunk, G*H] + one [chunk, G*C] in the input dtype,
// and, when the tokens take more than one chunk, fp32 weight-gradient accumulators for ONE
// group (G heads), rounded into the parameter-dtype grads when the group is done. With one
// chunk the GEMMs write the grads in the parameter dtype directly (fp32 accumulation inside
// cuBLAS). Fewer heads per group trade GEMM width for memory: with G = 1 and two chunks,
// GPT-B's K = 3 heads need a third of the accumulators and of the workspace of G = 3.
// mirai/ops/foresight.py (fused_plan) picks G and the chunk within a byte budget.
//
// Dtypes: h and the six head parameters share one dtype, float32 or bfloat16 (float64 on
// the CPU, for gradcheck); GEMMs run in that dtype with fp32 accumulation (ATen/cuBLAS);
// element math and reductions in fp32 (float64 for float64). teacher: float32 or bfloat16
// (or float64 on the CPU), any of them whatever h's dtype. total/per_head: fp32 (float64
// for float64 inputs); grads: the dtype of h and the parameters.
// Non-contiguous inputs are made contiguous (copied) before use.
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <vector>

#include "common/registry.h"
#include "foresight/foresight_kernels.h"
#include "foresight/foresight_math.h"

namespace mirai {
namespace foresight {
namespace {

struct Inputs {
  at::Tensor h, w1, b1, w2, b2, w3, b3, teacher, table, coeffs;
};

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> expected, const char* symbolic) {
  TORCH_CHECK(t.sizes().vec() == expected, "foresight_loss: ", name, " must have shape ", symbolic, " = ",
              c10::IntArrayRef(expected), ", got ", shape_str(t));
}

bool is_head_dtype(at::ScalarType s, bool cuda) {
  return s == at::kFloat || s == at::kBFloat16 || (!cuda && s == at::kDouble);
}

// Checks everything that can be checked without reading device memory (plus the table
// range when check_table), with messages naming the tensor and the constraint.
void check_inputs(const Inputs& in, bool cuda, int64_t chunk_tokens, bool check_table) {
  const char* entry = cuda ? "foresight_fused_cuda" : "foresight_fused_cpu";
  const std::pair<const char*, const at::Tensor*> all[] = {
      {"h", &in.h},   {"w1", &in.w1}, {"b1", &in.b1},           {"w2", &in.w2},       {"b2", &in.b2},
      {"w3", &in.w3}, {"b3", &in.b3}, {"teacher", &in.teacher}, {"table", &in.table}, {"coeffs", &in.coeffs}};
  for (const auto& [name, t] : all) {
    TORCH_CHECK(t->defined(), "foresight_loss: ", name, " is undefined");
    TORCH_CHECK(!t->is_sparse(), "foresight_loss: ", name, " must be a dense (strided) tensor");
    if (cuda) {
      TORCH_CHECK(t->is_cuda(), "foresight_loss (", entry, "): every tensor must be on the CUDA device of h (",
                  in.h.device(), "), but ", name, " is on ", t->device());
    } else {
      TORCH_CHECK(t->device().is_cpu(), "foresight_loss (", entry, "): every tensor must be on the CPU, but ", name,
                  " is on ", t->device());
    }
    TORCH_CHECK(t->device() == in.h.device(), "foresight_loss: all tensors must be on one device; h is on ",
                in.h.device(), " but ", name, " is on ", t->device());
  }
  TORCH_CHECK(in.h.dim() == 3, "foresight_loss: h must be [B, T, D], got shape ", shape_str(in.h));
  TORCH_CHECK(in.w1.dim() == 3, "foresight_loss: w1 must be [K, H, D], got shape ", shape_str(in.w1));
  TORCH_CHECK(in.w3.dim() == 3, "foresight_loss: w3 must be [K, C, H], got shape ", shape_str(in.w3));
  TORCH_CHECK(in.teacher.dim() == 3, "foresight_loss: teacher must be [B, S, C], got shape ", shape_str(in.teacher));
  const int64_t B = in.h.size(0), T = in.h.size(1), D = in.h.size(2);
  const int64_t K = in.w1.size(0), H = in.w1.size(1), C = in.w3.size(1), S = in.teacher.size(1);
  TORCH_CHECK(K >= 1 && H >= 1 && D >= 1 && C >= 1,
              "foresight_loss: K, hidden, D and C must be >= 1, got K=", K, " H=", H, " D=", D, " C=", C);
  check_shape(in.w1, "w1", {K, H, D}, "[K, H, D] (D from h)");
  check_shape(in.b1, "b1", {K, H}, "[K, H]");
  check_shape(in.w2, "w2", {K, H, H}, "[K, H, H]");
  check_shape(in.b2, "b2", {K, H}, "[K, H]");
  check_shape(in.w3, "w3", {K, C, H}, "[K, C, H]");
  check_shape(in.b3, "b3", {K, C}, "[K, C]");
  check_shape(in.teacher, "teacher", {B, S, C}, "[B, S, C] (B from h, C from w3)");
  check_shape(in.table, "table", {K, T}, "[K, T] (K from w1, T from h)");
  check_shape(in.coeffs, "coeffs", {K}, "[K]");

  const auto dt = in.h.scalar_type();
  TORCH_CHECK(is_head_dtype(dt, cuda), "foresight_loss: h must be float32 or bfloat16",
              cuda ? "" : " (or float64 on the CPU)", ", got ", dt);
  const std::pair<const char*, const at::Tensor*> params[] = {{"w1", &in.w1}, {"b1", &in.b1}, {"w2", &in.w2},
                                                              {"b2", &in.b2}, {"w3", &in.w3}, {"b3", &in.b3}};
  for (const auto& [name, t] : params) {
    TORCH_CHECK(t->scalar_type() == dt, "foresight_loss: h and the head parameters must share one dtype; h is ", dt,
                " but ", name, " is ", t->scalar_type());
  }
  TORCH_CHECK(is_head_dtype(in.teacher.scalar_type(), cuda), "foresight_loss: teacher must be float32 or bfloat16",
              cuda ? "" : " (or float64 on the CPU)", ", got ", in.teacher.scalar_type());
  TORCH_CHECK(in.table.scalar_type() == at::kLong, "foresight_loss: table must be int64, got ",
              in.table.scalar_type());
  TORCH_CHECK(at::isFloatingType(in.coeffs.scalar_type()), "foresight_loss: coeffs must be a floating tensor, got ",
              in.coeffs.scalar_type());
  TORCH_CHECK(chunk_tokens >= 1, "foresight_loss: chunk_tokens must be >= 1, got ", chunk_tokens);

  if (check_table && in.table.numel() > 0) {  // one reduction + host sync; the Python wrapper caches per table
    const auto mm = at::aminmax(in.table);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < S, "foresight_loss: table values must lie in [-1, S) = [-1, ", S,
                ") (S = teacher.size(1); -1 means no target), got values in [", lo, ", ", hi, "]");
  }
}

// [M, K*X] token-major buffer -> [K, M, X] per-head strided view (strides X, K*X, 1).
at::Tensor per_head(const at::Tensor& t, int64_t K, int64_t X) {
  return t.view({t.size(0), K, X}).transpose(0, 1);
}

// out = a @ b for [G, m, k] x [G, k, n] into a per-head strided view of a token-major buffer.
// cuBLAS (through ATen) writes the strided view directly; on the CPU the product goes through
// a dense temporary, since CPU BLAS back ends are not all safe with such outputs.
void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  if (out.is_cuda() || out.is_contiguous()) {
    at::bmm_out(out, a, b);
  } else {
    out.copy_(at::bmm(a, b));
  }
}

// target (+)= a @ b for [G, m, k] x [G, k, n]; target in acc dtype (fp32/fp64) or, in
// direct mode, in the input dtype. On CUDA bf16 inputs accumulate into an fp32 target
// through cuBLAS's mixed-precision GEMM (ATen's out_dtype overloads).
void gemm_acc(const at::Tensor& target, const at::Tensor& a, const at::Tensor& b, bool first) {
  auto out = target;  // at::*_out take non-const refs
  if (a.scalar_type() == target.scalar_type()) {
    if (first) {
      at::bmm_out(out, a, b);
    } else {
      out.baddbmm_(a, b);
    }
  } else if (a.is_cuda()) {
    if (first) {
      at::bmm_out(out, a, b, target.scalar_type());
    } else {
      at::baddbmm_out(out, out, a, b, target.scalar_type());
    }
  } else {  // CPU reduced precision: the products of bf16 values are exact in fp32
    const auto af = a.to(target.scalar_type()), bf = b.to(target.scalar_type());
    if (first) {
      at::bmm_out(out, af, bf);
    } else {
      out.baddbmm_(af, bf);
    }
  }
}

// acc (+)= column sums of rows [R, X] (acc_t result [X]).
void colsum_acc(const at::Tensor& acc, const at::Tensor& rows, bool first) {
  auto out = acc;
  const int64_t dim0[] = {0};
  if (first) {
    at::sum_out(out, rows, at::IntArrayRef(dim0), false, acc.scalar_type());
  } else {
    out.add_(at::sum(rows, at::IntArrayRef(dim0), false, acc.scalar_type()));
  }
}

std::vector<at::Tensor> run(const Inputs& raw, int64_t chunk_tokens, int64_t group_heads, bool need_grad,
                            bool check_table, bool cuda, const Kernels& kern) {
  check_inputs(raw, cuda, chunk_tokens, check_table);
  c10::DeviceGuard guard(raw.h.device());
  const auto h = raw.h.contiguous(), w1 = raw.w1.contiguous(), b1 = raw.b1.contiguous();
  const auto w2 = raw.w2.contiguous(), b2 = raw.b2.contiguous(), w3 = raw.w3.contiguous();
  const auto b3 = raw.b3.contiguous(), teacher = raw.teacher.contiguous(), table = raw.table.contiguous();
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2);
  const int64_t K = w1.size(0), H = w1.size(1), C = w3.size(1), S = teacher.size(1);
  const int64_t N = B * T, KH = K * H, KC = K * C;
  const auto dt = h.scalar_type();
  const auto acc_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = h.options();
  const auto acc_opts = h.options().dtype(acc_dt);

  // Per-head counts and loss weights from the table alone (device ops, no host sync).
  const auto count = table.ge(0).sum(1).to(acc_dt).mul_(static_cast<double>(B));  // [K] N_k
  const auto denom = count.clamp_min(1.0);                                         // [K]
  const auto coeffs = raw.coeffs.to(acc_dt);                                       // [K]
  const auto grad_w = coeffs.neg().div_(denom);                                    // [K] -coeff_k / N_k

  const auto inv_tn = at::empty({B, S}, acc_opts);
  if (inv_tn.numel() > 0) kern.teacher_inv_norm(teacher, inv_tn);
  const auto row_loss = at::empty({N, K}, acc_opts);  // -cos per (token, head), every entry written

  // Schedule: heads in groups of G, each group over the tokens in chunks of `chunk`.
  const int64_t G = group_heads < 1 ? K : std::min(group_heads, K);
  const int64_t n_groups = (K + G - 1) / G;
  const int64_t chunk = std::max<int64_t>(1, std::min(chunk_tokens, N));
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  // One chunk per group: the weight-gradient GEMMs write the parameter-dtype grads directly
  // (fp32 accumulation inside the GEMM). Several: fp32 accumulators sized for one group.
  const bool direct = n_chunks == 1;

  at::Tensor dh, gw1, gw2, gw3, gb1, gb2, gb3;  // the op's outputs (weight grads in the param dtype)
  at::Tensor acc1, acc2, acc3;                  // fp32 accumulators of one group (several chunks only)
  if (need_grad) {
    dh = at::empty({N, D}, opts);
    gw1 = n_chunks == 0 ? at::zeros({K, H, D}, opts) : at::empty({K, H, D}, opts);
    gw2 = n_chunks == 0 ? at::zeros({K, H, H}, opts) : at::empty({K, H, H}, opts);
    gw3 = n_chunks == 0 ? at::zeros({K, C, H}, opts) : at::empty({K, C, H}, opts);
    gb1 = at::zeros({KH}, acc_opts);
    gb2 = at::zeros({KH}, acc_opts);
    gb3 = at::zeros({KC}, acc_opts);
    if (!direct && n_chunks > 0) {
      acc1 = at::empty({1, G * H, D}, acc_opts);  // [1, G*H, D]: layer 1 of the group as one GEMM
      acc2 = at::empty({G, H, H}, acc_opts);
      acc3 = at::empty({G, C, H}, acc_opts);
    }
  }

  {  // the loops; the workspace lives only in this scope
    // Flat buffers; each (group, chunk) views their first M * g * X elements as [M, g*X].
    const auto P1 = at::empty({chunk * G * H}, opts);
    const auto P2 = at::empty({chunk * G * H}, opts);
    const auto Q = at::empty({chunk * G * H}, opts);
    const auto Yb = at::empty({chunk * G * C}, opts);
    const int64_t max_tiles = (chunk + kColsumRows - 1) / kColsumRows;
    const auto partial = need_grad ? at::empty({max_tiles * G * H}, acc_opts) : at::Tensor();
    const auto x_all = h.view({N, D});
    auto rows = [](const at::Tensor& flat, int64_t M, int64_t cols) {
      return flat.narrow(0, 0, M * cols).view({M, cols});
    };

    const int64_t groups_to_run = n_chunks > 0 ? n_groups : 0;  // no tokens: zero grads, nothing to run
    for (int64_t gi = 0; gi < groups_to_run; ++gi) {
      const int64_t k0 = gi * G, g = std::min(G, K - k0), gH = g * H, gC = g * C;
      const auto W1g = w1.narrow(0, k0, g).view({gH, D});  // [g*H, D]
      const auto W1t = W1g.t();                             // [D, g*H]
      const auto w2g = w2.narrow(0, k0, g), w3g = w3.narrow(0, k0, g);
      const auto W2t = w2g.transpose(1, 2);                 // [g, H_in, H_out]
      const auto W3t = w3g.transpose(1, 2);                 // [g, H, C]
      const auto b1g = b1.narrow(0, k0, g).view({gH}), b2g = b2.narrow(0, k0, g).view({gH});
      // weight-gradient targets of this group: the output slices, or the accumulators
      at::Tensor t1, t2, t3;
      if (need_grad) {
        t1 = direct ? gw1.narrow(0, k0, g).view({1, gH, D}) : acc1.narrow(1, 0, gH);
        t2 = direct ? gw2.narrow(0, k0, g) : acc2.narrow(0, 0, g);
        t3 = direct ? gw3.narrow(0, k0, g) : acc3.narrow(0, 0, g);
      }
      const auto gb1g = need_grad ? gb1.narrow(0, k0 * H, gH) : at::Tensor();
      const auto gb2g = need_grad ? gb2.narrow(0, k0 * H, gH) : at::Tensor();
      const auto gb3g = need_grad ? gb3.narrow(0, k0 * C, gC) : at::Tensor();

      for (int64_t ci = 0; ci < n_chunks; ++ci) {
        const int64_t m0 = ci * chunk, M = std::min(chunk, N - m0);
        const bool first = ci == 0;
        auto x = x_all.narrow(0, m0, M);                                      // [M, D]
        auto p1 = rows(P1, M, gH), p2 = rows(P2, M, gH), q = rows(Q, M, gH);  // [M, g*H]
        auto yb = rows(Yb, M, gC);                                            // [M, g*C]
        auto p2h = per_head(p2, g, H), qh = per_head(q, g, H), yh = per_head(yb, g, C);  // [g, M, *]

        at::mm_out(p1, x, W1t);            // A1 = x W1^T          [M, g*H]
        kern.bias_silu(p1, b1g, q);        // S1 = silu(A1 + b1)
        bmm_into(p2h, qh, W2t);            // A2 = S1 W2^T         [g, M, H]
        kern.bias_silu(p2, b2g, q);        // S2 = silu(A2 + b2)   (overwrites S1)
        bmm_into(yh, qh, W3t);             // Y = S2 W3^T          [g, M, C]

        LossChunk lc;
        lc.y = yb;
        lc.b3 = b3.narrow(0, k0, g);
        lc.teacher = teacher;
        lc.inv_tn = inv_tn;
        lc.table = table.narrow(0, k0, g);
        lc.grad_w = grad_w.narrow(0, k0, g);
        lc.row_loss = row_loss.narrow(0, m0, M).narrow(1, k0, g);  // [M, g], row stride K
        lc.m0 = m0;
        lc.T = T;
        lc.need_grad = need_grad;
        kern.loss(lc);                     // row_loss; yb <- dY when need_grad
        if (!need_grad) continue;

        const int64_t tiles = (M + kColsumRows - 1) / kColsumRows;
        auto part = rows(partial, tiles, gH);          // [tiles, g*H]
        gemm_acc(t3, yh.transpose(1, 2), qh, first);   // dW3 (+)= dY^T S2     [g, C, H]
        colsum_acc(gb3g, yb, first);                   // db3 (+)= sum_m dY    [g*C]
        bmm_into(qh, yh, w3g);                         // dS2 = dY W3          [g, M, H]
        kern.silu_bwd(q, p2, b2g, part, false);        // dZ2 = dS2 silu'(A2 + b2)
        colsum_acc(gb2g, part, first);                 // db2
        bmm_into(p2h, qh, w2g);                        // dS1 = dZ2 W2         [g, M, H]
        kern.silu_bwd(p2, p1, b1g, part, true);        // dA1 = dS1 silu'(A1 + b1); P1 <- S1
        colsum_acc(gb1g, part, first);                 // db1
        gemm_acc(t2, qh.transpose(1, 2), per_head(p1, g, H), first);  // dW2 (+)= dZ2^T S1  [g, H, H]
        gemm_acc(t1, p2.t().unsqueeze(0), x.unsqueeze(0), first);     // dW1 (+)= dA1^T x   [1, g*H, D]
        auto dh_rows = dh.narrow(0, m0, M);
        if (gi == 0) {
          at::mm_out(dh_rows, p2, W1g);    // dh = dA1 W1g (sums over the group's heads)  [M, D]
        } else {
          dh_rows.addmm_(p2, W1g);         // later groups add theirs
        }
      }
      if (need_grad && !direct) {  // this group's grads, rounded once to the param dtype
        gw1.narrow(0, k0, g).view({1, gH, D}).copy_(t1);
        gw2.narrow(0, k0, g).copy_(t2);
        gw3.narrow(0, k0, g).copy_(t3);
      }
    }
  }
  acc1.reset();
  acc2.reset();
  acc3.reset();

  const auto loss_sum = row_loss.sum(0);         // [K]
  const auto per_head_loss = loss_sum / denom;   // [K]; 0 for a head without valid positions
  const auto total = (coeffs * per_head_loss).sum();
  if (!need_grad) {  // distinct empty tensors: outputs of a custom op must not alias each other
    std::vector<at::Tensor> out{total, per_head_loss};
    for (int i = 0; i < 7; ++i) out.push_back(at::empty({0}, opts));
    return out;
  }
  if (n_chunks == 0) dh.zero_();
  return {total,
          per_head_loss,
          dh.view({B, T, D}),
          gw1,
          gb1.to(dt).view({K, H}),
          gw2,
          gb2.to(dt).view({K, H}),
          gw3,
          gb3.to(dt).view({K, C})};
}

std::vector<at::Tensor> fused_cpu(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                                  const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                  const at::Tensor& b3, const at::Tensor& teacher, const at::Tensor& table,
                                  const at::Tensor& coeffs, int64_t chunk_tokens, int64_t group_heads, bool need_grad,
                                  bool check_table) {
  return run({h, w1, b1, w2, b2, w3, b3, teacher, table, coeffs}, chunk_tokens, group_heads, need_grad, check_table,
             /*cuda=*/false, cpu_kernels());
}

#ifdef MIRAI_WITH_CUDA
std::vector<at::Tensor> fused_cuda(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& b1,
                                   const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& w3,
                                   const at::Tensor& b3, const at::Tensor& teacher, const at::Tensor& table,
                                   const at::Tensor& coeffs, int64_t chunk_tokens, int64_t group_heads, bool need_grad,
                                  bool check_table) {
  return run({h, w1, b1, w2, b2, w3, b3, teacher, table, coeffs}, chunk_tokens, group_heads, need_grad, check_table,
             /*cuda=*/true, cuda_kernels());
}
#endif

// grads[i] *= scale in place (the autograd backward: scale = d loss / d total, a 0-dim tensor
// on the grads' device). On CUDA a kernel reads the scale on the device and does nothing when
// it is 1, so the usual backward costs no memory traffic and no host sync.
void scale_grads(const std::vector<at::Tensor>& grads, const at::Tensor& scale) {
  TORCH_CHECK(scale.dim() == 0 && at::isFloatingType(scale.scalar_type()),
              "foresight_scale_: scale must be a 0-dim floating tensor, got shape ", shape_str(scale), " and dtype ",
              scale.scalar_type());
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK(g.device() == scale.device(), "foresight_scale_: grads[", i, "] is on ", g.device(),
                " but scale is on ", scale.device());
    TORCH_CHECK(g.is_contiguous(), "foresight_scale_: grads[", i, "] must be contiguous");
    if (g.is_cuda()) {
#ifdef MIRAI_WITH_CUDA
      TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16,
                  "foresight_scale_: CUDA grads must be float32 or bfloat16, got ", g.scalar_type());
      c10::DeviceGuard guard(g.device());
      scale_inplace_cuda(g, scale.to(at::kFloat));
#else
      TORCH_CHECK(false, "foresight_scale_: mirai._C was built without CUDA kernels");
#endif
    } else {
      auto t = g;
      t.mul_(scale);
    }
  }
}

}  // namespace
}  // namespace foresight

void register_foresight(pybind11::module_& m) {
  namespace py = pybind11;
  const char* doc =
      "Fused foresight loss, forward and backward in one call (see csrc/foresight/foresight.cpp).\n"
      "(h, w1, b1, w2, b2, w3, b3, teacher, table, coeffs, chunk_tokens, group_heads, need_grad, check_table)\n"
      "-> [total, per_head[K], dh, dw1, db1, dw2, db2, dw3, db3] (grads of total; empty when not need_grad).";
  m.def("foresight_fused_cpu", &foresight::fused_cpu, doc, py::arg("h"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("w3"), py::arg("b3"), py::arg("teacher"), py::arg("table"),
        py::arg("coeffs"), py::arg("chunk_tokens"), py::arg("group_heads"), py::arg("need_grad"),
        py::arg("check_table"),
        py::call_guard<py::gil_scoped_release>());
  m.def("foresight_scale_", &foresight::scale_grads,
        "foresight_scale_(grads: list[Tensor], scale: 0-dim Tensor): grads *= scale in place (no work on CUDA "
        "when scale == 1).",
        py::arg("grads"), py::arg("scale"));
#ifdef MIRAI_WITH_CUDA
  m.def("foresight_fused_cuda", &foresight::fused_cuda, doc, py::arg("h"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("w3"), py::arg("b3"), py::arg("teacher"), py::arg("table"),
        py::arg("coeffs"), py::arg("chunk_tokens"), py::arg("group_heads"), py::arg("need_grad"),
        py::arg("check_table"),
        py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace mirai
