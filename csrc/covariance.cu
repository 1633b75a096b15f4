// covariance_update: C += scale * X~^T X~ in place, C (E, E) fp32 exactly symmetric.
//
// X is (N, D) with any strides, in fp16 / bf16 / fp32; X~ keeps the rows whose mask is true and,
// with append_ones, gets a ones column (index D), so E = D + append_ones. Math as in
// kfac_kernels/covariance.py and the Triton kernel kfac_kernels/triton_kernels/covariance.py.
//
// C is cut into 128 x 128 tiles and only the lower-triangle tiles (i >= j) are computed; pair
// p = i(i+1)/2 + j. Kernel 1 computes, for each (row split, pair), the partial tile over the
// split's rows: X is read in its dtype, converted to the multiply dtype in shared memory
// (fp16/bf16 -> WMMA tensor cores; fp32 -> FMA at 'highest', tf32 WMMA at 'high', bf16 WMMA at
// 'medium', following torch.get_float32_matmul_precision(); before sm_80, which has no bf16 or
// tf32 WMMA, bf16 and those fp32 modes use FMA), accumulated in fp32, and stored to a workspace of
// at most 64 MiB: when the partial tiles do not fit, the pairs go in batches, two launches each.
// Kernel 2 sums the splits in a fixed order (deterministic), adds scale * sum to the lower
// triangle of C and writes each value to (r, c) and (c, r): exact symmetry.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <optional>
#include <type_traits>

namespace {

using namespace nvcuda;

constexpr int kTile = 128;                           // side of a C tile
constexpr int kChunk = 32;                           // rows of X per main-loop step
constexpr int kThreads = 256;                        // 8 warps
constexpr int kLd = kTile + 8;                       // padded shared row, valid WMMA ldm
constexpr int kLoads = kChunk * kTile / kThreads;    // elements per thread per operand per step
constexpr int kSub = 32;                             // side of a transpose sub-tile in kernel 2
constexpr int64_t kWorkspaceBytes = int64_t(64) << 20;

enum class Mode { kWmma16, kWmmaTf32, kFma };

// tf32 WMMA (and bf16's) is sm_80's: device code for older GPUs compiles without it, and the host
// never launches those modes there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define KK_SM80 1
template <typename TS, Mode M>
using WmmaOperand = std::conditional_t<M == Mode::kWmmaTf32, wmma::precision::tf32, TS>;
#else
#define KK_SM80 0
template <typename TS, Mode M>
using WmmaOperand = TS;
#endif

__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ inline T from_float(float x);
template <>
__device__ inline float from_float<float>(float x) { return x; }
template <>
__device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Lower-triangle tile pair (i, j), i >= j, of p = i(i+1)/2 + j.
__device__ inline void pair_of(int64_t p, int64_t& i, int64_t& j) {
  int64_t r = static_cast<int64_t>((sqrt(8.0 * p + 1.0) - 1.0) * 0.5);
  if (r * (r + 1) / 2 > p) --r;
  if ((r + 1) * (r + 2) / 2 <= p) ++r;
  i = r;
  j = p - r * (r + 1) / 2;
}

struct Args {
  const void* x;
  const bool* mask;  // nullptr: keep all rows
  float* ws;         // (splits, n_pairs, kTile, kTile)
  int64_t n, d, stride_n, stride_d, stride_m;
  int64_t pair0, n_pairs;  // this launch's pairs: pair0 + [0, n_pairs)
  int64_t rows_per_split;
  bool append_ones;
};

template <typename TS, Mode M>
constexpr bool kNeedsSm80 = M == Mode::kWmmaTf32 || (M == Mode::kWmma16 && std::is_same_v<TS, __nv_bfloat16>);

// One column of X~ as seen by a thread: X's column `col`, the ones column, or zero padding.
template <typename TIn>
struct Column {
  const TIn* x;  // X[0, col] when col < d
  float fill;    // value when col >= d: 1 for the ones column, else 0
  bool in_x;

  __device__ Column(const Args& a, int64_t col)
      : x(static_cast<const TIn*>(a.x) + (col < a.d ? col * a.stride_d : 0)),
        fill(col == a.d && a.append_ones ? 1.f : 0.f),
        in_x(col < a.d) {}

