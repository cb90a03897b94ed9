// Fused foresight loss: K projection-head MLPs + neighbour-table gather + cosine
// alignment loss, forward AND backward in one call. Host side: input checks,
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

// Sizes of one call and its schedule: heads in groups of G, each group over the N = B*T tokens in
// chunks of `chunk` tokens.
struct Plan {
  int64_t B, T, D, K, H, C, S, N;
  int64_t G, n_groups, chunk, n_chunks;
  // One chunk per group: the weight-gradient GEMMs write the parameter-dtype grads directly
  // (fp32 accumulation inside the GEMM). Several: fp32 accumulators sized for one group.
  bool direct;
  at::ScalarType dt, acc_dt;  // input dtype; accumulation dtype (fp32, or fp64 for fp64 inputs)
};

Plan plan_chunks(const at::Tensor& h, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& teacher,
                 int64_t chunk_tokens, int64_t group_heads) {
  Plan p;
  p.B = h.size(0), p.T = h.size(1), p.D = h.size(2);
  p.K = w1.size(0), p.H = w1.size(1), p.C = w3.size(1), p.S = teacher.size(1);
  p.N = p.B * p.T;
  p.G = group_heads < 1 ? p.K : std::min(group_heads, p.K);
  p.n_groups = (p.K + p.G - 1) / p.G;
  p.chunk = std::max<int64_t>(1, std::min(chunk_tokens, p.N));
  p.n_chunks = (p.N + p.chunk - 1) / p.chunk;
  p.direct = p.n_chunks == 1;
  p.dt = h.scalar_type();
  p.acc_dt = p.dt == at::kDouble ? at::kDouble : at::kFloat;
  return p;
}

// The op's gradient outputs (weight grads in the parameter dtype, bias grads in acc dtype until
// the end) and the fp32 accumulators of one group (several chunks only).
struct Grads {
  at::Tensor dh, gw1, gw2, gw3, gb1, gb2, gb3;
  at::Tensor acc1, acc2, acc3;
};

Grads allocate_grads(const Plan& p, const at::TensorOptions& opts, const at::TensorOptions& acc_opts) {
  Grads gr;
  const int64_t K = p.K, H = p.H, D = p.D, C = p.C;
  const bool none = p.n_chunks == 0;  // no tokens: the weight grads are zeros
  gr.dh = at::empty({p.N, D}, opts);
  gr.gw1 = none ? at::zeros({K, H, D}, opts) : at::empty({K, H, D}, opts);
  gr.gw2 = none ? at::zeros({K, H, H}, opts) : at::empty({K, H, H}, opts);
  gr.gw3 = none ? at::zeros({K, C, H}, opts) : at::empty({K, C, H}, opts);
  gr.gb1 = at::zeros({K * H}, acc_opts);
  gr.gb2 = at::zeros({K * H}, acc_opts);
  gr.gb3 = at::zeros({K * C}, acc_opts);
  if (!p.direct && !none) {
    gr.acc1 = at::empty({1, p.G * H, D}, acc_opts);  // [1, G*H, D]: layer 1 of the group as one GEMM
    gr.acc2 = at::empty({p.G, H, H}, acc_opts);
    gr.acc3 = at::empty({p.G, C, H}, acc_opts);
  }
  return gr;
}

// The weights of heads [k0, k0 + g) in the layouts the GEMMs take, and where their grads go.
struct Group {
  int64_t k0, g, gH, gC;
  at::Tensor W1g, W1t, w2g, w3g, W2t, W3t, b1g, b2g, b3g, table, grad_w;
  at::Tensor t1, t2, t3;        // weight-gradient targets: the output slices, or the accumulators
  at::Tensor gb1g, gb2g, gb3g;  // bias-gradient slices
};

