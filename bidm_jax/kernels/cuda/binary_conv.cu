// W1A1 inference kernels for NVIDIA GPUs (sm_80, sm_90), exposed as XLA FFI handlers:
//
//   BidmSignPack   x (..., C) f32/bf16/f16, tau (C,) same dtype -> (..., ceil(C/32)) u32
//                  bit c of the pixel's words is x[c] + tau[c] >= 0, rounded in x's dtype
//                  (layers/packed.py: activation_bits then pack_bits).
//   BidmBinaryConv x words (B, H, W, Cw) u32, tap-aligned weight words (Cout, Kp) u32,
//                  per-tap weight popcounts (Cout, kh*kw) s32 -> dot (B, Ho, Wo, Cout) s32,
//                  the +-1 convolution over the taps inside the image (zero padding exact).
//
// The layout and the arithmetic are those of layers/packed.py (sign_conv, impl='popcount');
// docs/packed.md, section "CUDA kernel", explains the design. Python side: kernels/binary_cuda.py.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Sign and pack: one warp per output word, lane i reads channel 32 * word + i (coalesced) and
// the ballot is the word, bit i = lane i, as pack_bits' little-endian order.

// x + tau >= 0 with the sum rounded to the storage type, as XLA computes `x + tau` in that dtype.
__device__ __forceinline__ bool NonNegative(float x, float tau) { return x + tau >= 0.f; }

__device__ __forceinline__ bool NonNegative(__nv_bfloat16 x, __nv_bfloat16 tau) {
  float sum = __bfloat162float(x) + __bfloat162float(tau);
  return __bfloat162float(__float2bfloat16_rn(sum)) >= 0.f;
}

__device__ __forceinline__ bool NonNegative(__half x, __half tau) {
  float sum = __half2float(x) + __half2float(tau);
  return __half2float(__float2half_rn(sum)) >= 0.f;
}

template <typename T>
__global__ void SignPackKernel(const T* __restrict__ x, const T* __restrict__ tau,
                               uint32_t* __restrict__ out, int64_t rows, int channels,
                               int words) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= rows * words) return;  // whole warps leave together: the ballot below is safe
  const int64_t row = warp / words;
  const int c = static_cast<int>(warp - row * words) * 32 + lane;
  const bool bit = c < channels && NonNegative(x[row * channels + c], tau[c]);
  const uint32_t word = __ballot_sync(0xffffffffu, bit);
  if (lane == 0) out[warp] = word;
}

template <typename T>
void LaunchSignPack(cudaStream_t stream, const void* x, const void* tau, uint32_t* out,
                    int64_t rows, int channels, int words) {
  constexpr int kThreads = 256;
  const int64_t threads = rows * words * 32;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  SignPackKernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(tau), out, rows, channels, words);
}

// ---------------------------------------------------------------------------------------------
// Binary convolution as an implicit GEMM: M = B * Ho * Wo output pixels, N = Cout, K = kh * kw
// taps of Cw words. A block computes a kBM x kBN tile with 8 warps (4 along M, 2 along N), each
// warp 32 x 32 with m16n8k256 b1 MMAs; K advances one 256-bit chunk (8 words) at a time through
// double-buffered shared memory, the next chunk's global loads in flight during the MMAs.
//
// The MMA gives popc(A & W). Out-of-image taps load as 0 words, so the +-1 dot over the valid
// taps V of a pixel is 4 popc(A & W) - 2 popc(A) - 2 popc(W & M) + |V| Cin, where popc(A) is
// summed by the threads that load A, and popc(W & M) = popc(W) minus the per-tap weight counts
// of the pixel's invalid taps (none inside the image).

constexpr int kBM = 128;
constexpr int kBN = 64;
constexpr int kThreads = 256;
constexpr int kChunkWords = 8;      // 256 bits: the K of one MMA
constexpr int kStride = 12;         // words per shared row: the fragment reads hit 32 banks
constexpr int kMaxTaps = 32;        // invalid taps are a 32-bit mask

struct ConvShape {
  int h, w, cw;                     // input pixels and words per pixel
  int ho, wo, cout;
  int kh, kw, stride, pad_top, pad_left, cin;
  int padded_words;                 // Kp: weight words per output channel, a multiple of 8
  int64_t m;                        // B * Ho * Wo
};

