// Float32 fused multiply-add peak of this CPU, to put the cpp backend's GFLOP/s in context.
//
//   gcc -O3 -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
//
// Each thread runs 12 independent FMA chains (enough to cover the FMA latency on current x86
// cores) on 256-bit and, where the CPU has AVX-512, 512-bit registers; one thread per core
// (OMP_NUM_THREADS), all at once, so the figure includes any clock drop under full load.
// An FMA counts as 2 flops.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2,fma"))) static float chains256(long n) {
  __m256 acc[CHAINS];
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_set1_ps((float)i);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
  float s = 0;
  for (int i = 0; i < CHAINS; ++i) s += acc[i][0];
  return s;  // returned so the loop is not removed
}

__attribute__((target("avx512f"))) static float chains512(long n) {
  __m512 acc[CHAINS];
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < n; ++k)
    for (int i = 0; i < CHAINS; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  float s = 0;
  for (int i = 0; i < CHAINS; ++i) s += acc[i][0];
  return s;
}

static void run(const char* name, int lanes, float (*f)(long)) {
  const long n = 50000000;
  volatile float sink = 0;
  double t = now();
#pragma omp parallel reduction(+ : sink)
  sink += f(n);
  t = now() - t;
  const int threads = omp_get_max_threads();
  const double gflops = 2.0 * CHAINS * lanes * (double)n * threads / t / 1e9;
  printf("%s: %.0f GFLOP/s float32 on %d threads (%.0f per thread)\n", name, gflops, threads,
         gflops / threads);
}

int main(void) {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    run("256-bit FMA", 8, chains256);
  if (__builtin_cpu_supports("avx512f")) run("512-bit FMA", 16, chains512);
  return 0;
}
