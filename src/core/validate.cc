// Argument validation: one clear message per rejection, all of it before anything is written.

#include <cmath>
#include <cstdint>
#include <string>

#include "core/problem.h"

namespace fsa::detail {
namespace {

constexpr int64_t kMaxHeadDim = 256;

[[noreturn]] void fail(ErrorKind kind, const std::string& arg, const std::string& message) {
  throw Error(kind, arg, message);
}

std::string str(int64_t v) { return std::to_string(v); }

void check_rank(const TensorView& t, const char* name, int rank, const char* dims) {
  if (t.rank != rank) {
    fail(ErrorKind::kShape, name,
         "expected " + str(rank) + " dims " + dims + ", got " + str(t.rank) + " dims with shape " +
             t.shape_string());
  }
}

void check_device(const TensorView& t, const char* name, const Device& expected) {
  if (t.device != expected) {
    fail(ErrorKind::kDevice, name,
         "expected device " + to_string(expected) + " (the query's), got " + to_string(t.device));
  }
}

void check_dtype(const TensorView& t, const char* name, DType expected, const char* why) {
  if (t.dtype != expected) {
    fail(ErrorKind::kDType, name,
         "expected dtype " + to_string(expected) + " (" + why + "), got " + to_string(t.dtype));
  }
}

void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape,
                 const char* dims) {
  check_rank(t, name, int(shape.size()), dims);
  int d = 0;
  for (int64_t s : shape) {
    if (t.shape[d] != s) {
      std::string expected = "(";  // no ostringstream: see TensorView::shape_string
      int e = 0;
      for (int64_t x : shape) expected += (e++ ? ", " : "") + str(x);
      fail(ErrorKind::kShape, name,
           "expected shape " + expected + ") " + dims + ", got " + t.shape_string());
    }
    ++d;
  }
}

void check_contiguous_last_dim(const TensorView& t, const char* name) {
  // A view without elements has no layout to check (torch gives the expanded gradient of an empty
  // output stride 0 on every dim); seq_operand gives it plain strides.
  if (t.numel() == 0) return;
  if (t.shape[t.rank - 1] > 1 && t.stride[t.rank - 1] != 1) {
    fail(ErrorKind::kValue, name,
         "expected a contiguous last dim (stride 1), got stride " + str(t.stride[t.rank - 1]) +
             "; any other strides are accepted");
  }
}

// Outputs must not alias themselves: a zero stride on a dim of size > 1 would write one element
// from several places.
void check_writable(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;  // nothing is written
  for (int d = 0; d < t.rank; ++d) {
    if (t.shape[d] > 1 && t.stride[d] == 0) {
      fail(ErrorKind::kValue, name,
           "expected a writable view, got stride 0 on dim " + str(d) + " of size " +
               str(t.shape[d]));
    }
  }
}

// fp16 / bf16 everywhere; fp32 and fp64 on the CPU (fp64 accumulates in double: gradient checks).
void check_float_dtype(const TensorView& t, const char* name) {
  if (t.dtype != DType::kFloat16 && t.dtype != DType::kBFloat16 && t.dtype != DType::kFloat32 &&
      t.dtype != DType::kFloat64) {
    fail(ErrorKind::kDType, name,
         "expected dtype float16, bfloat16, or float32 / float64 (CPU), got " +
             to_string(t.dtype));
  }
  if ((t.dtype == DType::kFloat32 || t.dtype == DType::kFloat64) &&
      t.device.type == DeviceType::kCUDA) {
    fail(ErrorKind::kDType, name,
         to_string(t.dtype) + " runs on the CPU backend only; use float16 or bfloat16 on CUDA");
  }
}

void check_backend(const Device& device) {
#ifndef FSA_WITH_CUDA
  if (device.type == DeviceType::kCUDA) {
    fail(ErrorKind::kUnsupported, "query",
         "got a CUDA tensor, but this build has no CUDA backend (rebuild where nvcc is found)");
  }
#endif
}

SeqOperand seq_operand(const TensorView& t) {
  if (t.numel() == 0) {
    // No element is ever addressed; the backends still see the strides of a packed layout.
    return {t.data, t.shape[1] * t.shape[2] * t.shape[3], t.shape[2] * t.shape[3], t.shape[3]};
  }
  return {t.data, t.stride[0], t.stride[1], t.stride[2]};
}

// Checks a (B, S, H, D) operand that mirrors `like` in shape, dtype and device.
SeqOperand check_like(const TensorView& t, const char* name, const TensorView& like,
                      const char* like_name, bool output) {
  check_rank(t, name, 4, "(batch, seqlen, num_heads, head_dim)");
  for (int d = 0; d < 4; ++d) {
    if (t.shape[d] != like.shape[d]) {
      fail(ErrorKind::kShape, name,
           std::string("expected shape ") + like.shape_string() + " (the " + like_name +
               "'s), got " + t.shape_string());
    }
  }
  check_device(t, name, like.device);
  if (t.dtype != like.dtype) {
    fail(ErrorKind::kDType, name,
         "expected dtype " + to_string(like.dtype) + " (the " + like_name + "'s), got " +
             to_string(t.dtype));
  }
  check_contiguous_last_dim(t, name);
  if (output) check_writable(t, name);
  return seq_operand(t);
}

float resolve_scale(const AttentionOptions& o, int64_t head_dim) {
  if (o.softmax_scale.has_value()) {
    const float s = *o.softmax_scale;
    if (!std::isfinite(s) || s < 0.0f) {
      fail(ErrorKind::kValue, "softmax_scale",
           "expected a finite value >= 0, got " + std::to_string(s));
    }
    return s;
  }
  return head_dim > 0 ? 1.0f / std::sqrt(float(head_dim)) : 1.0f;
}

void check_softcap(float softcap) {
  if (!std::isfinite(softcap) || softcap < 0.0f) {
    fail(ErrorKind::kValue, "softcap",
         "expected a finite value >= 0 (0 = off), got " + std::to_string(softcap));
  }
}

void lower_common(Problem& p, const TensorView& q, const TensorView& k, const TensorView& v,
                  const std::optional<TensorView>& mask, const std::optional<TensorView>& bias,
                  const AttentionOptions& options) {
  const Geometry g = validate_geometry(q, k);
  check_float_dtype(q, "query");
  check_contiguous_last_dim(q, "query");
  check_device(k, "key", q.device);
  if (k.dtype != q.dtype) {
    fail(ErrorKind::kDType, "key",
         "expected dtype " + to_string(q.dtype) + " (the query's), got " + to_string(k.dtype));
  }
  check_contiguous_last_dim(k, "key");
  check_like(v, "value", k, "key", false);
  check_backend(q.device);

  p.batch = g.batch;
  p.seqlen_q = g.seqlen_q;
  p.seqlen_k = g.seqlen_k;
  p.num_heads = g.num_heads;
  p.num_kv_heads = g.num_kv_heads;
  p.head_dim = q.shape[3];
  p.dtype = q.dtype;
  p.device = q.device;
  p.q = seq_operand(q);
  p.k = seq_operand(k);
  p.v = seq_operand(v);

  if (mask) {
    check_device(*mask, "attn_mask", q.device);
    check_dtype(*mask, "attn_mask", DType::kBool, "True = keep");
    p.mask = validate_broadcast(*mask, "attn_mask", g, g.seqlen_q, g.seqlen_k);
  }
  if (bias) {
    check_device(*bias, "attn_bias", q.device);
    if (bias->dtype != q.dtype && bias->dtype != DType::kFloat32) {
      fail(ErrorKind::kDType, "attn_bias",
           "expected dtype " + to_string(q.dtype) + " (the query's) or float32, got " +
               to_string(bias->dtype));
    }
    p.bias = validate_broadcast(*bias, "attn_bias", g, g.seqlen_q, g.seqlen_k);
  }
  p.scale = resolve_scale(options, p.head_dim);
  check_softcap(options.softcap);
  p.softcap = options.softcap;
  p.is_causal = options.is_causal;
  p.deterministic = options.deterministic;
}

void check_lse(const TensorView& lse, const char* name, const Problem& p, bool output) {
  check_shape(lse, name, {p.batch, p.num_heads, p.seqlen_q}, "(batch, num_heads, seqlen_q)");
  check_device(lse, name, p.device);
  check_dtype(lse, name, DType::kFloat32, "log-sum-exp is always float32");
  if (output) check_writable(lse, name);
}

}  // namespace