__device__ __forceinline__ void MmaAndPopc(int (&acc)[4], const uint32_t (&a)[4],
                                           const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Walks the K words of one output pixel's im2col row: word k is word c of tap (dy, dx).
struct TapCursor {
  int dy, dx, c;

  __device__ void Start(int k, const ConvShape& s) {
    const int tap = k / s.cw;
    c = k - tap * s.cw;
    dy = tap / s.kw;
    dx = tap - dy * s.kw;
  }

  __device__ __forceinline__ void Advance(int words, const ConvShape& s) {
    c += words;
    while (c >= s.cw) {
      c -= s.cw;
      if (++dx == s.kw) {
        dx = 0;
        ++dy;
      }
    }
  }

  // The word's offset in x, or -1 past K, outside the image, or for a row past M.
  __device__ __forceinline__ int64_t Offset(int64_t pixel0, int iy0, int ix0,
                                            const ConvShape& s) const {
    const int iy = iy0 + dy, ix = ix0 + dx;
    if (pixel0 < 0 || dy >= s.kh || iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) return -1;
    return (pixel0 + static_cast<int64_t>(iy) * s.w + ix) * s.cw + c;
  }
};

// kVec: Cw % 4 == 0 and x 16-byte aligned, so a thread's 4 words of a chunk are one tap's and
// one 16-byte load.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    BinaryConvKernel(const uint32_t* __restrict__ x, const uint32_t* __restrict__ wbits,
                     const int* __restrict__ wtap, int* __restrict__ out, ConvShape s) {
  __shared__ __align__(16) uint32_t a_tile[2][kBM][kStride];
  __shared__ __align__(16) uint32_t b_tile[2][kBN][kStride];
  __shared__ int row_base[kBM];       // -2 popc(A) + |V| Cin
  __shared__ uint32_t row_invalid[kBM];
  __shared__ int col_pop[kBN];        // popc(W) of the output channel

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const int taps = s.kh * s.kw;

  // A loads: thread -> (row, 4-word quarter) of each chunk, the same row for the whole K.
  const int a_row = tid >> 1, a_quarter = tid & 1;
  const int64_t m = m0 + a_row;
  int64_t pixel0 = -1;
  int iy0 = 0, ix0 = 0;
  if (m < s.m) {
    const int64_t hw = static_cast<int64_t>(s.ho) * s.wo;
    const int64_t b = m / hw;
    const int rem = static_cast<int>(m - b * hw);
    const int oy = rem / s.wo, ox = rem - oy * s.wo;
    iy0 = oy * s.stride - s.pad_top;
    ix0 = ox * s.stride - s.pad_left;
    pixel0 = b * s.h * s.w;
  }
  TapCursor cursor;
  cursor.Start(a_quarter * 4, s);

  // B loads: threads 0..127 -> (output channel, 4-word quarter); Kp is a multiple of 8.
  const int b_col = (tid >> 1) & (kBN - 1), b_quarter = tid & 1;
  const bool b_loader = tid < 2 * kBN;
  const int n_load = n0 + b_col;
  const uint4* b_src = reinterpret_cast<const uint4*>(
      wbits + static_cast<int64_t>(n_load) * s.padded_words + b_quarter * 4);

  uint4 a_next, b_next = make_uint4(0, 0, 0, 0);
  int a_pop = 0;

  auto load_chunk = [&](int chunk) {
    if (kVec) {
      const int64_t off = cursor.Offset(pixel0, iy0, ix0, s);
      a_next = off >= 0 ? __ldg(reinterpret_cast<const uint4*>(x + off)) : make_uint4(0, 0, 0, 0);
      cursor.Advance(kChunkWords, s);
    } else {
      uint32_t v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t off = cursor.Offset(pixel0, iy0, ix0, s);
        v[j] = off >= 0 ? __ldg(x + off) : 0u;
        cursor.Advance(1, s);
      }
      cursor.Advance(kChunkWords - 4, s);
      a_next = make_uint4(v[0], v[1], v[2], v[3]);
    }
    if (b_loader && n_load < s.cout) b_next = __ldg(b_src + chunk * (kChunkWords / 4));
  };
  auto store_chunk = [&](int buf) {
    *reinterpret_cast<uint4*>(&a_tile[buf][a_row][a_quarter * 4]) = a_next;
    a_pop += __popc(a_next.x) + __popc(a_next.y) + __popc(a_next.z) + __popc(a_next.w);
    if (b_loader) *reinterpret_cast<uint4*>(&b_tile[buf][b_col][b_quarter * 4]) = b_next;
  };

  // Per-pixel valid taps, and per-channel weight counts, for the epilogue.
  if (a_quarter == 0) {
    uint32_t invalid = 0;
    int valid = 0;
    for (int t = 0; t < taps; ++t) {
      const int dy = t / s.kw, iy = iy0 + dy, ix = ix0 + t - dy * s.kw;
      const bool inside = iy >= 0 && iy < s.h && ix >= 0 && ix < s.w;
      valid += inside;
      invalid |= static_cast<uint32_t>(!inside) << t;
    }
    row_invalid[a_row] = invalid;
    row_base[a_row] = valid * s.cin;
  }
  if (tid < kBN) {
    int total = 0;
    if (n0 + tid < s.cout) {
      for (int t = 0; t < taps; ++t) total += wtap[static_cast<int64_t>(n0 + tid) * taps + t];
    }
    col_pop[tid] = total;
  }

  int acc[2][4][4] = {};
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int group = lane >> 2, quad = lane & 3;
  const int chunks = s.padded_words / kChunkWords;

  load_chunk(0);
  store_chunk(0);
  __syncthreads();
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int buf = chunk & 1;
    if (chunk + 1 < chunks) load_chunk(chunk + 1);
    uint32_t a[2][4], b[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = warp_m * 32 + i * 16 + group;
      a[i][0] = a_tile[buf][r][quad];
      a[i][1] = a_tile[buf][r + 8][quad];
      a[i][2] = a_tile[buf][r][quad + 4];
      a[i][3] = a_tile[buf][r + 8][quad + 4];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = warp_n * 32 + j * 8 + group;
      b[j][0] = b_tile[buf][c][quad];
      b[j][1] = b_tile[buf][c][quad + 4];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) MmaAndPopc(acc[i][j], a[i], b[j]);
    }
    if (chunk + 1 < chunks) store_chunk(buf ^ 1);
    __syncthreads();
  }

  // The two threads of a row hold its halves of popc(A).
  a_pop += __shfl_xor_sync(0xffffffffu, a_pop, 1);
  if (a_quarter == 0) row_base[a_row] -= 2 * a_pop;
  __syncthreads();

  // Accumulator (i, j, e): row group (+8 for e >= 2), column 2 quad + (e & 1) of the 16x8 tile.
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_m * 32 + i * 16 + group + half * 8;
      const int64_t row = m0 + r;
      if (row >= s.m) continue;
      const int base = row_base[r];
      const uint32_t invalid = row_invalid[r];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = warp_n * 32 + j * 8 + quad * 2 + e;
          const int n = n0 + c;
          if (n >= s.cout) continue;
          int wm = col_pop[c];
          for (uint32_t rest = invalid; rest; rest &= rest - 1) {
            wm -= __ldg(wtap + static_cast<int64_t>(n) * taps + __ffs(rest) - 1);
          }
          out[row * s.cout + n] = 4 * acc[i][j][half * 2 + e] + base - 2 * wm;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// FFI handlers.

