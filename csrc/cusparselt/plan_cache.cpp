// Plan cache and per-shape algorithm search for the cuSPARSELt GEMM.
//
// Why: building a cuSPARSELt plan costs tens of microseconds of host time, and the default
// algorithm is often far from the fastest one. So
//   * plans are cached, keyed by everything a plan depends on (device, dtype, N, K, padded M,
//     bias presence, operand layout), in a bounded LRU map guarded by a mutex;
//   * the algorithm (config id and split-K) is searched once per tuning key (device name,
//     dtype, N, K, power-of-two bucket of M, bias presence) by timing every candidate with CUDA
//     events, cold (round-robin over copies of the call's operands beyond 3x L2, see
//     ColdOperands), and remembered in a table that can be exported and
//     imported (save_tuning / load_tuning in Python), so a deployment can ship tuned choices.
// Tuning per M bucket rather than per exact M keeps the number of searches bounded when the
// token count varies from call to call (prefill); plans are still built per exact M.
//
// CUDA-graph capture: the search cannot run inside one. A plan first needed during a capture
// runs cuSPARSELt's default algorithm and is marked provisional; the first call outside a capture
// searches and replaces it (plan_key.h: reuse_cached_plan). Warm each M up before capturing.
//
// Thread safety: one global mutex for the maps (held only for lookups and inserts), one
// mutex per tuning slot (so each key is searched exactly once, while other keys proceed), and
// one mutex per plan (held while its bias pointer may be re-set and the matmul is enqueued).
//
// Environment: SPARSELORA_CSLT_SEARCH=0 (no search: cuSPARSELt's default algorithm),
// SPARSELORA_CSLT_MAX_PLANS (LRU size, default 1024), SPARSELORA_CSLT_SEARCH_BUDGET_MS (per
// key, default 3000), SPARSELORA_CSLT_BIAS_IN_KEY (default 1, see Cache::bias_in_key).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "cslt.h"
#include "plan_key.h"

namespace sparselora::cslt {

struct PlanEntry {
  cusparseLtMatDescriptor_t mat_a, mat_b, mat_c;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg_sel;
  cusparseLtMatmulPlan_t plan;
  bool has_a = false, has_b = false, has_c = false, has_matmul = false, has_alg = false,
       has_plan = false;
  size_t workspace = 0;
  const void* bound_bias = nullptr;
  AlgConfig config;
  bool provisional = false;  // built inside a capture without a tuned config: see reuse_cached_plan
  std::mutex mu;

  PlanEntry() = default;
  PlanEntry(const PlanEntry&) = delete;
  PlanEntry& operator=(const PlanEntry&) = delete;
  ~PlanEntry() {
    // Destructors must not throw: statuses are ignored here on purpose.
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_alg) cusparseLtMatmulAlgSelectionDestroy(&alg_sel);
    if (has_c) cusparseLtMatDescriptorDestroy(&mat_c);
    if (has_b) cusparseLtMatDescriptorDestroy(&mat_b);
    if (has_a) cusparseLtMatDescriptorDestroy(&mat_a);
  }
};

namespace {

// ---------------------------------------------------------------------------------------
// keys

struct TuneKey {
  std::string device_name;
  int dtype;
  int64_t n, k, m_bucket;
  bool bias;
  int layout;
  bool operator==(const TuneKey& o) const {
    return device_name == o.device_name && dtype == o.dtype && n == o.n && k == o.k &&
           m_bucket == o.m_bucket && bias == o.bias && layout == o.layout;
  }
};

struct TuneKeyHash {
  size_t operator()(const TuneKey& k) const {
    size_t h = std::hash<std::string>()(k.device_name);
    for (size_t v : {size_t(k.dtype), size_t(k.n), size_t(k.k), size_t(k.m_bucket), size_t(k.bias),
                     size_t(k.layout)})
      hash_mix(h, v);
    return h;
  }
};

// `mu` serialises the search of one key; `ready` is atomic so the stats and the export can read
// finished slots without waiting behind a search in progress (config is written before ready).
struct TuneSlot {
  std::mutex mu;
  std::atomic<bool> ready{false};
  AlgConfig config;
};

// ---------------------------------------------------------------------------------------
// global state

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : fallback;
}

