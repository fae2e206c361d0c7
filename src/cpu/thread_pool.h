#pragma once
// A small persistent worker pool for the CPU backend. Tasks write disjoint outputs, so results do
// not depend on which worker runs which task: the CPU backend is deterministic by construction.

#include <cstdint>
#include <functional>

namespace fsa::detail {

// Number of workers used by parallel_for (including the calling thread).
int cpu_threads();
// 0 restores the default: FSA_NUM_THREADS if set, else std::thread::hardware_concurrency().
void set_cpu_threads(int n);

// Calls fn(task, worker) for every task in [0, num_tasks); worker is in [0, cpu_threads()) and
// identifies per-worker scratch. Returns when all tasks are done; rethrows the first exception.
void parallel_for(int64_t num_tasks, const std::function<void(int64_t task, int worker)>& fn);

}  // namespace fsa::detail
