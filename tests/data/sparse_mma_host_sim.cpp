// CPU simulation of the mma.sp linear kernel, for tests/test_sparse_mma_host_sim.py: the real kernel
// source (csrc/sparse_mma/linear_kernel.cuh) and launcher (launch.cu, generated dispatch.inc and
// instantiations) compiled by the host compiler, one std::thread per CUDA thread of a CTA, with the
// few CUDA primitives it uses implemented here from the PTX ISA's description:
//   cp.async      : copies queued per thread, performed at cp.async.wait_group (so reading a stage
//                   before its wait sees stale shared memory, as on the GPU);
//   ldmatrix.x4   : lane l gets 32 bits at (address of lane 8q + l/4) + 4 (l % 4) for matrix q;
//   mma.sp m16n8k32 ordered_metadata: A rebuilt from the lanes' kept values and the metadata of the
//                   lanes the selector names, undefined/unordered nibbles abort, fp32 accumulate;
//   __syncwarp / __syncthreads(_or): barriers. Shared memory is filled with 0xFF (NaN) before each CTA.
//   every cp.async source (also of a zero-filling copy) must lie inside x, values or meta.
//   split-K across CTAs: CTAs run one after another, in grid order or in a seeded random order (so
//                   any split can arrive last); the workspace's partials start NaN-filled, its
//                   counters zeroed once, and after each launch every counter must be 0 again.
// Never part of the extension. Usage: sim <in.bin> <out.bin>  (format: see the test). With runs > 1
// the launch is repeated on the same workspace in other CTA orders; every run's y must have the
// same bits as the first.
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <deque>
#include <random>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;

namespace simrt {
constexpr int kMaxThreads = 256;
struct WarpExchange {
  const void* addr[32];
  uint32_t a[32][4], b[32][4], e[32];
  float c[32][4], d[32][4];
  uint32_t s[32];
};
std::barrier<>* cta_barrier = nullptr;
std::barrier<>* warp_barrier[kMaxThreads / 32];
WarpExchange exchange[kMaxThreads / 32];
std::atomic<int> cta_or{0};     // __syncthreads_or's vote
int smem_per_sm = 0;            // the simulated device (occupancy of a config)
unsigned cta_order_seed = 0;    // 0: grid order (x fastest, then y, then z); else a seeded shuffle
struct Range { const char* begin; const char* end; };
std::vector<Range> inputs;      // x, values, meta: every cp.async source must lie inside one (memcheck's job on a GPU)
struct Copy { void* dst; const void* src; bool valid; };
thread_local std::deque<std::vector<Copy>> groups;
thread_local std::vector<Copy> open_group;
inline int lane() { return threadIdx.x % 32; }
inline int warp() { return threadIdx.x / 32; }
[[noreturn]] void die(const char* what) { std::fprintf(stderr, "host sim: %s\n", what); std::exit(3); }
}  // namespace simrt

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
inline int min(int a, int b) { return a < b ? a : b; }
void __syncwarp(unsigned = 0xffffffffu) { simrt::warp_barrier[simrt::warp()]->arrive_and_wait(); }
void __syncthreads() { simrt::cta_barrier->arrive_and_wait(); }

#include "sparse_mma/launch.h"
#include "sparse_mma/params.h"

namespace sparselora {
namespace sparse_mma {
alignas(16) uint4 smem[1 << 15];  // 512 KB: the kernel's `extern __shared__ uint4 smem[]`

void cp_async16(void* dst, const void* src, bool valid) {
  // a zero-filling copy reads nothing, but the kernels keep its pointer valid too: checked alike
  const char* s = static_cast<const char*>(src);
  bool inside = false;
  for (const auto& r : simrt::inputs) inside |= s >= r.begin && s + 16 <= r.end;
  if (!inside) simrt::die(valid ? "cp.async reads outside x, values and meta" : "a zero-filling cp.async points outside x, values and meta");
  simrt::open_group.push_back({dst, src, valid});
}
// shared-window addresses: byte offsets into the simulated shared memory
uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(static_cast<const char*>(p) - reinterpret_cast<const char*>(smem)); }
void cp_async16(uint32_t dst, const void* src, bool valid) { cp_async16(reinterpret_cast<char*>(smem) + dst, src, valid); }
void cp_async_commit() { simrt::groups.push_back(simrt::open_group); simrt::open_group.clear(); }
template <int N>
void cp_async_wait() {
  while (static_cast<int>(simrt::groups.size()) > N) {
    for (const auto& c : simrt::groups.front()) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
    simrt::groups.pop_front();
  }
}
void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  auto& x = simrt::exchange[simrt::warp()];
  const int l = simrt::lane();
  x.addr[l] = p;
  __syncwarp();
  for (int q = 0; q < 4; ++q) std::memcpy(&r[q], static_cast<const char*>(x.addr[8 * q + l / 4]) + 4 * (l % 4), 4);
  __syncwarp();
}