struct Cache {
  std::mutex mu;
  using Lru = std::list<PlanKey>;
  Lru lru;  // front = most recently used
  std::unordered_map<PlanKey, std::pair<std::shared_ptr<PlanEntry>, Lru::iterator>, PlanKeyHash> plans;
  std::unordered_map<TuneKey, std::shared_ptr<TuneSlot>, TuneKeyHash> tuning;
  size_t max_plans = static_cast<size_t>(std::max(16, env_int("SPARSELORA_CSLT_MAX_PLANS", 1024)));
  std::atomic<bool> search{env_int("SPARSELORA_CSLT_SEARCH", 1) != 0};
  // Bias handling of shared plans. In-key (default): the bias pointer is part of the plan key,
  // so a plan is always run with the pointer it was built with, exactly like an uncached call;
  // costs one plan per biased layer and M. Rebind (SPARSELORA_CSLT_BIAS_IN_KEY=0): one plan per
  // shape, the pointer is re-set on its matmul descriptor before each launch; fewer plans, but it
  // relies on cuSPARSELt reading the descriptor at launch time (tests/test_cusparselt.py checks).
  std::atomic<bool> bias_in_key{env_int("SPARSELORA_CSLT_BIAS_IN_KEY", 1) != 0};
  int search_budget_ms = std::max(100, env_int("SPARSELORA_CSLT_SEARCH_BUDGET_MS", 3000));
  std::atomic<int64_t> hits{0}, misses{0}, searches{0}, rebinds{0};
  // Provisional plans replaced after a capture: a captured graph may still hold launches made
  // with them, so they are kept alive (few: at most one per shape and M captured untuned).
  std::vector<std::shared_ptr<PlanEntry>> retired;
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: plans must outlive static destructors
  return *c;
}

// ---------------------------------------------------------------------------------------
// plan construction

// Like SPARSELORA_CSLT_CHECK, but returns the status instead of throwing: the search probes
// configurations that a given shape may not support.
#define SPARSELORA_CSLT_TRY(call)                      \
  do {                                                 \
    cusparseStatus_t sparselora_st_ = (call);          \
    if (sparselora_st_ != CUSPARSE_STATUS_SUCCESS) {   \
      *failed_call = #call;                            \
      return sparselora_st_;                           \
    }                                                  \
  } while (0)

