// Issue 15 (session 21): which pipe the conversions of NMH_HALF_SELECT use on sm_90, and at what
// rate: cvt.rn.f16x2.f32 (F2FP), cvt.f32.f16 (HADD2.F32), against MUFU (ex2), ALU (FMNMX) and
// FMA (FFMA). Each kernel issues K independent asm-volatile instructions of one or two kinds per
// loop pass; if two kinds together take the sum of their times, they share a pipe.
// nvcc -O3 -arch=sm_90a convert_ops_bench.cu -o c && ./c
#include <cstdio>
#include <cstdint>

#define REP8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
template <int KIND>
__device__ __forceinline__ void op(uint32_t& u, float& f, float a, float b) {
  if constexpr (KIND == 0) asm volatile("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(u) : "f"(a), "f"(b));
  if constexpr (KIND == 1) asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(f) : "f"(a));
  if constexpr (KIND == 2) asm volatile("max.f32 %0, %1, %2;" : "=f"(f) : "f"(a), "f"(b));
  if constexpr (KIND == 3) asm volatile("fma.rn.f32 %0, %1, %2, %1;" : "=f"(f) : "f"(a), "f"(b));
  if constexpr (KIND == 4) asm volatile("{.reg .f16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(__float_as_uint(a)));
  if constexpr (KIND == 5) asm volatile("max.f16x2 %0, %1, %2;" : "=r"(u) : "r"(__float_as_uint(a)), "r"(__float_as_uint(b)));
}

template <int K1, int K2>
__global__ void mix(uint32_t* out, int loops) {
  float a[8], b[8];
  uint32_t u[8];
  float f[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) { a[i] = 1.0f + threadIdx.x * 1e-3f + i; b[i] = 0.5f * i; u[i] = 0; f[i] = 0; }
  for (int l = 0; l < loops; ++l) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        op<K1>(u[i], f[i], a[i], b[i]);
        if constexpr (K2 >= 0) op<K2>(u[(i + 3) & 7], f[(i + 3) & 7], b[i], a[i]);
      }
    }
  }
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc ^= u[i] ^ __float_as_uint(f[i]);
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

template <class K>
float time_it(K kernel, uint32_t* out, int loops, int blocks, int threads) {
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  kernel<<<blocks, threads>>>(out, loops);
  cudaEventRecord(a);
  for (int r = 0; r < 5; ++r) kernel<<<blocks, threads>>>(out, loops);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  return ms / 5;
}

int main() {
  int sms = 0, clk = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&clk, cudaDevAttrClockRate, 0);
  const int threads = 512, blocks = sms * 2, loops = 4000;
  uint32_t* out; cudaMalloc(&out, blocks * threads * 4);
  const double warps = 2.0 * threads / 32;  // per SM
  auto rep = [&](const char* name, float ms, int per_pass) {
    const double cycles = ms * 1e-3 * clk * 1e3;
    printf("%-28s %7.3f ms  %5.2f warp-instr/clk/SM\n", name, ms, loops * warps * per_pass / cycles);
  };
  const char* names[] = {"F2FP (cvt.rn.f16x2.f32)", "MUFU ex2", "FMNMX", "FFMA", "HADD2.F32 (cvt.f32.f16)", "HMNMX2"};
#define ONE(K) rep(names[K], time_it(mix<K, -1>, out, loops, blocks, threads), 32);
  ONE(0) ONE(1) ONE(2) ONE(3) ONE(4) ONE(5)
#define TWO(A, B) { char n[64]; snprintf(n, 64, "%s + %s", #A, #B); rep(n, time_it(mix<A, B>, out, loops, blocks, threads), 64); }
  printf("pairs (0 F2FP, 1 MUFU, 2 FMNMX, 3 FFMA, 4 HADD2.F32, 5 HMNMX2):\n");
  TWO(0, 1) TWO(0, 2) TWO(0, 3) TWO(4, 2) TWO(4, 3) TWO(4, 1) TWO(5, 2) TWO(5, 3)
  printf("status: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