uint32_t shfl_idx(uint32_t v, int src_lane) {
  auto& x = simrt::exchange[simrt::warp()];
  x.s[simrt::lane()] = v;
  __syncwarp();
  const uint32_t r = x.s[src_lane & 31];
  __syncwarp();
  return r;
}
uint32_t shfl_xor(uint32_t v, int mask) { return shfl_idx(v, simrt::lane() ^ mask); }
float nan_f32() { return __builtin_nanf(""); }
void st_cg(float4* p, const float4& v) { *p = v; }
float4 ld_cg(const float4* p) { return *p; }
void fence_gpu() { std::atomic_thread_fence(std::memory_order_seq_cst); }
int arrive(int* counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_SEQ_CST); }
bool syncthreads_or(bool v) {
  if (v) simrt::cta_or = 1;
  __syncthreads();
  const bool any = simrt::cta_or != 0;
  __syncthreads();
  if (threadIdx.x == 0) simrt::cta_or = 0;
  __syncthreads();
  return any;
}

template <typename T>
float half_of(uint32_t reg, int h) {
  uint16_t bits = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xFFFF);
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}

template <typename T, int SEL>
void mma_sp_m16n8k32(float (&d)[4], const uint4& a, const uint32_t (&b)[4], uint32_t e) {
  auto& x = simrt::exchange[simrt::warp()];
  const int l = simrt::lane();
  x.a[l][0] = a.x; x.a[l][1] = a.y; x.a[l][2] = a.z; x.a[l][3] = a.w;
  for (int i = 0; i < 4; ++i) { x.b[l][i] = b[i]; x.c[l][i] = d[i]; }
  x.e[l] = e;
  __syncwarp();
  if (l == 0) {
    float comp[16][16], A[16][32] = {}, B[32][8], D[16][8];
    bool kept[16][32] = {};  // mma.sp reads B only at the kept columns (x at pruned ones is never used)
    for (int ln = 0; ln < 32; ++ln) {
      const int g = ln >> 2, t = ln & 3;
      for (int i = 0; i < 8; ++i) {
        // PTX: A row g (+8 for a2,a3,a6,a7), kept col 2t + (i & 1) (+8 for i >= 4)
        comp[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = half_of<T>(x.a[ln][i >> 1], i & 1);
        // PTX: B row (k) 2t + (i & 1) + 8 (i >> 1), col (token) g
        B[2 * t + (i & 1) + 8 * (i >> 1)][g] = half_of<T>(x.b[ln][i >> 1], i & 1);
      }
      for (int i = 0; i < 4; ++i) D[g + 8 * (i >> 1)][2 * t + (i & 1)] = x.c[ln][i];
    }
    for (int r = 0; r < 16; ++r) {
      for (int q = 0; q < 8; ++q) {
        // metadata of row r, group q: lane 4 (r % 8) + 2 SEL + q / 4, bits 16 (r / 8) + 4 (q % 4)
        const int src = 4 * (r % 8) + 2 * SEL + q / 4;
        const int nib = (x.e[src] >> (16 * (r / 8) + 4 * (q % 4))) & 0xF;
        const int i0 = nib & 3, i1 = nib >> 2;
        if (i0 >= i1) {
          char msg[160];
          std::snprintf(msg, sizeof(msg), "metadata nibble %#x (row %d, group %d, from lane %d, selector %d) is undefined or unordered",
                        nib, r, q, src, SEL);
          simrt::die(msg);
        }
        A[r][4 * q + i0] = comp[r][2 * q];
        A[r][4 * q + i1] = comp[r][2 * q + 1];
        kept[r][4 * q + i0] = kept[r][4 * q + i1] = true;
      }
    }
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 8; ++n) {
        float acc = D[r][n];
        for (int k = 0; k < 32; ++k)
          if (kept[r][k]) acc += A[r][k] * B[k][n];
        D[r][n] = acc;
      }
    for (int ln = 0; ln < 32; ++ln)
      for (int i = 0; i < 4; ++i) x.d[ln][i] = D[(ln >> 2) + 8 * (i >> 1)][2 * (ln & 3) + (i & 1)];
  }
  __syncwarp();
  for (int i = 0; i < 4; ++i) d[i] = x.d[l][i];
  __syncwarp();
}

}  // namespace sparse_mma
}  // namespace sparselora