// Initialises `e` in place (its address must not change afterwards). `cfg == nullptr`: the
// library's default algorithm. Returns the first failing status and names the call.
cusparseStatus_t init_plan(PlanEntry& e, const cusparseLtHandle_t* h, const Problem& p,
                           const void* bias, const AlgConfig* cfg, const char** failed_call) {
  const cudaDataType t = cuda_dtype(p.dtype, "the cuSPARSELt GEMM input");
  SPARSELORA_CSLT_TRY(cusparseLtStructuredDescriptorInit(h, &e.mat_a, p.n, p.k, p.k, kPtrAlign, t,
                                                         CUSPARSE_ORDER_ROW,
                                                         CUSPARSELT_SPARSITY_50_PERCENT));
  e.has_a = true;
  SPARSELORA_CSLT_TRY(
      cusparseLtDenseDescriptorInit(h, &e.mat_b, p.m, p.k, p.k, kPtrAlign, t, CUSPARSE_ORDER_ROW));
  e.has_b = true;
  SPARSELORA_CSLT_TRY(
      cusparseLtDenseDescriptorInit(h, &e.mat_c, p.n, p.m, p.n, kPtrAlign, t, CUSPARSE_ORDER_COL));
  e.has_c = true;
  SPARSELORA_CSLT_TRY(cusparseLtMatmulDescriptorInit(
      h, &e.matmul, CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_TRANSPOSE, &e.mat_a,
      &e.mat_b, &e.mat_c, &e.mat_c, CUSPARSE_COMPUTE_32F));
  e.has_matmul = true;
  if (p.has_bias) {
    // Set before PlanInit so the plan is built with a bias epilogue.
    void* ptr = const_cast<void*>(bias);
    SPARSELORA_CSLT_TRY(cusparseLtMatmulDescSetAttribute(h, &e.matmul, CUSPARSELT_MATMUL_BIAS_POINTER,
                                                         &ptr, sizeof(ptr)));
    e.bound_bias = bias;
  }
  SPARSELORA_CSLT_TRY(
      cusparseLtMatmulAlgSelectionInit(h, &e.alg_sel, &e.matmul, CUSPARSELT_MATMUL_ALG_DEFAULT));
  e.has_alg = true;
  if (cfg != nullptr) {
    int alg = cfg->alg_id;
    SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgSetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                                                        &alg, sizeof(alg)));
    if (cfg->split_k > 0) {
      int sk = cfg->split_k;
      SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgSetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K,
                                                          &sk, sizeof(sk)));
    }
    if (cfg->split_k > 1 && cfg->split_k_mode > 0) {
      auto mode = static_cast<cusparseLtSplitKMode_t>(cfg->split_k_mode);
      SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgSetAttribute(
          h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K_MODE, &mode, sizeof(mode)));
    }
    if (cfg->split_k > 1 && cfg->split_k_buffers > 0) {
      int nb = cfg->split_k_buffers;
      SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgSetAttribute(
          h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, &nb, sizeof(nb)));
    }
  }
  SPARSELORA_CSLT_TRY(cusparseLtMatmulPlanInit(h, &e.plan, &e.matmul, &e.alg_sel));
  e.has_plan = true;
  SPARSELORA_CSLT_TRY(cusparseLtMatmulGetWorkspace(h, &e.plan, &e.workspace));
  // Record what the plan really runs (defaults filled in by cuSPARSELt), for the tuning table.
  SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgGetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                                                      &e.config.alg_id, sizeof(int)));
  SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgGetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K,
                                                      &e.config.split_k, sizeof(int)));
  cusparseLtSplitKMode_t mode;
  SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgGetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K_MODE,
                                                      &mode, sizeof(mode)));
  e.config.split_k_mode = static_cast<int>(mode);
  SPARSELORA_CSLT_TRY(cusparseLtMatmulAlgGetAttribute(h, &e.alg_sel, CUSPARSELT_MATMUL_SPLIT_K_BUFFERS,
                                                      &e.config.split_k_buffers, sizeof(int)));
  return CUSPARSE_STATUS_SUCCESS;
}
#undef SPARSELORA_CSLT_TRY

std::unique_ptr<PlanEntry> make_plan(const cusparseLtHandle_t* h, const Problem& p, const void* bias,
                                     const AlgConfig* cfg, bool allow_fail) {
  auto e = std::make_unique<PlanEntry>();
  const char* failed = "";
  cusparseStatus_t st = init_plan(*e, h, p, bias, cfg, &failed);
  if (st == CUSPARSE_STATUS_SUCCESS) return e;
  if (allow_fail) return nullptr;
  TORCH_CHECK(false, "sparselora: cuSPARSELt call `", failed, "` failed: ", cusparseLtGetErrorName(st),
              " (", cusparseLtGetErrorString(st), ") for a ", dtype_name(p.dtype), " GEMM with weight [",
              p.n, ", ", p.k, "], ", p.m, " input rows (padded), bias=", p.has_bias,
              (cfg ? ", tuned config alg " + std::to_string(cfg->alg_id) + " split-K " +
                         std::to_string(cfg->split_k)
                   : std::string(", default config")));
  return nullptr;  // unreachable: TORCH_CHECK(false, ...) throws
}

cusparseStatus_t launch(const cusparseLtHandle_t* h, PlanEntry& e, const Operands& ops, void* workspace,
                        cudaStream_t stream) {
  const float alpha = 1.0f, beta = 0.0f;  // compute type 32F: host float scalars
  return cusparseLtMatmul(h, &e.plan, &alpha, ops.a, ops.b, &beta, ops.d, ops.d, workspace, &stream, 1);
}

// ---------------------------------------------------------------------------------------
// algorithm search

