#include "cpu/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fsa::detail {
namespace {

int default_threads() {
  if (const char* env = std::getenv("FSA_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

class Pool {
 public:
  static Pool& instance() {
    static Pool pool;
    return pool;
  }

  int size() {
    std::lock_guard<std::mutex> lock(config_mutex_);
    return size_;
  }

  void resize(int n) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    std::lock_guard<std::mutex> lock(config_mutex_);
    stop_workers();
    size_ = n > 0 ? n : default_threads();
  }

  void run(int64_t num_tasks, const std::function<void(int64_t, int)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);  // one parallel region at a time
    int workers;
    {
      std::lock_guard<std::mutex> lock(config_mutex_);
      workers = int(std::min<int64_t>(size_, num_tasks));
      if (workers > 1) start_workers(size_ - 1);
    }
    if (workers <= 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      job_ = &fn;
      num_tasks_ = num_tasks;
      next_.store(0);
      active_ = workers - 1;
      participants_ = workers - 1;
      error_ = nullptr;
      ++generation_;
    }
    job_cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(job_mutex_);
    done_cv_.wait(lock, [&] { return active_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  ~Pool() {
    std::lock_guard<std::mutex> lock(config_mutex_);
    stop_workers();
  }

 private:
  Pool() : size_(default_threads()) {}

  void work(int worker) {
    for (;;) {
      const int64_t t = next_.fetch_add(1);
      if (t >= num_tasks_) return;
      try {
        (*job_)(t, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(job_mutex_);
        if (!error_) error_ = std::current_exception();
        next_.store(num_tasks_);  // stop handing out tasks
      }
    }
  }

  void worker_loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(job_mutex_);
        job_cv_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        if (worker > participants_) continue;  // this region uses fewer workers
      }
      work(worker);
      std::lock_guard<std::mutex> lock(job_mutex_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  void start_workers(int n) {
    if (int(threads_.size()) == n) return;
    stop_workers();
    stopping_ = false;
    for (int w = 1; w <= n; ++w) threads_.emplace_back([this, w] { worker_loop(w); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      stopping_ = true;
    }
    job_cv_.notify_all();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  std::mutex run_mutex_, config_mutex_, job_mutex_;
  std::condition_variable job_cv_, done_cv_;
  std::vector<std::thread> threads_;
  int size_;
  const std::function<void(int64_t, int)>* job_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;        // participating workers still running the current region
  int participants_ = 0;  // workers 1..participants_ take part in the current region
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

}  // namespace

int cpu_threads() { return Pool::instance().size(); }
void set_cpu_threads(int n) { Pool::instance().resize(n); }

void parallel_for(int64_t num_tasks, const std::function<void(int64_t, int)>& fn) {
  if (num_tasks <= 0) return;
  Pool::instance().run(num_tasks, fn);
}

}  // namespace fsa::detail