Group group_view(const Plan& p, int64_t gi, const Inputs& in, const at::Tensor& grad_w, const Grads& gr,
                 bool need_grad) {
  Group v;
  const int64_t H = p.H, C = p.C, D = p.D;
  v.k0 = gi * p.G, v.g = std::min(p.G, p.K - v.k0), v.gH = v.g * H, v.gC = v.g * C;
  const int64_t k0 = v.k0, g = v.g;
  v.W1g = in.w1.narrow(0, k0, g).view({v.gH, D});  // [g*H, D]
  v.W1t = v.W1g.t();                                // [D, g*H]
  v.w2g = in.w2.narrow(0, k0, g), v.w3g = in.w3.narrow(0, k0, g);
  v.W2t = v.w2g.transpose(1, 2);  // [g, H_in, H_out]
  v.W3t = v.w3g.transpose(1, 2);  // [g, H, C]
  v.b1g = in.b1.narrow(0, k0, g).view({v.gH}), v.b2g = in.b2.narrow(0, k0, g).view({v.gH});
  v.b3g = in.b3.narrow(0, k0, g);
  v.table = in.table.narrow(0, k0, g);
  v.grad_w = grad_w.narrow(0, k0, g);
  if (need_grad) {
    v.t1 = p.direct ? gr.gw1.narrow(0, k0, g).view({1, v.gH, D}) : gr.acc1.narrow(1, 0, v.gH);
    v.t2 = p.direct ? gr.gw2.narrow(0, k0, g) : gr.acc2.narrow(0, 0, g);
    v.t3 = p.direct ? gr.gw3.narrow(0, k0, g) : gr.acc3.narrow(0, 0, g);
    v.gb1g = gr.gb1.narrow(0, k0 * H, v.gH);
    v.gb2g = gr.gb2.narrow(0, k0 * H, v.gH);
    v.gb3g = gr.gb3.narrow(0, k0 * C, v.gC);
  }
  return v;
}

// One chunk's views of the workspace: token-major [M, g*X] buffers and their per-head views.
struct ChunkBuffers {
  at::Tensor x, p1, p2, q, yb;  // x [M, D]; p1, p2, q [M, g*H]; yb [M, g*C]
  at::Tensor p2h, qh, yh;       // [g, M, H], [g, M, H], [g, M, C]
};

// Per-chunk forward of a group's heads: A1 = x W1^T, S1 = silu(A1 + b1), A2 = S1 W2^T,
// S2 = silu(A2 + b2) (over S1), Y = S2 W3^T; then the loss kernel writes -cos per row and,
// when need_grad, dY in place of Y.
void chunk_forward(const ChunkBuffers& c, const Group& v, const Plan& p, int64_t m0, const at::Tensor& teacher,
                   const at::Tensor& inv_tn, const at::Tensor& row_loss, bool need_grad, const Kernels& kern) {
  auto p1 = c.p1, p2h = c.p2h, yh = c.yh;
  at::mm_out(p1, c.x, v.W1t);        // A1 = x W1^T          [M, g*H]
  kern.bias_silu(c.p1, v.b1g, c.q);  // S1 = silu(A1 + b1)
  bmm_into(p2h, c.qh, v.W2t);        // A2 = S1 W2^T         [g, M, H]
  kern.bias_silu(c.p2, v.b2g, c.q);  // S2 = silu(A2 + b2)   (overwrites S1)
  bmm_into(yh, c.qh, v.W3t);         // Y = S2 W3^T          [g, M, C]

  LossChunk lc;
  lc.y = c.yb;
  lc.b3 = v.b3g;
  lc.teacher = teacher;
  lc.inv_tn = inv_tn;
  lc.table = v.table;
  lc.grad_w = v.grad_w;
  lc.row_loss = row_loss.narrow(0, m0, c.x.size(0)).narrow(1, v.k0, v.g);  // [M, g], row stride K
  lc.m0 = m0;
  lc.T = p.T;
  lc.need_grad = need_grad;
  kern.loss(lc);  // row_loss; yb <- dY when need_grad
}

