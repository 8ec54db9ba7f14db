// Microbenchmark: a fused bfloat16 attention for EVA ViT-g (16 heads, 1025 tokens, head dim 88)
// with AVX-512 BF16, against which the vision graph's ONNX Runtime attention is measured.
//
//   g++ -O3 -march=native -fopenmp benchmarks/attention_bf16.cpp -o /tmp/attention_bf16
//   OMP_NUM_THREADS=2 /tmp/attention_bf16        # a layer's time, GMAC/s, error against fp64
//   OMP_NUM_THREADS=1 /tmp/attention_bf16 1      # QK^T only (2: without P V)
//
// ONNX Runtime's fp32 MultiHeadAttention takes 34.6 ms a layer on 2 threads of the AVX-512 EPYC
// (1.36 s of a 4.4 s int8 encode) and it has no bf16 or int8 attention on x86. Here, on the same
// machine: 17.8-19.3 ms on 2 threads, cosine 0.9999886 against fp64 (QK^T 96 GMAC/s on one core,
// 82 % of the bf16 peak). Not used by the engine yet: ONNX Runtime takes no custom op without its
// C headers, and the graph cut into 40 sessions around it (as a ctypes library) lost in the cuts
// what it saved: 4.25-4.63 s an encode against 4.25-4.42 s for the whole graph.
//
// Per head: scores = (Q*scale) K^T with vdpbf16ps (K as bf16 pairs along the head dim, 8 query
// rows x 32 keys of accumulators), an fp32 softmax per row (exp by vscalefps), P V with vdpbf16ps
// (V as bf16 pairs along the keys, 8 rows x 48 dims of accumulators); keys padded to 32.
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>
#include <cstdlib>

static inline uint16_t bf16(float x) {  // round to nearest even
    uint32_t u; memcpy(&u, &x, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static inline __m512 exp512(__m512 x) {  // e^x, x <= 0 here
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, log2e);
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);  // [-0.5, 0.5]
    // 2^f, degree 6
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

constexpr int H = 16, S = 1025, D = 88;
constexpr int SP = (S + 31) / 32 * 32;  // keys padded: 1056
constexpr int DP = 96;                  // output dims padded to 6 vectors
constexpr int DPAIR = D / 2;            // 44
constexpr int MR = 8;                   // query rows per block (scores: 16 accumulators)
constexpr int PR = 4;                   // rows per P V pass (24 accumulators)

// one head: q, k, v [S, D] fp32 row-major (q already scaled); out [S, D]
static int SKIP = 0;  // argv[1]: 1 = QK^T only, 2 = without P V (to time the phases)
static void head(const float* q, const float* k, const float* v, float* out,
                 uint32_t* kp, uint32_t* vp, float* sc, uint32_t* pp) {
    // K as [DPAIR][SP] pairs along d; V as [SP/2][DP] pairs along the key
    for (int p = 0; p < DPAIR; p++)
        for (int j = 0; j < SP; j++)
            kp[p * SP + j] = j < S ? (uint32_t)bf16(k[j * D + 2 * p]) | ((uint32_t)bf16(k[j * D + 2 * p + 1]) << 16) : 0;
    for (int jq = 0; jq < SP / 2; jq++)
        for (int d = 0; d < DP; d++) {
            int j0 = 2 * jq, j1 = 2 * jq + 1;
            uint16_t a = (j0 < S && d < D) ? bf16(v[j0 * D + d]) : 0, b = (j1 < S && d < D) ? bf16(v[j1 * D + d]) : 0;
            vp[jq * DP + d] = (uint32_t)a | ((uint32_t)b << 16);
        }
    uint32_t qp[MR][DPAIR];
    for (int i0 = 0; i0 < S; i0 += MR) {
        int mr = S - i0 < MR ? S - i0 : MR;
        for (int r = 0; r < MR; r++)
            for (int p = 0; p < DPAIR; p++) {
                int i = i0 + (r < mr ? r : 0);
                qp[r][p] = (uint32_t)bf16(q[i * D + 2 * p]) | ((uint32_t)bf16(q[i * D + 2 * p + 1]) << 16);
            }
        // scores [MR][SP], two key vectors at a time
        for (int j = 0; j < SP; j += 32) {
            __m512 acc[MR][2];
            for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            for (int p = 0; p < DPAIR; p++) {
                __m512bh k0 = (__m512bh)_mm512_loadu_si512(kp + p * SP + j);
                __m512bh k1 = (__m512bh)_mm512_loadu_si512(kp + p * SP + j + 16);
                for (int r = 0; r < MR; r++) {
                    __m512bh a = (__m512bh)_mm512_set1_epi32((int)qp[r][p]);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
                }
            }
            for (int r = 0; r < MR; r++) {
                _mm512_storeu_ps(sc + r * SP + j, acc[r][0]);
                _mm512_storeu_ps(sc + r * SP + j + 16, acc[r][1]);
            }
        }
        if (SKIP == 1) continue;
        // softmax rows -> P as bf16 pairs along the key, sums kept for the end
        float sum[MR];
        for (int r = 0; r < MR; r++) {
            float* s = sc + r * SP;
            for (int j = S; j < SP; j++) s[j] = -INFINITY;
            __m512 m = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < SP; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
            __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m)), tot = _mm512_setzero_ps();
            for (int j = 0; j < SP; j += 32) {
                __m512 e0 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mx));
                __m512 e1 = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), mx));
                tot = _mm512_add_ps(tot, _mm512_add_ps(e0, e1));
                // the 32 values in order (e0 low, e1 high): pair (j, j+1) is one 32-bit lane
                __m512bh pb = _mm512_cvtne2ps_pbh(e1, e0);
                _mm512_storeu_si512(pp + r * (SP / 2) + j / 2, (__m512i)pb);
            }
            sum[r] = _mm512_reduce_add_ps(tot);
        }
        if (SKIP == 2) continue;
        // out = P V: all MR rows, half of the output dims at a time (8 x 3 = 24 accumulators)
        for (int c0 = 0; c0 < DP / 16; c0 += 3) {
            __m512 o[MR][3];
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < 3; c++) o[r][c] = _mm512_setzero_ps();
            for (int jq = 0; jq < SP / 2; jq++) {
                const uint32_t* vrow = vp + jq * DP + 16 * c0;
                __m512bh v0 = (__m512bh)_mm512_loadu_si512(vrow), v1 = (__m512bh)_mm512_loadu_si512(vrow + 16),
                         v2 = (__m512bh)_mm512_loadu_si512(vrow + 32);
                for (int r = 0; r < MR; r++) {
                    __m512bh a = (__m512bh)_mm512_set1_epi32((int)pp[r * (SP / 2) + jq]);
                    o[r][0] = _mm512_dpbf16_ps(o[r][0], a, v0);
                    o[r][1] = _mm512_dpbf16_ps(o[r][1], a, v1);
                    o[r][2] = _mm512_dpbf16_ps(o[r][2], a, v2);
                }
            }
            for (int r = 0; r < mr; r++) {
                __m512 inv = _mm512_set1_ps(1.0f / sum[r]);
                for (int c = 0; c < 3; c++) {
                    int d0 = 16 * (c0 + c);
                    __mmask16 m = d0 + 16 <= D ? (__mmask16)0xFFFF : (__mmask16)((1u << (D - d0)) - 1);
                    _mm512_mask_storeu_ps(out + (i0 + r) * D + d0, m, _mm512_mul_ps(o[r][c], inv));
                }
            }
        }
    }
}