struct EventPair {
  cudaEvent_t start = nullptr, stop = nullptr;
  EventPair() {
    SPARSELORA_CUDA_CHECK(cudaEventCreate(&start));
    SPARSELORA_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~EventPair() {
    if (start) cudaEventDestroy(start);
    if (stop) cudaEventDestroy(stop);
  }
};

// Operand sets for the search: the call's own, plus copies of its weight and input until they
// add up to 3x the L2 size. Candidates are timed round-robin over them, so each launch reads its
// weight and input from HBM as it would inside a model; timing one operand set repeated runs
// from a warm L2 and favours the wrong algorithms at small M.
struct ColdOperands {
  std::vector<Operands> sets;
  c10::DataPtr buffer;  // holds the copies until the search ends
};

ColdOperands cold_operands(const Problem& p, const Operands& ops, cudaStream_t stream) {
  ColdOperands c;
  c.sets.push_back(ops);
  int l2 = 0;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, p.device) != cudaSuccess || l2 <= 0) {
    cudaGetLastError();  // clear: without the L2 size the search stays warm, which is only slower to trust
    return c;
  }
  auto round_up = [](int64_t v) { return (v + 255) / 256 * 256; };
  const int64_t a_bytes = round_up(compressed_size(p.device, p.dtype, p.n, p.k));
  const int64_t b_bytes = round_up(p.m * p.k * static_cast<int64_t>(c10::elementSize(p.dtype)));
  const int64_t per_set = a_bytes + b_bytes;
  int64_t extra = (3 * static_cast<int64_t>(l2) + per_set - 1) / per_set - 1;  // copies beyond the call's own
  extra = std::min<int64_t>({extra, 63, (int64_t{1} << 30) / per_set});     // at most 64 sets and 1 GiB
  if (extra <= 0) return c;
  try {
    c.buffer = c10::cuda::CUDACachingAllocator::get()->allocate(extra * per_set);
  } catch (const c10::Error&) {
    return c;  // out of memory: time warm rather than fail the call
  }
  auto* base = static_cast<char*>(c.buffer.get());
  for (int64_t i = 0; i < extra; ++i) {
    Operands o = ops;
    char* a = base + i * per_set;
    char* b = a + a_bytes;
    SPARSELORA_CUDA_CHECK(cudaMemcpyAsync(a, ops.a, compressed_size(p.device, p.dtype, p.n, p.k),
                                          cudaMemcpyDeviceToDevice, stream));
    SPARSELORA_CUDA_CHECK(cudaMemcpyAsync(b, ops.b, p.m * p.k * c10::elementSize(p.dtype),
                                          cudaMemcpyDeviceToDevice, stream));
    o.a = a;
    o.b = b;
    c.sets.push_back(o);
  }
  return c;
}

// Average time in ns of `iters` launches round-robin over the operand sets, or -1 if the
// configuration cannot run.
int64_t time_plan(const cusparseLtHandle_t* h, PlanEntry& e, const std::vector<Operands>& sets, cudaStream_t stream,
                  EventPair& ev, int iters) {
  auto ws = c10::cuda::CUDACachingAllocator::get()->allocate(e.workspace);
  if (launch(h, e, sets[0], ws.get(), stream) != CUSPARSE_STATUS_SUCCESS) return -1;  // warm-up
  SPARSELORA_CUDA_CHECK(cudaEventRecord(ev.start, stream));
  for (int i = 0; i < iters; ++i)
    if (launch(h, e, sets[(i + 1) % sets.size()], ws.get(), stream) != CUSPARSE_STATUS_SUCCESS) return -1;
  SPARSELORA_CUDA_CHECK(cudaEventRecord(ev.stop, stream));
  SPARSELORA_CUDA_CHECK(cudaEventSynchronize(ev.stop));
  float ms = 0.f;
  SPARSELORA_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.start, ev.stop));
  return static_cast<int64_t>(1e6 * ms / iters);
}

