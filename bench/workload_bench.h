#pragma once
// One attention workload timed on one device, the library alone: the engine behind fsa_bench's
// workload mode (`--shape ...`) and behind `fsa_bench --bench`.
//
// Method (printed with every run):
//   - every input, output, plan and flush buffer is allocated before timing; on CUDA the
//     device's default memory pool keeps what it gets (release threshold UINT64_MAX), so the
//     library's stream-ordered scratch (split-KV partials, backward rowdot / bias-grad
//     accumulators, padded copies) is served from the pool in the timed loop, never by the driver;
//   - warmup calls, then N timed calls: CUDA events around each call on one stream (the host
//     enqueues ahead, as in a training loop), std::chrono on the CPU; median, min and p90;
//   - cold L2: when one call's working set is below 2x the cache, several copies of the inputs
//     and outputs are rotated so that >= 2x the cache is touched between two uses of a copy
//     (a write-based flush would leave ~L2-sized dirty lines whose write-back lands in the timed
//     call); a working set that would need more than 64 copies, or `--l2 flush`, gets a 256 MiB
//     buffer written between calls instead (untimed); `--l2 warm` does neither.

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "fsa/fsa.h"

namespace fsa_bench {

enum class Mode { kForward, kBackward, kForwardBackward };
enum class CachePolicy { kRotate, kFlush, kWarm };

// A problem of the SPEC layouts: query (B, Sq, H, D), key/value (B, Sk, Hk, D).
struct Workload {
  int64_t batch = 1, seqlen_q = 0, seqlen_k = 0, heads = 0, kv_heads = 0, head_dim = 0;
  bool causal = false;
  fsa::DType dtype = fsa::DType::kBFloat16;
  // Trainable-mask style sparsity: a bias (B, Hk, 1, Sk) and, per (batch, kv head, query block of
  // select_block rows), the causally required key blocks (the diagonal) plus the top_k other key
  // blocks of select_block keys by mean bias (fsa::select_blocks), handed to the plan as its
  // block selection. Set either density (top_k is then chosen so that the planned density is
  // closest to it) or top_k.
  double density = 0;  // target fraction of all Sq x Sk entries, in (0, 1]; 0 = not set
  int64_t top_k = -1;  // >= 0: key blocks kept per query block besides the required ones
  int select_block = 128;
  // Key-only mask (B, 1, 1, Sk) keeping every key_mask_every-th block of select_block keys.
  int64_t key_mask_every = 0;
  bool bias = false;  // a (B, Hk, 1, Sk) bias without a selection (implied by a selection)
  std::optional<fsa::DType> bias_dtype;  // default: the query dtype

  bool has_selection() const { return density > 0 || top_k >= 0; }
  bool has_bias() const { return bias || has_selection(); }
};

struct Timing {
  fsa::DeviceType device = fsa::DeviceType::kCUDA;
  int reps = 20;
  int warmup = 5;
  CachePolicy cache = CachePolicy::kRotate;
  int threads = 0;  // CPU backend threads; 0 = the library's default
};

struct Stats {
  double median_ms = 0, min_ms = 0, p90_ms = 0;
};

struct Row {
  std::string kind;  // "plan", "fwd", "bwd" or "fwd+bwd"
  Stats time;
  double flops = 0;        // over kept entries: 4*Sq*Sk*D*H*B*density (x2.5 bwd, x3.5 fwd+bwd)
  double dense_flops = 0;  // the same at the density of the unmasked problem
  double kv_bytes = 0;     // decode (Sq == 1) forward: kept K + V bytes read, else 0
  // CUDA: high-water mark of the stream-ordered pool over the mode's calls (the plan's lists and
  // the library's scratch; inputs and outputs are not pool memory), else -1.
  double pool_peak_bytes = -1;
};

struct Result {
  std::string device_name;   // e.g. "NVIDIA H100 80GB HBM3" or "CPU (2 threads)"
  std::string method;        // one line: clock, warmup/reps, statistic, cache policy, pool
  std::string cache;         // the cache policy in a few words (also in `method`)
  double density = 0;        // plan.kept_density()
  double dense_density = 0;  // 1, or the causal fraction of Sq x Sk
  int64_t top_k = -1;        // the top-k used (a selection), else -1
  std::vector<Row> rows;     // "plan" first, then one per mode in the order asked
};

// A command-line or workload error: the message names the flag and the expected value.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Times make_plan and each mode. Throws UsageError (bad workload), fsa::Error (rejected by the
// library) or std::runtime_error (CUDA failure).
Result run_workload(const Workload& workload, const std::vector<Mode>& modes, const Timing& timing);

// The generic command line: `--shape B,Sq,Sk,H,Hk,D [--causal] ...` (see usage()).
struct Cli {
  Workload workload;
  std::vector<Mode> modes{Mode::kForward};
  Timing timing;
  bool json = false;
  bool has_shape = false;
  std::string name;  // row label prefix; default: describe(workload)
};

// Parses args (argv without the program name) into cli, over its defaults. Throws UsageError.
void parse_cli(const std::vector<std::string>& args, Cli& cli);
std::string usage(const char* program);

// "(B,Sq,Sk,H,Hk,D) causal bf16 top-16/128 bias fp32" and the like.
std::string describe(const Workload& workload);
const char* mode_name(Mode mode);

// Output: a human table or one JSON object per row.
void print_header(const Result& result, const std::string& what);
void print_table_columns(const char* first_column, int width);
void print_row(const std::string& label, const Row& row, const Result& result, int width);
// One line; "name" is `name`, "kind" the row's kind.
void print_json(const std::string& name, const Row& row, const Result& result,
                const Workload& workload, const Timing& timing);

// Runs cli's workload and prints it; returns the process exit status.
int run_cli(const Cli& cli);
// parse_cli over `defaults`, then run_cli; --help prints usage(); errors go to stderr with exit
// status 2 (usage) or 1 (library or CUDA failure).
int cli_main(const char* program, const std::vector<std::string>& args, Cli defaults);

}  // namespace fsa_bench