  // X~[row, col] in the multiply dtype TS, given whether the row is kept.
  template <typename TS, Mode M>
  __device__ TS at(const Args& a, int64_t row, bool keep) const {
    float v = !keep ? 0.f : in_x ? to_float(x[row * a.stride_n]) : fill;
#if KK_SM80
    if constexpr (M == Mode::kWmmaTf32) v = wmma::__float_to_tf32(v);
#endif
    return from_float<TS>(v);
  }
};

// 8 warps as 2 x 4, each a 64 x 32 block of 16 x 16 WMMA accumulators.
template <typename TS, Mode M>
struct WmmaTile {
  static constexpr int kK = M == Mode::kWmmaTf32 ? 8 : 16;
  using Op = WmmaOperand<TS, M>;
  wmma::fragment<wmma::accumulator, 16, 16, kK, float> acc[4][2];
  int wm = threadIdx.x / 32 / 4, wn = threadIdx.x / 32 % 4;

  __device__ WmmaTile() {
    for (auto& row : acc)
      for (auto& f : row) wmma::fill_fragment(f, 0.f);
  }

  // acc += As^T Bs; As[k][m] is X~[k, i-block m], i.e. the A operand in column-major.
  __device__ void step(const TS (*As)[kLd], const TS (*Bs)[kLd]) {
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += kK) {
      wmma::fragment<wmma::matrix_a, 16, 16, kK, Op, wmma::col_major> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, kK, Op, wmma::row_major> fb[2];
#pragma unroll
      for (int f = 0; f < 4; ++f) wmma::load_matrix_sync(fa[f], &As[kk][wm * 64 + f * 16], kLd);
#pragma unroll
      for (int f = 0; f < 2; ++f) wmma::load_matrix_sync(fb[f], &Bs[kk][wn * 32 + f * 16], kLd);
#pragma unroll
      for (int fm = 0; fm < 4; ++fm)
#pragma unroll
        for (int fn = 0; fn < 2; ++fn) wmma::mma_sync(acc[fm][fn], fa[fm], fb[fn], acc[fm][fn]);
    }
  }

  __device__ void store(float* tile) {
    for (int fm = 0; fm < 4; ++fm)
      for (int fn = 0; fn < 2; ++fn)
        wmma::store_matrix_sync(tile + (wm * 64 + fm * 16) * kTile + wn * 32 + fn * 16, acc[fm][fn], kTile,
                                wmma::mem_row_major);
  }
};

// IEEE fp32: each thread owns rows ty + 16u and columns tx + 16v, u, v < 8.
struct FmaTile {
  float acc[8][8] = {};
  int ty = threadIdx.x / 16, tx = threadIdx.x % 16;

  __device__ void step(const float (*As)[kLd], const float (*Bs)[kLd]) {
#pragma unroll 4
    for (int k = 0; k < kChunk; ++k) {
      float av[8], bv[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) av[u] = As[k][ty + 16 * u];
#pragma unroll
      for (int v = 0; v < 8; ++v) bv[v] = Bs[k][tx + 16 * v];
#pragma unroll
      for (int u = 0; u < 8; ++u)
#pragma unroll
        for (int v = 0; v < 8; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
    }
  }

  __device__ void store(float* tile) {
    for (int u = 0; u < 8; ++u)
      for (int v = 0; v < 8; ++v) tile[(ty + 16 * u) * kTile + tx + 16 * v] = acc[u][v];
  }
};

template <typename TIn, typename TS, Mode M>
__device__ void partial_tile(const Args& a) {
  __shared__ __align__(32) TS As[kChunk][kLd];
  __shared__ __align__(32) TS Bs[kChunk][kLd];
  int64_t ti, tj;
  pair_of(a.pair0 + blockIdx.x % a.n_pairs, ti, tj);
  const bool diag = ti == tj;  // then B = A: load it once
  const TS (*Bp)[kLd] = diag ? As : Bs;
  const int64_t start = blockIdx.x / a.n_pairs * a.rows_per_split;
  const int64_t stop = min(a.n, start + a.rows_per_split);

  // Thread t loads column t % kTile of both tiles, rows t / kTile + kRowStep * u of each chunk.
  constexpr int kRowStep = kThreads / kTile;
  const int col = threadIdx.x % kTile, row0 = threadIdx.x / kTile;
  const Column<TIn> ci(a, ti * kTile + col), cj(a, tj * kTile + col);
  TS ra[kLoads], rb[kLoads];  // next chunk, fetched while the current one is multiplied
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t row = k0 + row0 + kRowStep * u;
      const bool keep = row < stop && (a.mask == nullptr || a.mask[row * a.stride_m]);
      ra[u] = ci.template at<TS, M>(a, row, keep);
      if (!diag) rb[u] = cj.template at<TS, M>(a, row, keep);
    }
  };

  std::conditional_t<M == Mode::kFma, FmaTile, WmmaTile<TS, M>> tile;
  if (start < stop) fetch(start);
  for (int64_t k0 = start; k0 < stop; k0 += kChunk) {
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      As[row0 + kRowStep * u][col] = ra[u];
      if (!diag) Bs[row0 + kRowStep * u][col] = rb[u];
    }
    __syncthreads();
    if (k0 + kChunk < stop) fetch(k0 + kChunk);
    tile.step(As, Bp);
  }
  tile.store(a.ws + int64_t(blockIdx.x) * kTile * kTile);
}