Geometry validate_geometry(const TensorView& q, const TensorView& k) {
  check_rank(q, "query", 4, "(batch, seqlen_q, num_heads, head_dim)");
  check_rank(k, "key", 4, "(batch, seqlen_k, num_kv_heads, head_dim)");
  Geometry g{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2]};
  for (int d = 0; d < 4; ++d) {
    if (q.shape[d] < 0 || k.shape[d] < 0) {
      fail(ErrorKind::kShape, q.shape[d] < 0 ? "query" : "key", "expected sizes >= 0");
    }
  }
  const int64_t head_dim = q.shape[3];
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    fail(ErrorKind::kShape, "query",
         "expected head_dim in 1.." + str(kMaxHeadDim) + ", got " + str(head_dim));
  }
  if (k.shape[0] != g.batch) {
    fail(ErrorKind::kShape, "key",
         "expected batch size " + str(g.batch) + " (the query's), got " + str(k.shape[0]));
  }
  if (k.shape[3] != head_dim) {
    fail(ErrorKind::kShape, "key",
         "expected head_dim " + str(head_dim) + " (the query's), got " + str(k.shape[3]));
  }
  if (g.num_heads < 1) fail(ErrorKind::kShape, "query", "expected num_heads >= 1, got 0");
  if (g.num_kv_heads < 1 || g.num_heads % g.num_kv_heads != 0) {
    fail(ErrorKind::kShape, "key",
         "expected num_kv_heads dividing num_heads = " + str(g.num_heads) + ", got " +
             str(g.num_kv_heads));
  }
  return g;
}

