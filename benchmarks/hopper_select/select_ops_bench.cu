// Issue 15: which pipe and rate the instructions of an N:M selection network run at on sm_90.
// Each kernel runs Parberry's 16-input network (63 comparators, 126 min/max) LOOPS times on
// independent register sets, in one of several element types, optionally interleaved with an
// independent FFMA chain of the same length (if the two overlap, the comparator runs on
// another pipe than FFMA). Build and run: nvcc -O3 -arch=sm_90a select_ops_bench.cu -o b && ./b
#include <cstdio>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

template <class T> __device__ __forceinline__ T vmax(T a, T b);
template <class T> __device__ __forceinline__ T vmin(T a, T b);
template <> __device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }
template <> __device__ __forceinline__ float vmin(float a, float b) { return fminf(a, b); }
template <> __device__ __forceinline__ uint32_t vmax(uint32_t a, uint32_t b) {
  uint32_t d; asm("max.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
template <> __device__ __forceinline__ uint32_t vmin(uint32_t a, uint32_t b) {
  uint32_t d; asm("min.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d; }
struct S16 { uint32_t v; };
template <> __device__ __forceinline__ S16 vmax(S16 a, S16 b) {
  S16 d; asm("max.s16x2 %0, %1, %2;" : "=r"(d.v) : "r"(a.v), "r"(b.v)); return d; }
template <> __device__ __forceinline__ S16 vmin(S16 a, S16 b) {
  S16 d; asm("min.s16x2 %0, %1, %2;" : "=r"(d.v) : "r"(a.v), "r"(b.v)); return d; }
struct I32 { int v; };
template <> __device__ __forceinline__ I32 vmax(I32 a, I32 b) { return {max(a.v, b.v)}; }
template <> __device__ __forceinline__ I32 vmin(I32 a, I32 b) { return {min(a.v, b.v)}; }

template <class T> __device__ __forceinline__ void cx(T& a, T& b) { T h = vmax(a, b); b = vmin(a, b); a = h; }

#include "net16.cuh"

template <class T> __device__ __forceinline__ T from_seed(uint32_t s);
template <> __device__ __forceinline__ float from_seed(uint32_t s) { return __uint_as_float(0x3f800000u | (s & 0x7fffffu)); }
template <> __device__ __forceinline__ uint32_t from_seed(uint32_t s) { return 0x3c003c00u | (s & 0x03ff03ffu); }
template <> __device__ __forceinline__ S16 from_seed(uint32_t s) { return {s}; }
template <> __device__ __forceinline__ I32 from_seed(uint32_t s) { return {(int)s}; }
template <class T> __device__ __forceinline__ uint32_t fold(T v);
template <> __device__ __forceinline__ uint32_t fold(float v) { return __float_as_uint(v); }
template <> __device__ __forceinline__ uint32_t fold(uint32_t v) { return v; }
template <> __device__ __forceinline__ uint32_t fold(S16 v) { return v.v; }
template <> __device__ __forceinline__ uint32_t fold(I32 v) { return (uint32_t)v.v; }

// FFMA: WITH_FMA independent chains of 126 FFMA per network pass (as many as the network's min/max).
template <class T, int WITH_FMA>
__global__ void net_kernel(uint32_t* out, int loops, uint32_t seed) {
  T x[16];
  float f[8];
  uint32_t s = seed ^ (threadIdx.x * 2654435761u) ^ blockIdx.x;
#pragma unroll
  for (int i = 0; i < 16; ++i) { s = s * 1664525u + 1013904223u; x[i] = from_seed<T>(s); }
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = 1.0f + i * 1e-3f + threadIdx.x * 1e-6f;
  for (int l = 0; l < loops; ++l) {
    net16(x);
    // Reverse so the next pass has work to do (a register renaming, no instruction).
#pragma unroll
    for (int i = 0; i < 8; ++i) { T t = x[i]; x[i] = x[15 - i]; x[15 - i] = t; }
    if (WITH_FMA) {
#pragma unroll
      for (int k = 0; k < 126 * WITH_FMA / 8; ++k)
#pragma unroll
        for (int i = 0; i < 8; ++i) f[i] = fmaf(f[i], 0.999f, 1e-3f);
    }
  }
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < 16; ++i) acc ^= fold(x[i]);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc ^= __float_as_uint(f[i]);
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// f32 -> f16x2 conversions (cvt.rn.f16x2.f32), 64 values per pass (32 instructions), folded by XOR
__global__ void cvt_kernel(uint32_t* out, int loops, uint32_t seed) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = 1.0f + (i * 37 + threadIdx.x) * 1e-4f;
  uint32_t acc = seed;
  for (int l = 0; l < loops; ++l) {
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      uint32_t h;
      asm volatile("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(v[2 * i]), "f"(v[2 * i + 1]));
      acc += h;
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) v[i] = __uint_as_float(__float_as_uint(v[i]) ^ (acc & 1u));
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

template <class K>
float time_it(K kernel, uint32_t* out, int loops, int blocks, int threads) {
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  kernel<<<blocks, threads>>>(out, loops, 1u);
  cudaEventRecord(a);
  for (int r = 0; r < 5; ++r) kernel<<<blocks, threads>>>(out, loops, 1u);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  return ms / 5;
}

int main() {
  int dev = 0, sms = 0, clk = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, dev);  // kHz
  const int threads = 512, blocks = sms * 2, loops = 4000;
  uint32_t* out; cudaMalloc(&out, blocks * threads * 4);
  const double warps_per_sm = 2.0 * threads / 32;
  // cycles per SM per network pass (all of its warps): ms * clk(kHz) / (loops * warps_per_sm) per warp-pass
  auto report = [&](const char* name, float ms, double instr_per_pass) {
    const double cycles = ms * 1e-3 * clk * 1e3;                 // per SM
    const double warp_instr = loops * warps_per_sm * instr_per_pass;  // warp-instructions per SM
    printf("%-34s %8.3f ms  %6.2f warp-instr/clk/SM  (%.0f cycles per warp-pass/SM)\n", name, ms,
           warp_instr / cycles, cycles / (loops * warps_per_sm));
  };
  printf("H: %d SMs, clock %d MHz (reported max), %d blocks x %d threads, %d passes\n", sms, clk / 1000, blocks, threads, loops);
  report("f32 FMNMX network (126)", time_it(net_kernel<float, 0>, out, loops, blocks, threads), 126);
  report("f16x2 HMNMX2 network (126)", time_it(net_kernel<uint32_t, 0>, out, loops, blocks, threads), 126);
  report("s16x2 VIMNMX network (126)", time_it(net_kernel<S16, 0>, out, loops, blocks, threads), 126);
  report("s32 IMNMX network (126)", time_it(net_kernel<I32, 0>, out, loops, blocks, threads), 126);
  report("f32 network + 126 FFMA", time_it(net_kernel<float, 1>, out, loops, blocks, threads), 252);
  report("f16x2 network + 126 FFMA", time_it(net_kernel<uint32_t, 1>, out, loops, blocks, threads), 252);
  report("s16x2 network + 126 FFMA", time_it(net_kernel<S16, 1>, out, loops, blocks, threads), 252);
  report("f32 network + 252 FFMA", time_it(net_kernel<float, 2>, out, loops, blocks, threads), 378);
  report("f16x2 network + 252 FFMA", time_it(net_kernel<uint32_t, 2>, out, loops, blocks, threads), 378);
  report("cvt.rn.f16x2.f32 (32) + 32 IADD + 64 LOP", time_it(cvt_kernel, out, loops, blocks, threads), 128);
  cudaError_t e = cudaDeviceSynchronize();
  printf("status: %s\n", cudaGetErrorString(e));
  return 0;
}