// Times cuSPARSELt's default plan and every (config id, split-K) it accepts, cold (see
// ColdOperands); returns the fastest. The default is a candidate, so the search never picks
// something slower than what an untuned call would run (up to timing noise).
AlgConfig search(const cusparseLtHandle_t* h, const Problem& p, const Operands& ops, cudaStream_t stream) {
  EventPair ev;
  const ColdOperands cold = cold_operands(p, ops, stream);
  auto base = make_plan(h, p, ops.bias, nullptr, /*allow_fail=*/false);
  int max_id = 0;
  SPARSELORA_CSLT_CHECK(cusparseLtMatmulAlgGetAttribute(h, &base->alg_sel, CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID,
                                                        &max_id, sizeof(max_id)));
  // Size the repetitions from the default plan: ~2 ms of timed work per candidate, 3..20 runs,
  // and at least one round over the operand sets.
  int64_t t0 = time_plan(h, *base, cold.sets, stream, ev, 3);
  TORCH_CHECK(t0 >= 0, "sparselora: cuSPARSELt default plan failed to run for weight [", p.n, ", ", p.k,
              "], ", p.m, " rows");
  const int iters = std::max(static_cast<int>(std::clamp<int64_t>(2000000 / std::max<int64_t>(t0, 1), 3, 20)),
                             static_cast<int>(cold.sets.size()));
  AlgConfig best = base->config;
  best.time_ns = time_plan(h, *base, cold.sets, stream, ev, iters);

  // Split-K trades a reduction pass for parallelism: worth trying when M gives few tiles.
  std::vector<int> split_ks = {1, 2};
  if (p.m < 2048) split_ks.push_back(4);
  if (p.m <= 256) split_ks.push_back(8);
  // A time budget keeps a pathological shape from stalling its first call for long; the
  // candidates not reached are reported by the warning below.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(cache().search_budget_ms);
  int skipped = 0;
  for (int alg = 0; alg <= max_id; ++alg) {
    for (int sk : split_ks) {
      if (std::chrono::steady_clock::now() > deadline) {
        ++skipped;
        continue;
      }
      if (sk > 1 && p.k / sk < 128) continue;  // too little K per split to be worth a launch
      AlgConfig cfg;
      cfg.alg_id = alg;
      cfg.split_k = sk;
      auto e = make_plan(h, p, ops.bias, &cfg, /*allow_fail=*/true);
      if (!e) continue;
      int64_t t = time_plan(h, *e, cold.sets, stream, ev, iters);
      if (t >= 0 && t < best.time_ns) {
        best = e->config;
        best.time_ns = t;
      }
    }
  }
  if (skipped)
    TORCH_WARN("sparselora: cuSPARSELt search for weight [", p.n, ", ", p.k, "], ", p.m, " rows hit its ",
               cache().search_budget_ms, " ms budget; ", skipped,
               " candidates not timed (raise SPARSELORA_CSLT_SEARCH_BUDGET_MS)");
  // A configuration that failed may leave a sticky launch error behind; surface it here.
  SPARSELORA_CUDA_CHECK(cudaGetLastError());
  return best;
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  SPARSELORA_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// The algorithm for `p`: from the table, else searched once (other threads asking for the same
// key wait for it), else cuSPARSELt's default (search disabled, or the stream is being
// captured into a CUDA graph, where timing is impossible: that choice is not recorded).
std::optional<AlgConfig> choose_config(const cusparseLtHandle_t* h, const Problem& p, const Operands& ops,
                                       cudaStream_t stream) {
  Cache& c = cache();
  TuneKey key{device_name(p.device), static_cast<int>(p.dtype), p.n, p.k, m_bucket(p.m), p.has_bias, p.layout};
  std::shared_ptr<TuneSlot> slot;
  {
    std::lock_guard<std::mutex> g(c.mu);
    auto& s = c.tuning[key];
    if (!s) s = std::make_shared<TuneSlot>();
    slot = s;
  }
  std::lock_guard<std::mutex> g(slot->mu);
  if (slot->ready.load(std::memory_order_acquire)) return slot->config;
  if (!c.search.load() || capturing(stream)) return std::nullopt;
  slot->config = search(h, p, ops, stream);
  slot->ready.store(true, std::memory_order_release);
  c.searches.fetch_add(1);
  return slot->config;
}

std::shared_ptr<PlanEntry> get_plan(const cusparseLtHandle_t* h, const Problem& p, const Operands& ops,
                                    cudaStream_t stream) {
  Cache& c = cache();
  const bool cap = capturing(stream);
  const PlanKey key = make_plan_key(p.device, static_cast<int>(p.dtype), p.n, p.k, p.m, ops.bias,
                                    ops.bias_temporary, c.bias_in_key.load(), p.layout);
  {
    std::lock_guard<std::mutex> g(c.mu);
    auto it = c.plans.find(key);
    if (it != c.plans.end()) {
      if (reuse_cached_plan(it->second.first->provisional, cap)) {
        c.lru.splice(c.lru.begin(), c.lru, it->second.second);
        c.hits.fetch_add(1);
        return it->second.first;
      }
      // a capture-time default, now outside a capture: search and build the real one
      c.retired.push_back(it->second.first);
      c.lru.erase(it->second.second);
      c.plans.erase(it);
    }
  }
  // Miss: tune (maybe) and build outside the map lock, so other shapes keep running.
  std::optional<AlgConfig> cfg = choose_config(h, p, ops, stream);
  std::unique_ptr<PlanEntry> built;
  if (cfg) {
    built = make_plan(h, p, ops.bias, &*cfg, /*allow_fail=*/true);
    if (!built)
      TORCH_WARN("sparselora: tuned cuSPARSELt config (alg ", cfg->alg_id, ", split-K ", cfg->split_k,
                 ") is not accepted for weight [", p.n, ", ", p.k, "], ", p.m,
                 " rows; using the default algorithm");
  }
  if (!built) built = make_plan(h, p, ops.bias, nullptr, /*allow_fail=*/false);
  if (cfg) built->config.time_ns = cfg->time_ns;
  built->provisional = !cfg && cap && c.search.load();
  std::shared_ptr<PlanEntry> entry(std::move(built));

  std::lock_guard<std::mutex> g(c.mu);
  auto it = c.plans.find(key);
  if (it != c.plans.end()) {
    if (reuse_cached_plan(it->second.first->provisional, cap)) {
      // another thread built the same plan meanwhile: use theirs
      c.hits.fetch_add(1);
      return it->second.first;
    }
    c.retired.push_back(it->second.first);  // theirs is a capture-time default: ours replaces it
    c.lru.erase(it->second.second);
    c.plans.erase(it);
  }
  c.lru.push_front(key);
  c.plans.emplace(key, std::make_pair(entry, c.lru.begin()));
  c.misses.fetch_add(1);
  while (c.plans.size() > c.max_plans) {  // evicted entries die when their last user returns
    c.plans.erase(c.lru.back());
    c.lru.pop_back();
  }
  return entry;
}

}  // namespace