ffi::Error LaunchError(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err));
}

ffi::Error SignPackImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer tau,
                        ffi::ResultBuffer<ffi::U32> out) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("sign_pack: x needs a channel axis");
  const int64_t channels = dims.back();
  const int64_t words = (channels + 31) / 32;
  const int64_t rows = channels ? x.element_count() / channels : 0;
  if (tau.element_type() != x.element_type() || tau.element_count() != channels) {
    return ffi::Error::InvalidArgument("sign_pack: tau must be (C,) in x's dtype");
  }
  if (out->element_count() != rows * words) {
    return ffi::Error::InvalidArgument("sign_pack: output must be (..., ceil(C / 32))");
  }
  if (rows * words == 0) return ffi::Error::Success();
  uint32_t* dst = out->typed_data();
  switch (x.element_type()) {
    case ffi::F32:
      LaunchSignPack<float>(stream, x.untyped_data(), tau.untyped_data(), dst, rows, channels,
                            words);
      break;
    case ffi::BF16:
      LaunchSignPack<__nv_bfloat16>(stream, x.untyped_data(), tau.untyped_data(), dst, rows,
                                    channels, words);
      break;
    case ffi::F16:
      LaunchSignPack<__half>(stream, x.untyped_data(), tau.untyped_data(), dst, rows, channels,
                             words);
      break;
    default:
      return ffi::Error::InvalidArgument("sign_pack: x must be float32, bfloat16 or float16");
  }
  return LaunchError("sign_pack launch");
}

