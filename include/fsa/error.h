#pragma once
// Errors raised by the library. Every rejection names the argument and what was expected, and is
// raised before anything is written to an output (SPEC section 6).

#include <stdexcept>
#include <string>

namespace fsa {

// What kind of rejection this is; the Python layer maps kDType to TypeError, everything else
// except kUnsupported to ValueError.
enum class ErrorKind {
  kShape,        // wrong rank or size
  kDType,        // wrong element type
  kDevice,       // tensors on different devices, or a device the build does not support
  kValue,        // a scalar option out of range, a stride that is not allowed
  kUnsupported,  // a valid request this build cannot serve (e.g. CUDA not compiled in)
};

class Error : public std::invalid_argument {
 public:
  Error(ErrorKind kind, std::string argument, const std::string& message)
      : std::invalid_argument(argument.empty() ? message : argument + ": " + message),
        kind_(kind),
        argument_(std::move(argument)) {}

  ErrorKind kind() const noexcept { return kind_; }
  // The caller-facing name of the offending argument ("query", "attn_mask", "softcap", ...).
  const std::string& argument() const noexcept { return argument_; }

 private:
  ErrorKind kind_;
  std::string argument_;
};

}  // namespace fsa