int64_t m_bucket(int64_t m) {
  int64_t b = kMAlign;
  while (b < m) b <<= 1;
  return b;
}

void run_matmul(const Problem& p, const Operands& ops, cudaStream_t stream) {
  const cusparseLtHandle_t* h = handle_for(p.device);
  std::shared_ptr<PlanEntry> e = get_plan(h, p, ops, stream);
  auto ws = c10::cuda::CUDACachingAllocator::get()->allocate(e->workspace);
  std::lock_guard<std::mutex> g(e->mu);
  if (p.has_bias && e->bound_bias != ops.bias) {
    // Same shape, another layer's bias: the plan reads the bias pointer from its matmul
    // descriptor, which lives at a stable address inside the entry. Under the entry lock, so a
    // concurrent caller cannot swap it between this set and the launch below.
    void* ptr = const_cast<void*>(ops.bias);
    SPARSELORA_CSLT_CHECK(
        cusparseLtMatmulDescSetAttribute(h, &e->matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &ptr, sizeof(ptr)));
    e->bound_bias = ops.bias;
    cache().rebinds.fetch_add(1);
  }
  SPARSELORA_CSLT_CHECK(launch(h, *e, ops, ws.get(), stream));
}

int64_t compressed_size(int device, c10::ScalarType dtype, int64_t n, int64_t k) {
  // Memoised: linear() checks every compressed weight against it before touching the plan cache.
  static std::mutex mu;
  static std::unordered_map<PlanKey, int64_t, PlanKeyHash> sizes;
  const PlanKey key{device, static_cast<int>(dtype), n, k, 0, false, 0, 0};
  {
    std::lock_guard<std::mutex> g(mu);
    auto it = sizes.find(key);
    if (it != sizes.end()) return it->second;
  }
  const cusparseLtHandle_t* h = handle_for(device);
  cusparseLtMatDescriptor_t a;
  SPARSELORA_CSLT_CHECK(cusparseLtStructuredDescriptorInit(h, &a, n, k, k, kPtrAlign,
                                                           cuda_dtype(dtype, "the weight"), CUSPARSE_ORDER_ROW,
                                                           CUSPARSELT_SPARSITY_50_PERCENT));
  size_t size = 0, buffer = 0;
  cusparseStatus_t st = cusparseLtSpMMACompressedSize2(h, &a, &size, &buffer);
  cusparseLtMatDescriptorDestroy(&a);
  SPARSELORA_CSLT_CHECK(st);
  std::lock_guard<std::mutex> g(mu);
  sizes[key] = static_cast<int64_t>(size);
  return static_cast<int64_t>(size);
}