#include "sparse_mma/linear_kernel.cuh"
#include "sparse_mma/prefill_kernel.cuh"

namespace sparselora {
namespace sparse_mma {
// The CPU launch: the same grid and split choice as launch_template.cuh (occupancy from shared
// memory: the device's bytes per SM over the config's + 1 KB reserved per CTA, as
// sparselora.mma_sp_configs.ctas_per_sm), CTAs one after another, a thread per CUDA thread.
template <typename T, int MT, int NT, int WK, int S>
cudaError_t launch_linear_cfg(LinearParams p, int sm_count, cudaStream_t, int* splits) {
  using C = TileConfig<MT, NT, WK, S>;
  static_assert(C::kThreads <= simrt::kMaxThreads, "too many threads for the simulation");
  if (C::kSmemBytes > static_cast<int>(sizeof(smem))) simrt::die("shared memory larger than the simulation's");
  const int gx = (p.Mt + MT - 1) / MT, gy = (p.M + NT * kTileN - 1) / (NT * kTileN);
  if (*splits < 0) {
    const int ctas_per_sm = std::max(1, simrt::smem_per_sm / (C::kSmemBytes + 1024));
    *splits = p.partials ? choose_splits(static_cast<long long>(gx) * gy, p.KQ, WK,
                                         static_cast<long long>(sm_count) * ctas_per_sm, MT, NT)
                         : 1;
  }
  p.splits = *splits;
  std::vector<uint3> ctas;
  for (int bz = 0; bz < p.splits; ++bz)
    for (int by = 0; by < gy; ++by)
      for (int bx = 0; bx < gx; ++bx) ctas.push_back({static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(bz)});
  if (simrt::cta_order_seed) std::shuffle(ctas.begin(), ctas.end(), std::mt19937(simrt::cta_order_seed));
  for (const uint3 b : ctas) {
    std::memset(smem, 0xFF, C::kSmemBytes);
    std::barrier<> cta(C::kThreads);
    std::vector<std::barrier<>*> wb;
    for (int w = 0; w < WK; ++w) wb.push_back(new std::barrier<>(32));
    simrt::cta_barrier = &cta;
    for (int w = 0; w < WK; ++w) simrt::warp_barrier[w] = wb[w];
    std::vector<std::thread> threads;
    for (int t = 0; t < C::kThreads; ++t)
      threads.emplace_back([&, t] {
        threadIdx = {static_cast<unsigned>(t), 0, 0};
        blockIdx = b;
        mma_sp_linear_kernel<T, MT, NT, WK, S>(p);
        if (!simrt::groups.empty() || !simrt::open_group.empty()) simrt::die("cp.async groups left at kernel exit");
      });
    for (auto& th : threads) th.join();
    for (auto* w : wb) delete w;
  }
  return cudaSuccess;
}

// One CTA of a kernel on the CPU: a thread per CUDA thread, fresh barriers, NaN-filled shared memory.
template <typename F>
void run_cta(int threads, int warps, int smem_bytes, int bx, int by, F kernel) {
  if (smem_bytes > static_cast<int>(sizeof(smem))) simrt::die("shared memory larger than the simulation's");
  std::memset(smem, 0xFF, smem_bytes);
  std::barrier<> cta(threads);
  std::vector<std::barrier<>*> wb;
  for (int w = 0; w < warps; ++w) wb.push_back(new std::barrier<>(32));
  simrt::cta_barrier = &cta;
  for (int w = 0; w < warps; ++w) simrt::warp_barrier[w] = wb[w];
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      blockIdx = {static_cast<unsigned>(bx), static_cast<unsigned>(by), 0};
      kernel();
      if (!simrt::groups.empty() || !simrt::open_group.empty()) simrt::die("cp.async groups left at kernel exit");
    });
  for (auto& th : ts) th.join();
  for (auto* b : wb) delete b;
}

// The prefill kernel's CPU launch: the same grid as prefill_launch_template.cuh.
template <typename T, int WM, int WN, int WMT, int WNT, int S>
cudaError_t launch_prefill_cfg(const LinearParams& p, cudaStream_t) {
  using C = PrefillTile<WM, WN, WMT, WNT, S>;
  static_assert(C::kThreads <= simrt::kMaxThreads, "too many threads for the simulation");
  const int gx = (p.Mt + C::kRowTiles - 1) / C::kRowTiles, gy = (p.M + C::kTokens - 1) / C::kTokens;
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx)
      run_cta(C::kThreads, WM * WN, C::kSmemBytes, bx, by, [&] { mma_sp_prefill_kernel<T, WM, WN, WMT, WNT, S>(p); });
  return cudaSuccess;
}
}  // namespace sparse_mma
}  // namespace sparselora