BroadcastOperand validate_broadcast(const TensorView& t, const char* name, const Geometry& g,
                                    int64_t sq, int64_t sk) {
  const std::string expected = "({" + str(g.batch) + "|1}, {" + str(g.num_heads) + "|" +
                               str(g.num_kv_heads) + "|1}, {" + str(sq) + "|1}, {" + str(sk) +
                               "|1})";
  if (t.rank != 4) {
    fail(ErrorKind::kShape, name,
         "expected 4 dims (batch, heads, seqlen_q, seqlen_k) of shape " + expected + ", got " +
             str(t.rank) + " dims with shape " + t.shape_string());
  }
  const int64_t b = t.shape[0], h = t.shape[1], i = t.shape[2], j = t.shape[3];
  const bool ok = (b == g.batch || b == 1) && (h == g.num_heads || h == g.num_kv_heads || h == 1) &&
                  (i == sq || i == 1) && (j == sk || j == 1);
  if (!ok) {
    fail(ErrorKind::kShape, name, "expected shape " + expected + ", got " + t.shape_string());
  }
  BroadcastOperand op;
  op.data = t.data;
  op.dtype = t.dtype;
  for (int d = 0; d < 4; ++d) {
    op.shape[d] = t.shape[d];
    op.stride[d] = t.stride[d];
    op.read_stride[d] = t.shape[d] == 1 ? 0 : t.stride[d];
  }
  op.head_group = g.num_heads / h;
  return op;
}

void check_plan(const Plan& plan, const Problem& p) {
  if (!plan.valid()) fail(ErrorKind::kValue, "plan", "expected a plan built by make_plan()");
  const bool same = plan.batch() == p.batch && plan.seqlen_q() == p.seqlen_q &&
                    plan.seqlen_k() == p.seqlen_k && plan.num_heads() == p.num_heads &&
                    plan.num_kv_heads() == p.num_kv_heads;
  if (!same) {
    fail(ErrorKind::kValue, "plan",
         "built for (batch, seqlen_q, seqlen_k, num_heads, num_kv_heads) = (" +
             str(plan.batch()) + ", " + str(plan.seqlen_q()) + ", " + str(plan.seqlen_k()) +
             ", " + str(plan.num_heads()) + ", " + str(plan.num_kv_heads()) +
             "), which is not this call's (" + str(p.batch) + ", " + str(p.seqlen_q) + ", " +
             str(p.seqlen_k) + ", " + str(p.num_heads) + ", " + str(p.num_kv_heads) + ")");
  }
  if (plan.is_causal() != p.is_causal) {
    fail(ErrorKind::kValue, "plan",
         std::string("built with is_causal=") + (plan.is_causal() ? "true" : "false") +
             ", the call has is_causal=" + (p.is_causal ? "true" : "false"));
  }
  if (plan.has_mask() != p.mask.has_value()) {
    fail(ErrorKind::kValue, "plan",
         std::string("built ") + (plan.has_mask() ? "with" : "without") +
             " attn_mask, the call has " + (p.mask ? "one" : "none"));
  }
  if (plan.device() != p.device) {
    fail(ErrorKind::kDevice, "plan",
         "expected device " + to_string(p.device) + ", got " + to_string(plan.device()));
  }
}

