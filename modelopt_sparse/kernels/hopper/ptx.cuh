// Inline-PTX helpers of the Hopper (sm_90a) forward: mbarriers, cp.async, proxy fences,
// named barriers, register reallocation, wgmma fences and shared-memory descriptors.
// Written for this package; the descriptor and swizzle conventions are the ones the stage-1
// microbenchmark (benchmarks/hopper_wgmma) verified on an H200.
#pragma once
#include <cstdint>

// Set by a wait that timed out: (barrier id << 16 | parity << 15 | block's linear index % 32768) + 1.
// Read by the host after a launch in checked mode (hopper_attention/driver.py, by this unmangled name).
extern "C" __device__ int nmh_timeout = 0;

namespace nmh {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------------------
// mbarriers (shared::cta). Arrivals have release semantics and waits acquire semantics at CTA
// scope (the PTX defaults), which is what orders the producer's shared-memory writes before
// the consumers' reads.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// One poll of an mbarrier phase. SUSPEND adds a suspend-time hint: a thread whose phase is not
// complete yet is suspended (up to the hint, 200 us) instead of returning at once, so a waiting
// thread stops issuing polls (NMH_PRODUCER_SUSPENDS: the producer's waits for free stages, where
// it spends most of the kernel, in the issue slots of the consumer warp that shares its
// scheduler).
template <bool SUSPEND = false>
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
#define NMH_TRY_WAIT_ASM(HINT)                                                   \
  asm volatile(                                                                  \
      "{\n.reg .pred p;\n"                                                       \
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2" HINT ";\n"           \
      "selp.u32 %0, 1, 0, p;\n}\n"                                               \
      : "=r"(ok)                                                                 \
      : "r"(bar), "r"(parity)                                                    \
      : "memory")
  if constexpr (SUSPEND) NMH_TRY_WAIT_ASM(", 200000");
  else NMH_TRY_WAIT_ASM("");
#undef NMH_TRY_WAIT_ASM
  return ok != 0;
}
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Whether the phase with `parity` has completed, without waiting (NMH_KV_PRETEST): acquire
// semantics like try_wait's when it returns true.
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}

// Wait for the phase with the given parity to complete. A wait that lasts seconds can only be
// a protocol bug (a deadlock): record which barrier in nmh_timeout and stop waiting, so that the
// kernel ends (with garbage) and the host raises a clear error instead of the GPU hanging until
// the process is killed; once one wait has timed out every later one returns at once. No printf
// and no trap: a function call between wgmma issue and wait serializes the wgmma pipeline
// (ptxas C7510), and a trap kills the CUDA context. The clock is read only on the slow path
// (after 4096 unsuccessful polls), never in the steady state.
// SUSPEND: poll with the suspend-time hint (the producer's waits for free stages).
template <bool SUSPEND = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity, int what) {
  auto poll = [&] { return mbar_try_wait<SUSPEND>(bar, parity); };
  if (poll()) return;
  uint32_t polls = 0;
  uint64_t start = 0;
  while (!poll()) {
    if ((++polls & 4095u) == 0) {
      if (*(volatile int*)&nmh_timeout != 0) return;
      const uint64_t now = global_timer_ns();
      if (start == 0) {
        start = now;
      } else if (now - start > 4000000000ull) {
        const int block = (int)((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) & 32767;
        atomicCAS(&nmh_timeout, 0, ((what << 16) | ((int)parity << 15) | block) + 1);
        return;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// cp.async (16 bytes, L2 only). src_bytes = 0 fills the 16 bytes with zeros without reading
// (rows past a sequence's end: zeros, never a neighbour's data or NaN).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Orders this thread's generic-proxy shared-memory writes (cp.async results included, once
// waited for) before later async-proxy reads (wgmma operands) by any thread that synchronizes
// with it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// 16 bytes, the same 32-bit word four times, to shared memory.
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint32_t w) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(w) : "memory");
}

// ---------------------------------------------------------------------------------------------
// TMA (NMH_TMA variants). The tensor map lives in the kernel's parameter space (a
// __grid_constant__ argument), addressed generically as PTX allows. The load signals
// completion on the mbarrier through its transaction count, which the single producer thread
// announced first with arrive.expect_tx (so the phase completes when the bytes have landed).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void prefetch_tmap(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tmap, int c0, int c1, int c2, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// 4-D box load (NMH_TMA3D's grouped K / V maps: {head_dim, heads, g, m}).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const void* tmap, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// 5-D box load (stage 3's V map with the TMA producer: {head_dim, heads, d, c, b}).
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const void* tmap, int c0, int c1, int c2, int c3, int c4,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5, %6}], [%7];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// Named barriers (id 0 is __syncthreads), register reallocation, wgmma group control.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// An empty asm that "redefines" registers: code that reads them cannot move above an earlier
// volatile asm (a wgmma wait), and code that writes them cannot move below a later one.
template <int R>
__device__ __forceinline__ void reg_fence(float (&x)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
template <int R>
__device__ __forceinline__ void reg_fence(uint32_t (&x)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(x[i])::"memory");
}