#include "sparse_mma/launch.cu"
#include "sim_instances.inc"  // written by the test: every csrc/sparse_mma/instantiations/*.cu

int main(int argc, char** argv) {
  using namespace sparselora::sparse_mma;
  if (argc != 3) simrt::die("usage: sim <in.bin> <out.bin>");
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) simrt::die("cannot open input");
  int64_t hdr[16];  // M N K Mt KT KQ has_bias dtype config ldx sm_major sm_minor splits sm_count smem_per_sm runs
  if (std::fread(hdr, sizeof(hdr), 1, f) != 1) simrt::die("short header");
  const int M = hdr[0], N = hdr[1], K = hdr[2], Mt = hdr[3], KT = hdr[4], KQ = hdr[5];
  auto read = [&](size_t bytes) {
    std::vector<uint4> v((bytes + 15) / 16 + 1);
    if (bytes && std::fread(v.data(), bytes, 1, f) != 1) simrt::die("short input");
    return v;
  };
  std::vector<uint4> x = read(static_cast<size_t>(M) * hdr[9] * 2), values = read(static_cast<size_t>(Mt) * KT * 512),
                     meta = read(static_cast<size_t>(Mt) * KQ * 512), bias = read(hdr[6] ? N * 2 : 0);
  std::fclose(f);
  auto range = [](const std::vector<uint4>& v, size_t bytes) {
    const char* b = reinterpret_cast<const char*>(v.data());
    return simrt::Range{b, b + bytes};
  };
  simrt::inputs = {range(x, static_cast<size_t>(M) * hdr[9] * 2), range(values, static_cast<size_t>(Mt) * KT * 512),
                   range(meta, static_cast<size_t>(Mt) * KQ * 512)};
  simrt::smem_per_sm = static_cast<int>(hdr[14]);
  // the device's split-K workspace (ops.cpp): partials NaN-filled (an unwritten partial shows), counters zeroed once
  std::vector<uint4> ws(kWorkspaceBytes / 16);
  std::memset(ws.data(), 0xFF, kWorkspacePartialBytes);
  std::memset(reinterpret_cast<char*>(ws.data()) + kWorkspacePartialBytes, 0, 4 * kWorkspaceCounters);
  const int* counters = reinterpret_cast<const int*>(reinterpret_cast<char*>(ws.data()) + kWorkspacePartialBytes);
  std::vector<uint16_t> y(static_cast<size_t>(M) * N), first;
  int used = -1, used_splits = -1;
  for (int run = 0; run < std::max<int64_t>(1, hdr[15]); ++run) {
    std::fill(y.begin(), y.end(), 0x7E00);  // NaN-poisoned output
    simrt::cta_order_seed = static_cast<unsigned>(run);
    LinearParams p{};
    p.x = x.data(); p.values = values.data(); p.meta = meta.data(); p.bias = hdr[6] ? bias.data() : nullptr;
    p.y = y.data(); p.ldx = hdr[9]; p.ldy = N; p.M = M; p.N = N; p.K = K; p.Mt = Mt; p.KT = KT; p.KQ = KQ;
    p.partials = reinterpret_cast<float4*>(ws.data());
    p.counters = const_cast<int*>(counters);
    char err[512] = {0};
    const int rc = launch_linear(p, hdr[7] ? DType::kBF16 : DType::kF16, static_cast<int>(hdr[8]), static_cast<int>(hdr[12]),
                                 static_cast<int>(hdr[10]), static_cast<int>(hdr[11]), 232448, static_cast<int>(hdr[13]),
                                 nullptr, err, sizeof(err), &used, &used_splits);
    if (rc) { std::printf("LAUNCH-ERROR %s\n", err); return 4; }
    for (int i = 0; i < kWorkspaceCounters; ++i)
      if (counters[i]) {
        std::fprintf(stderr, "host sim: split-K counter %d is %d after the launch (run %d), not 0\n", i, counters[i], run);
        return 5;
      }
    if (run == 0) first = y;
    else if (y != first) {
      const size_t i = std::mismatch(y.begin(), y.end(), first.begin()).first - y.begin();
      std::fprintf(stderr, "host sim: CTA order %d gives other bits than grid order at y[%zu][%zu] (%#x vs %#x)\n", run,
                   i / N, i % N, y[i], first[i]);
      return 6;
    }
  }
  FILE* o = std::fopen(argv[2], "wb");
  std::fwrite(y.data(), 2, y.size(), o);
  std::fclose(o);
  std::printf("OK config %d splits %d\n", used, used_splits);
  return 0;
}