// Per-chunk backward of a group's heads from dY: the weight and bias gradients accumulate into
// the group's targets (`first`: the group's first chunk writes), dh of the chunk's tokens is
// written by the first group and added to by the later ones.
void chunk_backward(const ChunkBuffers& c, const Group& v, const Grads& gr, const at::Tensor& partial,
                    int64_t m0, bool first, bool first_group, const Kernels& kern) {
  const int64_t M = c.x.size(0), g = v.g, H = v.gH / v.g;
  const int64_t tiles = (M + kColsumRows - 1) / kColsumRows;
  auto qh = c.qh, p2h = c.p2h;
  const auto part = partial.narrow(0, 0, tiles * v.gH).view({tiles, v.gH});  // [tiles, g*H]
  gemm_acc(v.t3, c.yh.transpose(1, 2), c.qh, first);                         // dW3 (+)= dY^T S2     [g, C, H]
  colsum_acc(v.gb3g, c.yb, first);                                           // db3 (+)= sum_m dY    [g*C]
  bmm_into(qh, c.yh, v.w3g);                                                 // dS2 = dY W3          [g, M, H]
  kern.silu_bwd(c.q, c.p2, v.b2g, part, false);                              // dZ2 = dS2 silu'(A2 + b2)
  colsum_acc(v.gb2g, part, first);                                           // db2
  bmm_into(p2h, c.qh, v.w2g);                                                // dS1 = dZ2 W2         [g, M, H]
  kern.silu_bwd(c.p2, c.p1, v.b1g, part, true);                              // dA1 = dS1 silu'(A1 + b1); P1 <- S1
  colsum_acc(v.gb1g, part, first);                                           // db1
  gemm_acc(v.t2, c.qh.transpose(1, 2), per_head(c.p1, g, H), first);         // dW2 (+)= dZ2^T S1  [g, H, H]
  gemm_acc(v.t1, c.p2.t().unsqueeze(0), c.x.unsqueeze(0), first);            // dW1 (+)= dA1^T x   [1, g*H, D]
  auto dh_rows = gr.dh.narrow(0, m0, M);
  if (first_group) {
    at::mm_out(dh_rows, c.p2, v.W1g);  // dh = dA1 W1g (sums over the group's heads)  [M, D]
  } else {
    dh_rows.addmm_(c.p2, v.W1g);  // later groups add theirs
  }
}

// The op's results: total and per-head losses, and the gradients (empty without need_grad).
std::vector<at::Tensor> results(const Plan& p, const at::Tensor& row_loss, const at::Tensor& coeffs,
                                const at::Tensor& denom, const Grads& gr, bool need_grad,
                                const at::TensorOptions& opts) {
  const auto loss_sum = row_loss.sum(0);        // [K]
  const auto per_head_loss = loss_sum / denom;  // [K]; 0 for a head without valid positions
  const auto total = (coeffs * per_head_loss).sum();
  if (!need_grad) {  // distinct empty tensors: outputs of a custom op must not alias each other
    std::vector<at::Tensor> out{total, per_head_loss};
    for (int i = 0; i < 7; ++i) out.push_back(at::empty({0}, opts));
    return out;
  }
  if (p.n_chunks == 0) gr.dh.zero_();
  return {total,
          per_head_loss,
          gr.dh.view({p.B, p.T, p.D}),
          gr.gw1,
          gr.gb1.to(p.dt).view({p.K, p.H}),
          gr.gw2,
          gr.gb2.to(p.dt).view({p.K, p.H}),
          gr.gw3,
          gr.gb3.to(p.dt).view({p.K, p.C})};
}