// 64-bit wgmma shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"):
// start address, leading and stride byte offsets (all >> 4), layout type in bits 62-63
// (1 = 128-byte swizzle). Every tile starts 1024-byte aligned, so the base offset is 0.
__device__ __forceinline__ uint64_t make_desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = 0;
  d |= (uint64_t)((addr & 0x3FFFFu) >> 4);
  d |= (uint64_t)((lbo & 0x3FFFFu) >> 4) << 16;
  d |= (uint64_t)((sbo & 0x3FFFFu) >> 4) << 32;
  d |= (uint64_t)1 << 62;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Numerics
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float ex2(float x) {  // ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// {lo, hi} -> packed 16-bit pair, round to nearest even (the low half is the first element).
template <bool FP16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (FP16) {
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}
// ``arg`` where ``score >= floor``, else ``arg - 2**127 * sat((floor - score) * 2**64)``: the
// kept test of N:M selection on the FMA pipe (sub, mul.sat, fma) instead of a compare and a
// select on the ALU pipe, which the selection network already fills. Kept: floor - score <= 0
// saturates to 0 and arg is unchanged. Dropped: floor - score >= 2**-149 (sub.f32 does not
// flush subnormals), so the saturated value is >= 2**-85 and the exponent falls by >= 2**42:
// ex2 gives exactly 0. NaN (-inf - -inf, both disallowed) saturates to 0: arg stays -inf.
// The Triton kernels use the same three instructions (_drop_below_floor).
__device__ __forceinline__ float drop_below(float arg, float score, float floor) {
  float r;
  asm("{\n.reg .f32 d;\n"
      "sub.f32 d, %2, %3;\n"
      "mul.sat.f32 d, d, 0f5F800000;\n"
      "fma.rn.f32 %0, d, 0fFF000000, %1;\n}\n"
      : "=f"(r)
      : "f"(arg), "f"(floor), "f"(score));
  return r;
}

// drop_below in two FMA-pipe instructions (NMH_LEAN variants; compile-checked only, not yet
// run on a GPU): t = sat(floor * 2**64 - score * 2**64) in one fma.sat (``floor_x64`` =
// floor * 2**64, one multiply per group instead of a subtract per element), then
// arg - 2**127 * t. Exactness: both products are exact (powers of two), and the exact sum
// (floor - score) * 2**64 is a multiple of 2**-85, so its one rounding keeps it >= 2**-85 when
// score < floor (no subnormal, no flush) and <= 0 when score >= floor: the same kept set and
// the same exponents as drop_below. -inf scores: -inf + -inf * (-1) is NaN, which .sat makes
// 0, and arg is -inf already; +inf - finite saturates to 1: dropped.
__device__ __forceinline__ float drop_below2(float arg, float score, float floor_x64) {
  float r;
  asm("{\n.reg .f32 t;\n"
      "fma.rn.sat.f32 t, %2, 0fDF800000, %3;\n"
      "fma.rn.f32 %0, t, 0fFF000000, %1;\n}\n"
      : "=f"(r)
      : "f"(arg), "f"(score), "f"(floor_x64));
  return r;
}

// NMH_PHASE_CLOCKS: the SM's cycle counter | 1 stored at `addr` if `on` (one predicated store;
// volatile with a memory clobber, so that it stays between the waits and stores around it).
__device__ __forceinline__ void clock_store(uint32_t* addr, bool on) {
  asm volatile("{\n.reg .pred q;\n.reg .u32 t;\nsetp.ne.u32 q, %1, 0;\nmov.u32 t, %%clock;\nor.b32 t, t, 1;\n"
               "@q st.global.u32 [%0], t;\n}\n" ::"l"(addr), "r"((uint32_t)on)
               : "memory");
}

}  // namespace nmh
