#pragma once
// Non-owning views of caller memory: pointer, shape, strides (in elements), dtype, device.
// Any strides are accepted where the contract allows them; a stride of 0 is a broadcast
// (an expanded view) and is read without being materialized.

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace fsa {

enum class DType : uint8_t { kFloat32, kFloat16, kBFloat16, kBool, kFloat64 };

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

inline constexpr int kMaxRank = 4;

size_t dtype_size(DType dtype);
std::string to_string(DType dtype);
std::string to_string(const Device& device);

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};   // sizes, outermost first
  std::array<int64_t, kMaxRank> stride{};  // in elements, may be 0 (broadcast) or any positive value

  int64_t size(int dim) const { return shape[dim]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < rank; ++d) n *= shape[d];
    return n;
  }
  std::string shape_string() const;

  // A densely packed row-major view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = {});
  // A view with explicit strides (in elements).
  static TensorView strided(void* data, DType dtype, std::initializer_list<int64_t> shape,
                            std::initializer_list<int64_t> stride, Device device = {});
};

}  // namespace fsa