// Block (split s, pair p) = blockIdx.x = s * n_pairs + p: partial tile of pair pair0 + p over the
// split's rows.
template <typename TIn, typename TS, Mode M>
__global__ void __launch_bounds__(kThreads) partial_tiles_kernel(Args a) {
#if !KK_SM80
  if constexpr (kNeedsSm80<TS, M>) {
    __trap();
  } else
#endif
  {
    partial_tile<TIn, TS, M>(a);
  }
}

// Block (pair p, sub-tile): C[r, c] += scale * sum_s ws[s, p, r, c] for r >= c of pair pair0 + p,
// in split order, then C[c, r] = C[r, c] for r > c through a shared transpose (coalesced both ways).
__global__ void __launch_bounds__(kSub * 8) reduce_mirror_kernel(const float* ws, float* C, int64_t e,
                                                                 int64_t pair0, int64_t n_pairs,
                                                                 int64_t n_splits, float scale) {
  __shared__ float t[kSub][kSub + 1];
  int64_t ti, tj;
  pair_of(pair0 + blockIdx.x, ti, tj);
  const int r0 = blockIdx.y / (kTile / kSub) * kSub, c0 = blockIdx.y % (kTile / kSub) * kSub;
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int r = ty; r < kSub; r += 8) {
    const int64_t gr = ti * kTile + r0 + r, gc = tj * kTile + c0 + tx;
    float v = 0.f;
    if (gr < e && gr >= gc) {
      float sum = 0.f;
      for (int64_t s = 0; s < n_splits; ++s)
        sum += ws[((s * n_pairs + blockIdx.x) * kTile + r0 + r) * kTile + c0 + tx];
      v = C[gr * e + gc] + scale * sum;
      C[gr * e + gc] = v;
    }
    t[r][tx] = v;
  }
  __syncthreads();
  for (int c = ty; c < kSub; c += 8) {
    const int64_t gr = ti * kTile + r0 + tx, gc = tj * kTile + c0 + c;
    if (gr < e && gr > gc) C[gc * e + gr] = t[tx][c];
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K factor minimizing a rough cost in chunk-times: waves * (chunks per split + 16 to write
// the partial tile) + splits * n_pairs / 8 to reduce them; at most max_tiles partial tiles.
int64_t num_splits(int64_t n_pairs, int64_t n_chunks, int64_t n_sm, int64_t max_tiles) {
  int64_t best = 1;
  double best_cost = -1;
  for (int64_t s = 1; s <= std::min(n_chunks, std::max<int64_t>(1, max_tiles / n_pairs)); ++s) {
    const int64_t waves = cdiv(n_pairs * s, n_sm);
    const double cost = double(waves * (cdiv(n_chunks, s) + 16)) + double(s * n_pairs) / 8;
    if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}

template <typename TIn, typename TS, Mode M>
void launch_partial(const Args& a, int64_t blocks, cudaStream_t stream) {
  partial_tiles_kernel<TIn, TS, M><<<blocks, kThreads, 0, stream>>>(a);
}

}  // namespace

at::Tensor covariance_update(at::Tensor C, const at::Tensor& X, const std::optional<at::Tensor>& mask,
                             bool append_ones, double scale) {
  TORCH_CHECK(C.is_cuda() && C.scalar_type() == at::kFloat && C.dim() == 2 && C.is_contiguous(),
              "covariance_update: C must be a contiguous 2-D float32 CUDA tensor, got ", C.scalar_type(), " ",
              C.sizes(), " on ", C.device());
  TORCH_CHECK(X.device() == C.device() && X.dim() == 2, "covariance_update: X must be 2-D on ", C.device(),
              ", got ", X.sizes(), " on ", X.device());
  const auto dtype = X.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "covariance_update: X must be float16, bfloat16 or float32, got ", dtype);
  const int64_t n = X.size(0), d = X.size(1), e = d + (append_ones ? 1 : 0);
  TORCH_CHECK(C.size(0) == e && C.size(1) == e, "covariance_update: C must be (", e, ", ", e, ") for X ",
              X.sizes(), append_ones ? " with append_ones" : "", ", got ", C.sizes());
  if (mask.has_value()) {
    TORCH_CHECK(mask->device() == C.device() && mask->scalar_type() == at::kBool && mask->dim() == 1 &&
                    mask->size(0) == n,
                "covariance_update: mask must be a 1-D bool tensor of ", n, " rows on ", C.device(), ", got ",
                mask->scalar_type(), " ", mask->sizes(), " on ", mask->device());
  }
  if (n == 0 || e == 0) return C;

  const c10::cuda::CUDAGuard guard(C.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_tiles = cdiv(e, kTile), n_pairs = n_tiles * (n_tiles + 1) / 2, n_chunks = cdiv(n, kChunk);
  int n_sm = 0, major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, C.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, C.get_device()));
  const int64_t max_tiles = kWorkspaceBytes / (4 * kTile * kTile);
  int64_t splits = num_splits(n_pairs, n_chunks, n_sm, max_tiles);
  const int64_t rows_per_split = cdiv(n_chunks, splits) * kChunk;
  splits = cdiv(n, rows_per_split);
  // Pairs per launch: all of them where their partial tiles fit the workspace (always when split),
  // else batches of a multiple of the SM count (whole waves).
  int64_t batch = std::min(n_pairs, std::max<int64_t>(1, max_tiles / splits));
  if (batch < n_pairs && batch >= n_sm) batch -= batch % n_sm;
  const at::Tensor ws = at::empty({splits, batch, kTile, kTile}, C.options());

  Args a{X.data_ptr(),
         mask.has_value() ? mask->data_ptr<bool>() : nullptr,
         ws.data_ptr<float>(),
         n,
         d,
         X.stride(0),
         X.stride(1),
         mask.has_value() ? mask->stride(0) : 0,
         0,
         0,
         rows_per_split,
         append_ones};
  const bool sm80 = major >= 8;  // bf16 and tf32 WMMA: else FMA, exact fp32 products
  const auto precision = at::globalContext().float32MatmulPrecision();
  for (int64_t p0 = 0; p0 < n_pairs; p0 += batch) {
    a.pair0 = p0;
    a.n_pairs = std::min(batch, n_pairs - p0);
    const int64_t blocks = splits * a.n_pairs;
    if (dtype == at::kHalf) {
      launch_partial<__half, __half, Mode::kWmma16>(a, blocks, stream);
    } else if (dtype == at::kBFloat16) {
      if (sm80) launch_partial<__nv_bfloat16, __nv_bfloat16, Mode::kWmma16>(a, blocks, stream);
      else launch_partial<__nv_bfloat16, float, Mode::kFma>(a, blocks, stream);
    } else if (precision == at::Float32MatmulPrecision::HIGHEST || !sm80) {
      launch_partial<float, float, Mode::kFma>(a, blocks, stream);
    } else if (precision == at::Float32MatmulPrecision::HIGH) {
      launch_partial<float, float, Mode::kWmmaTf32>(a, blocks, stream);
    } else {
      launch_partial<float, __nv_bfloat16, Mode::kWmma16>(a, blocks, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_mirror_kernel<<<dim3(a.n_pairs, (kTile / kSub) * (kTile / kSub)), dim3(kSub, 8), 0, stream>>>(
        ws.data_ptr<float>(), C.data_ptr<float>(), e, p0, a.n_pairs, splits, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return C;
}