ffi::Error BinaryConvImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> x,
                          ffi::Buffer<ffi::U32> wbits, ffi::Buffer<ffi::S32> wtap,
                          ffi::ResultBuffer<ffi::S32> out, int64_t kh, int64_t kw, int64_t cin,
                          int64_t stride, int64_t pad_top, int64_t pad_left) {
  const auto xd = x.dimensions(), wd = wbits.dimensions(), td = wtap.dimensions();
  const auto od = out->dimensions();
  if (xd.size() != 4 || wd.size() != 2 || td.size() != 2 || od.size() != 4) {
    return ffi::Error::InvalidArgument("binary_conv: expected x (B,H,W,Cw), w (Cout,Kp), "
                                       "wtap (Cout,kh*kw), out (B,Ho,Wo,Cout)");
  }
  ConvShape s;
  s.h = static_cast<int>(xd[1]);
  s.w = static_cast<int>(xd[2]);
  s.cw = static_cast<int>(xd[3]);
  s.ho = static_cast<int>(od[1]);
  s.wo = static_cast<int>(od[2]);
  s.cout = static_cast<int>(od[3]);
  s.kh = static_cast<int>(kh);
  s.kw = static_cast<int>(kw);
  s.stride = static_cast<int>(stride);
  s.pad_top = static_cast<int>(pad_top);
  s.pad_left = static_cast<int>(pad_left);
  s.cin = static_cast<int>(cin);
  s.padded_words = static_cast<int>(wd[1]);
  s.m = od[0] * od[1] * od[2];
  const int64_t kwords = kh * kw * s.cw;
  if (od[0] != xd[0] || wd[0] != s.cout || td[0] != s.cout || td[1] != kh * kw) {
    return ffi::Error::InvalidArgument("binary_conv: batch or channel counts disagree");
  }
  if (kh < 1 || kw < 1 || kh * kw > kMaxTaps || stride < 1 || s.cw < 1 ||
      cin <= 32 * (s.cw - 1) || cin > 32 * s.cw) {
    return ffi::Error::InvalidArgument("binary_conv: bad kernel size, stride or Cin");
  }
  if (s.padded_words % kChunkWords || s.padded_words < kwords ||
      s.padded_words >= kwords + kChunkWords) {
    return ffi::Error::InvalidArgument("binary_conv: weight rows must hold kh*kw*Cw words, "
                                       "zero-padded to a multiple of 8");
  }
  if (reinterpret_cast<uintptr_t>(wbits.typed_data()) % 16) {
    return ffi::Error::InvalidArgument("binary_conv: weights must be 16-byte aligned");
  }
  if (s.m == 0 || s.cout == 0) return ffi::Error::Success();
  const dim3 grid(static_cast<unsigned>((s.m + kBM - 1) / kBM), (s.cout + kBN - 1) / kBN);
  const bool vec = s.cw % 4 == 0 && reinterpret_cast<uintptr_t>(x.typed_data()) % 16 == 0;
  if (vec) {
    BinaryConvKernel<true><<<grid, kThreads, 0, stream>>>(
        x.typed_data(), wbits.typed_data(), wtap.typed_data(), out->typed_data(), s);
  } else {
    BinaryConvKernel<false><<<grid, kThreads, 0, stream>>>(
        x.typed_data(), wbits.typed_data(), wtap.typed_data(), out->typed_data(), s);
  }
  return LaunchError("binary_conv launch");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BidmSignPack, SignPackImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::U32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BidmBinaryConv, BinaryConvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("cin")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
