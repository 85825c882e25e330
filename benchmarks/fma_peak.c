/* The arithmetic peak of this CPU for the linear cross-entropy's own matmul kernels: float32 fused multiply-adds
 * on 512-bit registers (VFMADD231PS) and bfloat16 dot products (VDPBF16PS, AVX512_BF16), 12 independent
 * accumulators per thread (more than latency x throughput), 1 and 2 threads. GFLOPS count 2 per product.
 *
 *     gcc -O2 -fopenmp benchmarks/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * The README's linear cross-entropy section compares the kernels' measured GFLOPS with these numbers. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f"))) static float fma_loop(long n) {
  __m512 a[12];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
  }
  __m512 s = a[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512bf16"))) static float dp_loop(long n) {
  __m512 a[12];
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3f80), c = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
  for (long k = 0; k < n; k++) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; i++) a[i] = _mm512_dpbf16_ps(a[i], b, c);
  }
  __m512 s = a[0];
  for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
  return _mm512_reduce_add_ps(s);
}

int main(void) {
  const long n = 200000000 / 12;
  const int bf16 = __builtin_cpu_supports("avx512bf16");
  if (!__builtin_cpu_supports("avx512f")) {
    printf("no AVX-512 on this CPU\n");
    return 0;
  }
  volatile float sink;
  for (int th = 1; th <= 2; th++) {
    omp_set_num_threads(th);
    double best_f = 0, best_b = 0;
    for (int rep = 0; rep < 5; rep++) {
      double t = now();
#pragma omp parallel
      sink = fma_loop(n);
      const double f = 2.0 * 16 * 12 * n * th / (now() - t) / 1e9;
      if (f > best_f) best_f = f;
      if (!bf16) continue;
      t = now();
#pragma omp parallel
      sink = dp_loop(n);
      const double b = 4.0 * 16 * 12 * n * th / (now() - t) / 1e9;
      if (b > best_b) best_b = b;
    }
    printf("%d thread(s): float32 FMA %.0f GFLOPS", th, best_f);
    if (bf16) printf(", bfloat16 VDPBF16PS %.0f GFLOPS", best_b);
    printf(" (best of 5)\n");
  }
  (void)sink;
  return 0;
}
