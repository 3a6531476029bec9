// Issue 15, session 23: does ONE warp per scheduler overlap its selection networks (FMNMX, ALU
// pipe) with its exponentials (MUFU.EX2)? In the attention kernel's softmax one warp per
// scheduler is active (the other warpgroup waits for its MMAs), so the question is about a single
// instruction stream, not about throughput with many warps (select_ops_bench.cu).
// Each kernel runs, per loop pass, MODE bit 0: four independent 16-input networks (4 x 126 FMNMX)
// and/or bit 1: 128 independent MUFU.EX2 and/or bit 2: 256 independent FFMA, all in one basic
// block on independent registers, with one warp per scheduler (128 threads per block, one block
// per SM). Cycles per pass: alone, and together (the sum means no overlap, the max full overlap).
// Build and run: nvcc -O3 -arch=sm_90a one_warp_overlap.cu -o o && ./o
#include <cstdio>
#include <cstdint>

__device__ __forceinline__ void cx(float& a, float& b) { float h = fmaxf(a, b); b = fminf(a, b); a = h; }
#include "net16.cuh"

__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}

template <int MODE>
__global__ void __launch_bounds__(128, 1) k(uint32_t* out, int loops, long long* cycles) {
  float x[64], e[32], f[32];
#pragma unroll
  for (int i = 0; i < 64; ++i) x[i] = 1.0f + ((i * 37 + threadIdx.x) & 255) * 1e-3f;
#pragma unroll
  for (int i = 0; i < 32; ++i) { e[i] = -1.0f - i * 1e-3f; f[i] = 1.0f + i * 1e-4f; }
  const long long t0 = clock64();
  for (int l = 0; l < loops; ++l) {
    if (MODE & 1) {
#pragma unroll
      for (int n = 0; n < 4; ++n) net16(*reinterpret_cast<float(*)[16]>(x + 16 * n));
#pragma unroll
      for (int n = 0; n < 4; ++n)  // reverse (register renaming) so that the next pass sorts again
#pragma unroll
        for (int i = 0; i < 8; ++i) { float t = x[16 * n + i]; x[16 * n + i] = x[16 * n + 15 - i]; x[16 * n + 15 - i] = t; }
    }
    if (MODE & 2) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int i = 0; i < 32; ++i) e[i] = ex2(e[i]) - 1.5f;  // 128 MUFU (and 128 FADD) per pass
    }
    if (MODE & 4) {
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int i = 0; i < 32; ++i) f[i] = fmaf(f[i], 0.999f, 1e-3f);  // 256 FFMA per pass
    }
  }
  const long long t1 = clock64();
  uint32_t acc = 0;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc ^= __float_as_uint(x[i]);
#pragma unroll
  for (int i = 0; i < 32; ++i) acc ^= __float_as_uint(e[i]) ^ __float_as_uint(f[i]);
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int MODE>
double run(uint32_t* out, long long* cyc, int sms, int loops) {
  k<MODE><<<sms, 128>>>(out, loops, cyc);
  k<MODE><<<sms, 128>>>(out, loops, cyc);
  cudaDeviceSynchronize();
  long long h[1024];
  cudaMemcpy(h, cyc, sms * sizeof(long long), cudaMemcpyDeviceToHost);
  double s = 0;
  for (int i = 0; i < sms; ++i) s += h[i];
  return s / sms / loops;  // cycles per pass of one warp (per scheduler)
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  uint32_t* out; long long* cyc;
  cudaMalloc(&out, sms * 128 * 4); cudaMalloc(&cyc, sms * sizeof(long long));
  const int loops = 2000;
  const double n = run<1>(out, cyc, sms, loops), m = run<2>(out, cyc, sms, loops), f = run<4>(out, cyc, sms, loops);
  const double nm = run<3>(out, cyc, sms, loops), nf = run<5>(out, cyc, sms, loops), mf = run<6>(out, cyc, sms, loops);
  const double all = run<7>(out, cyc, sms, loops);
  printf("one warp per scheduler, cycles per pass (SM clock):\n");
  printf("  networks (504 FMNMX)        %7.0f\n  exponentials (128 MUFU.EX2 + 128 FADD) %7.0f\n  FFMA (256)                  %7.0f\n", n, m, f);
  printf("  networks + exponentials     %7.0f   (sum %.0f, max %.0f)\n", nm, n + m, n > m ? n : m);
  printf("  networks + FFMA             %7.0f   (sum %.0f, max %.0f)\n", nf, n + f, n > f ? n : f);
  printf("  exponentials + FFMA         %7.0f   (sum %.0f, max %.0f)\n", mf, m + f, m > f ? m : f);
  printf("  all three                   %7.0f   (sum %.0f)\n", all, n + m + f);
  printf("status: %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
  return 0;
}