std::vector<at::Tensor> run(const Inputs& raw, int64_t chunk_tokens, int64_t group_heads, bool need_grad,
                            bool check_table, bool cuda, const Kernels& kern) {
  check_inputs(raw, cuda, chunk_tokens, check_table);
  c10::DeviceGuard guard(raw.h.device());
  const Inputs in{raw.h.contiguous(),  raw.w1.contiguous(),      raw.b1.contiguous(),
                  raw.w2.contiguous(), raw.b2.contiguous(),      raw.w3.contiguous(),
                  raw.b3.contiguous(), raw.teacher.contiguous(), raw.table.contiguous(),
                  raw.coeffs};
  const Plan p = plan_chunks(in.h, in.w1, in.w3, in.teacher, chunk_tokens, group_heads);
  const auto opts = in.h.options();
  const auto acc_opts = in.h.options().dtype(p.acc_dt);

  // Per-head counts and loss weights from the table alone (device ops, no host sync).
  const auto count = in.table.ge(0).sum(1).to(p.acc_dt).mul_(static_cast<double>(p.B));  // [K] N_k
  const auto denom = count.clamp_min(1.0);                                                // [K]
  const auto coeffs = raw.coeffs.to(p.acc_dt);                                            // [K]
  const auto grad_w = coeffs.neg().div_(denom);                                           // [K] -coeff_k / N_k

  const auto inv_tn = at::empty({p.B, p.S}, acc_opts);
  if (inv_tn.numel() > 0) kern.teacher_inv_norm(in.teacher, inv_tn);
  const auto row_loss = at::empty({p.N, p.K}, acc_opts);  // -cos per (token, head), every entry written

  Grads gr = need_grad ? allocate_grads(p, opts, acc_opts) : Grads{};
  {  // the loops; the workspace lives only in this scope
    // Flat buffers; each (group, chunk) views their first M * g * X elements as [M, g*X].
    const int64_t GH = p.G * p.H;
    const auto P1 = at::empty({p.chunk * GH}, opts);
    const auto P2 = at::empty({p.chunk * GH}, opts);
    const auto Q = at::empty({p.chunk * GH}, opts);
    const auto Yb = at::empty({p.chunk * p.G * p.C}, opts);
    const int64_t max_tiles = (p.chunk + kColsumRows - 1) / kColsumRows;
    const auto partial = need_grad ? at::empty({max_tiles * GH}, acc_opts) : at::Tensor();
    const auto x_all = in.h.view({p.N, p.D});
    auto rows = [](const at::Tensor& flat, int64_t M, int64_t cols) {
      return flat.narrow(0, 0, M * cols).view({M, cols});
    };

    const int64_t groups_to_run = p.n_chunks > 0 ? p.n_groups : 0;  // no tokens: zero grads, nothing to run
    for (int64_t gi = 0; gi < groups_to_run; ++gi) {
      const Group v = group_view(p, gi, in, grad_w, gr, need_grad);
      for (int64_t ci = 0; ci < p.n_chunks; ++ci) {
        const int64_t m0 = ci * p.chunk, M = std::min(p.chunk, p.N - m0);
        ChunkBuffers c;
        c.x = x_all.narrow(0, m0, M);                                             // [M, D]
        c.p1 = rows(P1, M, v.gH), c.p2 = rows(P2, M, v.gH), c.q = rows(Q, M, v.gH);  // [M, g*H]
        c.yb = rows(Yb, M, v.gC);                                                 // [M, g*C]
        c.p2h = per_head(c.p2, v.g, p.H), c.qh = per_head(c.q, v.g, p.H), c.yh = per_head(c.yb, v.g, p.C);
        chunk_forward(c, v, p, m0, in.teacher, inv_tn, row_loss, need_grad, kern);
        if (need_grad) chunk_backward(c, v, gr, partial, m0, /*first=*/ci == 0, /*first_group=*/gi == 0, kern);
      }
      if (need_grad && !p.direct) {  // this group's grads, rounded once to the param dtype
        gr.gw1.narrow(0, v.k0, v.g).view({1, v.gH, p.D}).copy_(v.t1);
        gr.gw2.narrow(0, v.k0, v.g).copy_(v.t2);
        gr.gw3.narrow(0, v.k0, v.g).copy_(v.t3);
      }
    }
  }
  gr.acc1.reset();
  gr.acc2.reset();
  gr.acc3.reset();
  return results(p, row_loss, coeffs, denom, gr, need_grad, opts);
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