namespace {

// A paged cache's pages, checked before anything reads them: (num_pages, page_size, Hk, D) key and
// value of one shape, the table's extent, and on the CPU every entry a page.
void check_pages(const ForwardArgs& a) {
  const PagedKV& paged = *a.paged_kv;
  check_rank(a.key, "key", 4, "pages (num_pages, page_size, num_kv_heads, head_dim)");
  check_rank(a.value, "value", 4, "pages (num_pages, page_size, num_kv_heads, head_dim)");
  check_rank(a.query, "query", 4, "(batch, seqlen_q, num_heads, head_dim)");
  for (int d = 0; d < 4; ++d) {
    if (a.value.shape[d] != a.key.shape[d]) {
      fail(ErrorKind::kShape, "value",
           "expected pages of shape " + a.key.shape_string() + " (the key's), got " +
               a.value.shape_string());
    }
  }
  if (a.key.shape[1] < 1 || a.key.shape[0] < 0) {
    fail(ErrorKind::kShape, "key",
         "expected pages (num_pages >= 0, page_size >= 1, ...), got " + a.key.shape_string());
  }
  if (paged.page_table == nullptr && a.query.shape[0] * paged.max_pages > 0) {
    fail(ErrorKind::kValue, "page_table", "expected (batch, max_pages) int32, got a null pointer");
  }
  if (paged.max_pages < 0 || paged.max_pages > INT32_MAX / a.key.shape[1]) {
    fail(ErrorKind::kValue, "page_table",
         "expected 0 <= max_pages with max_pages * page_size < 2^31, got max_pages " +
             str(paged.max_pages) + " of page_size " + str(a.key.shape[1]));
  }
  if (a.query.device.type == DeviceType::kCUDA) {
    // The kernels copy rows in 16-byte chunks and never read the table on the host: a paged row
    // must be such a chunk (no padded copy of a cache), and out-of-range entries are clamped on
    // the device (cuda::PagedRows) rather than checked here.
    for (const TensorView* t : {&a.key, &a.value}) {
      const bool chunks = t->shape[3] % 8 == 0 && reinterpret_cast<uintptr_t>(t->data) % 16 == 0 &&
                          t->stride[0] % 8 == 0 && t->stride[1] % 8 == 0 && t->stride[2] % 8 == 0;
      if (!chunks) {
        fail(ErrorKind::kUnsupported, t == &a.key ? "key" : "value",
             "a paged cache on CUDA needs 16-byte rows: head_dim a multiple of 8 and page, row "
             "and head strides multiples of 8 elements from a 16-byte aligned pointer, got shape " +
                 t->shape_string());
      }
    }
    if (a.key.shape[0] > INT32_MAX ||
        (a.key.shape[0] < 1 && a.query.shape[0] * paged.max_pages > 0)) {
      fail(ErrorKind::kShape, "key",
           "expected 1 <= num_pages < 2^31 pages for a non-empty page table on CUDA, got " +
               a.key.shape_string());
    }
    return;
  }
  const int64_t entries = a.query.shape[0] * paged.max_pages, pages = a.key.shape[0];
  for (int64_t e = 0; e < entries; ++e) {
    const int32_t page = paged.page_table[e];
    if (page < 0 || page >= pages) {
      fail(ErrorKind::kValue, "page_table",
           "expected page indices in [0, " + str(pages) + "), got " + str(page) + " at (batch " +
               str(e / paged.max_pages) + ", page " + str(e % paged.max_pages) + ")");
    }
  }
}

// Per-sequence key lengths: on the CPU each one in [0, Sk]; CUDA reads them on the device only
// (the kernels clamp them into that range).
void check_cache_seqlens(const int32_t* lengths, const Problem& p) {
  if (p.device.type == DeviceType::kCUDA) return;
  for (int64_t b = 0; b < p.batch; ++b) {
    if (lengths[b] < 0 || lengths[b] > p.seqlen_k) {
      fail(ErrorKind::kValue, "cache_seqlens",
           "expected lengths in [0, " + str(p.seqlen_k) + "] (the cache's keys), got " +
               str(lengths[b]) + " at batch " + str(b));
    }
  }
}

void page(SeqOperand& op, const TensorView& pages, const PagedKV& paged) {
  op.stride_b = pages.stride[0];
  op.pages = paged.page_table;
  op.pages_stride_b = paged.max_pages;
  op.page_size = pages.shape[1];
  op.num_pages = pages.shape[0];
}

}  // namespace