int main(int argc, char** argv) {
    if (argc > 1) SKIP = atoi(argv[1]);
    std::mt19937 g(0);
    std::normal_distribution<float> n(0, 1);
    std::vector<float> q(H * S * D), k(H * S * D), v(H * S * D), out(H * S * D), ref(H * S * D);
    const float scale = 1.0f / std::sqrt((float)D);
    for (auto& x : q) x = n(g) * 1.5f * scale;  // scaled queries, peaky enough softmax
    for (auto& x : k) x = n(g) * 1.5f;
    for (auto& x : v) x = n(g);
    int threads = omp_get_max_threads();
    std::vector<std::vector<uint32_t>> kp(threads, std::vector<uint32_t>(DPAIR * SP)), vp(threads, std::vector<uint32_t>(SP / 2 * DP)),
        pp(threads, std::vector<uint32_t>(MR * SP / 2));
    std::vector<std::vector<float>> sc(threads, std::vector<float>(MR * SP));
    auto run = [&] {
#pragma omp parallel for schedule(static)
        for (int h = 0; h < H; h++) {
            int t = omp_get_thread_num();
            head(&q[h * S * D], &k[h * S * D], &v[h * S * D], &out[h * S * D], kp[t].data(), vp[t].data(), sc[t].data(), pp[t].data());
        }
    };
    run();
    double best = 1e9;
    for (int it = 0; it < 10; it++) {
        auto t0 = std::chrono::steady_clock::now();
        run();
        double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        best = ms < best ? ms : best;
    }
    // fp32 reference on two heads
    double err = 0, norm = 0, dot = 0, n1 = 0, n2 = 0;
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < S; i++) {
            std::vector<double> s(S);
            double m = -1e30, tot = 0;
            for (int j = 0; j < S; j++) {
                double a = 0;
                for (int d = 0; d < D; d++) a += (double)q[(h * S + i) * D + d] * k[(h * S + j) * D + d];
                s[j] = a; m = a > m ? a : m;
            }
            for (int j = 0; j < S; j++) { s[j] = std::exp(s[j] - m); tot += s[j]; }
            for (int d = 0; d < D; d++) {
                double a = 0;
                for (int j = 0; j < S; j++) a += s[j] * v[(h * S + j) * D + d];
                a /= tot;
                double b = out[(h * S + i) * D + d];
                err += (a - b) * (a - b); norm += a * a; dot += a * b; n1 += a * a; n2 += b * b;
            }
        }
    double gmac = (double)H * S * S * D * 2 / 1e9;
    printf("threads %d: %.2f ms per layer (%.0f GMAC/s useful), rel err %.2e, cosine %.8f\n", threads, best,
           gmac / (best / 1e3), std::sqrt(err / norm), dot / std::sqrt(n1 * n2));
}
