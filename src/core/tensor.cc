#include <string>

#include "fsa/error.h"
#include "fsa/tensor.h"

namespace fsa {
namespace {

void check_rank(size_t rank) {
  if (rank > size_t(kMaxRank)) {
    throw Error(ErrorKind::kShape, "shape",
                "expected at most " + std::to_string(kMaxRank) + " dims, got " +
                    std::to_string(rank));
  }
}

}  // namespace

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kBool: return 1;
    case DType::kFloat64: return 8;
  }
  return 0;
}

std::string to_string(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kBool: return "bool";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

std::string to_string(const Device& device) {
  return device.type == DeviceType::kCPU ? "cpu" : "cuda:" + std::to_string(device.index);
}

// Built with std::to_string rather than an ostringstream: the extension's iostreams use the
// process's locale facets, and in a CUDA build loaded next to torch (another libstdc++) that
// crashed with SIGSEGV inside every error message that printed a shape (issue #13).
std::string TensorView::shape_string() const {
  std::string s = "(";
  for (int d = 0; d < rank; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  return s + ")";
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  Device device) {
  check_rank(shape.size());
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.rank = int(shape.size());
  int d = 0;
  for (int64_t s : shape) v.shape[d++] = s;
  int64_t stride = 1;
  for (d = v.rank - 1; d >= 0; --d) {
    v.stride[d] = stride;
    stride *= v.shape[d];
  }
  return v;
}

TensorView TensorView::strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               std::initializer_list<int64_t> stride, Device device) {
  check_rank(shape.size());
  if (stride.size() != shape.size()) {
    throw Error(ErrorKind::kShape, "stride",
                "expected one stride per dim (" + std::to_string(shape.size()) + "), got " +
                    std::to_string(stride.size()));
  }
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.rank = int(shape.size());
  int d = 0;
  for (int64_t s : shape) v.shape[d++] = s;
  d = 0;
  for (int64_t s : stride) v.stride[d++] = s;
  return v;
}

}  // namespace fsa
