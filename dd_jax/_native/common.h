// What the FFI kernels (conv.cc, dense.cc) share: 512-bit registers through GCC's vector
// extension, the intra-op thread pool's parallel loop, and the leading axes of a call (ffi_call's
// vmap_method "expand_dims": one per vmap, each operand's of the output's size or 1, shared).
#ifndef DD_JAX_NATIVE_COMMON_H_
#define DD_JAX_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace dd_jax_native {

template <typename T>
struct Reg;  // one 512-bit register of T (GCC splits it on narrower machines), its comparison
             // masks and its lanes as bytes
template <>
struct Reg<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t mask __attribute__((vector_size(64)));
  typedef int8_t bytes __attribute__((vector_size(16)));
};
template <>
struct Reg<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t mask __attribute__((vector_size(64)));
  typedef int8_t bytes __attribute__((vector_size(8)));
};
template <typename T>
using Vec = typename Reg<T>::type;
template <typename T>
using Mask = typename Reg<T>::mask;
template <typename T>
constexpr int kLanes = 64 / sizeof(T);
template <typename T, int NB>
constexpr int kRegsPerBlock = NB / kLanes<T>;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof v); }

// The sum of v's lanes, pairwise: lanes l and l + half, then the halves of the halves (four
// rounds of independent adds rather than one chain of kLanes).
template <typename T>
inline T lane_sum(Vec<T> v) {
  T t[kLanes<T>];
  std::memcpy(t, &v, sizeof v);
  for (int half = kLanes<T> / 2; half > 0; half /= 2)
    for (int l = 0; l < half; ++l) t[l] += t[l + half];
  return t[0];
}

// Runs f(0) .. f(n-1) on the calling thread and the pool's threads. Items are claimed from a
// shared counter, so the caller finishes the work alone if the pool is busy (no deadlock when
// the caller is itself a pool thread); late helpers find nothing left and touch nothing.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Where each operand's data for item n of the leading axes starts: `offsets[n]` elements in.
// An operand not batched along an axis (size 1 there) is shared by all of its items.
struct Operand {
  std::vector<int64_t> offsets;
};


// The leading axes of a call: the output's leading dims; every operand's, checked against them.
struct Lead {
  std::vector<int64_t> dims;  // the output's leading dims
  int64_t count = 1;          // their product: the items one call computes

  Lead(ffi::Span<const int64_t> out, size_t rank) : dims(out.begin(), out.end() - rank) {
    for (int64_t d : dims) count *= d;
  }

  // The offsets of an operand of dims `d`, trailing `rank` axes per item; false if its leading
  // axes are not the output's (or 1).
  bool operand(ffi::Span<const int64_t> d, size_t rank, Operand& op) const {
    if (d.size() != dims.size() + rank) return false;
    int64_t item = 1;
    for (size_t k = dims.size(); k < d.size(); ++k) item *= d[k];
    op.offsets.assign(count, 0);
    for (int64_t n = 0; n < count; ++n) {
      int64_t rest = n, stride = item, offset = 0;
      for (size_t k = dims.size(); k-- > 0;) {
        if (d[k] != 1 && d[k] != dims[k]) return false;
        if (d[k] != 1) offset += (rest % dims[k]) * stride;
        stride *= d[k];
        rest /= dims[k];
      }
      op.offsets[n] = offset;
    }
    return true;
  }
};

inline ffi::Unexpected<ffi::Error> invalid(const char* message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(message));
}

// The trailing `rank` dims of d.
inline ffi::Span<const int64_t> trailing(ffi::Span<const int64_t> d, size_t rank) {
  return ffi::Span<const int64_t>(d.end() - rank, rank);
}

// Calls f(std::integral_constant<int, n>{}) for a run-time 1 <= n <= N: the register tiles'
// sizes are template parameters, so that their accumulators stay in registers.
template <int N, typename F>
inline void with_static(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_static<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

}  // namespace dd_jax_native

#endif  // DD_JAX_NATIVE_COMMON_H_