ForwardProblem validate_forward(const ForwardArgs& a) {
  ForwardProblem p;
  if (a.paged_kv) {
    check_pages(a);
    const TensorView k = paged_key_axis(a.key, a.query, *a.paged_kv);
    const TensorView v = paged_key_axis(a.value, a.query, *a.paged_kv);
    lower_common(p, a.query, k, v, a.attn_mask, a.attn_bias, a.options);
    page(p.k, a.key, *a.paged_kv);
    page(p.v, a.value, *a.paged_kv);
  } else {
    lower_common(p, a.query, a.key, a.value, a.attn_mask, a.attn_bias, a.options);
  }
  p.out = check_like(a.out, "out", a.query, "query", true);
  if (a.cache_seqlens) {
    check_cache_seqlens(a.cache_seqlens, p);
    p.cache_seqlens = a.cache_seqlens;
  }
  if (a.lse) {
    check_lse(*a.lse, "lse", p, true);
    p.lse = static_cast<float*>(a.lse->data);
    p.lse_stride_b = a.lse->stride[0];
    p.lse_stride_h = a.lse->stride[1];
    p.lse_stride_s = a.lse->stride[2];
  }
  if (a.plan) check_plan(*a.plan, p);
  return p;
}

BackwardProblem validate_backward(const BackwardArgs& a) {
  BackwardProblem p;
  lower_common(p, a.query, a.key, a.value, a.attn_mask, a.attn_bias, a.options);
  p.out = check_like(a.out, "out", a.query, "query", false);
  p.dout = check_like(a.dout, "dout", a.query, "query", false);
  check_lse(a.lse, "lse", p, false);
  p.lse = static_cast<const float*>(a.lse.data);
  p.lse_stride_b = a.lse.stride[0];
  p.lse_stride_h = a.lse.stride[1];
  p.lse_stride_s = a.lse.stride[2];
  p.dq = check_like(a.dquery, "dquery", a.query, "query", true);
  p.dk = check_like(a.dkey, "dkey", a.key, "key", true);
  p.dv = check_like(a.dvalue, "dvalue", a.value, "value", true);
  if (a.dbias) {
    if (!a.attn_bias) fail(ErrorKind::kValue, "dbias", "given, but attn_bias is not");
    const TensorView& bias = *a.attn_bias;
    check_rank(*a.dbias, "dbias", 4, "(the attn_bias's shape)");
    for (int d = 0; d < 4; ++d) {
      if (a.dbias->shape[d] != bias.shape[d]) {
        fail(ErrorKind::kShape, "dbias",
             "expected shape " + bias.shape_string() + " (the attn_bias's), got " +
                 a.dbias->shape_string());
      }
    }
    check_device(*a.dbias, "dbias", a.query.device);
    check_dtype(*a.dbias, "dbias", bias.dtype, "the attn_bias's");
    check_writable(*a.dbias, "dbias");
    BroadcastOperand d = *p.bias;
    d.data = a.dbias->data;
    for (int k = 0; k < 4; ++k) {
      d.stride[k] = a.dbias->stride[k];
      d.read_stride[k] = a.dbias->shape[k] == 1 ? 0 : a.dbias->stride[k];
    }
    p.dbias = d;
  }
  if (a.plan) check_plan(*a.plan, p);
  return p;
}

}  // namespace fsa::detail

namespace fsa {

TensorView paged_key_axis(const TensorView& pages, const TensorView& query, const PagedKV& paged) {
  TensorView v = pages;
  v.shape[0] = query.rank > 0 ? query.shape[0] : 0;
  v.shape[1] = paged.max_pages * (pages.rank > 1 ? pages.shape[1] : 0);
  v.stride[0] = 0;
  return v;
}

}  // namespace fsa