void set_search_enabled(bool on) { cache().search.store(on); }
bool search_enabled() { return cache().search.load(); }

void set_bias_in_key(bool on) {
  cache().bias_in_key.store(on);
  clear_caches(/*plans=*/true, /*tuning=*/false);
}

void clear_caches(bool plans, bool tuning) {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  if (plans) {
    c.plans.clear();
    c.lru.clear();
  }
  if (tuning) c.tuning.clear();
}

std::vector<int64_t> cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  int64_t tuned = 0;
  for (auto& kv : c.tuning) tuned += kv.second->ready.load(std::memory_order_acquire);
  return {static_cast<int64_t>(c.plans.size()), c.hits.load(), c.misses.load(), c.searches.load(), tuned,
          c.rebinds.load()};
}

std::tuple<std::vector<std::string>, std::vector<int64_t>> export_tuning() {
  Cache& c = cache();
  std::vector<std::string> strings;
  std::vector<int64_t> records;
  std::lock_guard<std::mutex> g(c.mu);
  for (auto& kv : c.tuning) {
    if (!kv.second->ready.load(std::memory_order_acquire)) continue;
    const TuneKey& k = kv.first;
    const AlgConfig& a = kv.second->config;
    strings.push_back(k.device_name);
    strings.push_back(dtype_name(static_cast<c10::ScalarType>(k.dtype)));
    for (int64_t v : {k.n, k.k, k.m_bucket, int64_t(k.bias), int64_t(a.alg_id), int64_t(a.split_k),
                      int64_t(a.split_k_mode), int64_t(a.split_k_buffers), a.time_ns})
      records.push_back(v);
  }
  return {strings, records};
}

int64_t import_tuning(const std::vector<std::string>& strings, const std::vector<int64_t>& records) {
  TORCH_CHECK(strings.size() % 2 == 0 && records.size() == strings.size() / 2 * kTuneRecord,
              "sparselora: tuning import needs 2 strings and ", kTuneRecord, " ints per entry, got ",
              strings.size(), " strings and ", records.size(), " ints");
  Cache& c = cache();
  std::lock_guard<std::mutex> g(c.mu);
  int64_t n = 0;
  for (size_t i = 0; i < strings.size() / 2; ++i) {
    const std::string& dt = strings[2 * i + 1];
    TORCH_CHECK(dt == "float16" || dt == "bfloat16", "sparselora: tuning entry ", i, " has dtype '", dt,
                "' (expected float16 or bfloat16)");
    const int64_t* r = &records[i * kTuneRecord];
    TORCH_CHECK(r[0] > 0 && r[1] > 0 && r[2] > 0 && r[4] >= 0 && r[5] >= 0, "sparselora: tuning entry ", i,
                " has invalid fields");
    TuneKey key{strings[2 * i], static_cast<int>(dt == "float16" ? c10::ScalarType::Half : c10::ScalarType::BFloat16),
                r[0], r[1], r[2], r[3] != 0, 0};
    auto slot = std::make_shared<TuneSlot>();
    slot->config.alg_id = static_cast<int>(r[4]);
    slot->config.split_k = static_cast<int>(r[5]);
    slot->config.split_k_mode = static_cast<int>(r[6]);
    slot->config.split_k_buffers = static_cast<int>(r[7]);
    slot->config.time_ns = r[8];
    slot->ready.store(true, std::memory_order_release);
    c.tuning[key] = slot;
    ++n;
  }
  // Plans built from the previous choices must not outlive them.
  c.plans.clear();
  c.lru.clear();
  return n;
}

}  // namespace sparselora::cslt
