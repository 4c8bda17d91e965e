// One fused Clippy AdaGrad step of a row-sparse gradient on the CPU (see _sparse_kernel.py).
//
// Semantics: exactly those of the dense step with a gradient that is zero on every untouched
// row. Duplicate ids are summed, sigma is the minimum of bound / |delta| over the touched rows
// (0/0 counts as 1), and only the touched rows of the weight and the accumulator change.
//
// Work: sequential passes over the ids (each distinct row gets a slot; `slots` is an int32
// array of at least the table's row count, reset to -1 on exit; stale entries are harmless, a
// slot counts only where it points back at its id), then two parallel
// passes over the distinct rows: (A) sum duplicates, compute each delta, write the accumulator
// (acc + g^2 needs no sigma) and reduce sigma; (B) w - delta * sigma on the same rows (and the
// accumulator there only under clip_accumulator_update, whose increment needs sigma).
// No temporaries proportional to the table; the duplicate sums go to `scratch`, grown only when
// too small. The arithmetic is the dense eager step's, operation for operation:
// 1 / sqrt(acc + eps), (g * lr) * p, |w| * rel + abs [+ p * acc_rel], bound / |delta|, with a
// fused multiply-add exactly where ATen's kernels use one (addcmul_ for acc += g * g and
// w -= delta * sigma, add_ with alpha for the acc_rel term); the build turns contraction off
// everywhere else. On distinct ids the result was bit-for-bit the dense step's (torch 2.13).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename T>
struct Hyper {
  T lr, eps, rel, acc_rel, abs_t;
  bool has_acc_rel, clip_acc, standard;
};

// Pass A for one element: stores delta and returns min(m, bound / |delta|). Only an element
// with bound < |delta| can bring sigma below 1 (bound >= |delta| rounds to a ratio >= 1, and
// 0/0, NaN and inf/inf never count), so only those take the division: sigma is the same as the
// dense step's min(1, min_i bound_i / |delta_i|), bit for bit.
template <typename T>
inline T element_delta_min(T w, T g, T a, T* acc_out, T* delta_out, const Hyper<T>& h, T m) {
  if (h.standard) a = std::fma(g, g, a);
  const T p = T(1) / std::sqrt(a + h.eps);
  const T delta = (g * h.lr) * p;
  *delta_out = delta;
  if (!h.clip_acc) *acc_out = h.standard ? a : std::fma(g, g, a);  // needs no sigma
  T bound = std::abs(w) * h.rel + h.abs_t;
  if (h.has_acc_rel) bound = std::fma(p, h.acc_rel, bound);
  const T ad = std::abs(delta);
  return bound < ad ? std::min(m, bound / ad) : m;
}

template <typename T>
T row_delta_min(const T* w, const T* g, T* acc, T* dout, int64_t d, const Hyper<T>& h, T m) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V lr(h.lr), eps(h.eps), rel(h.rel), acc_rel(h.acc_rel), abs_t(h.abs_t), one(T(1));
  V vm(m);
  int64_t i = 0;
  for (; i + L <= d; i += L) {
    const V gv = V::loadu(g + i);
    V a = V::loadu(acc + i);
    if (h.standard) a = at::vec::fmadd(gv, gv, a);
    const V p = one / (a + eps).sqrt();
    const V delta = (gv * lr) * p;
    delta.store(dout + i);
    if (!h.clip_acc) (h.standard ? a : at::vec::fmadd(gv, gv, a)).store(acc + i);
    V bound = V::loadu(w + i).abs() * rel + abs_t;
    if (h.has_acc_rel) bound = at::vec::fmadd(p, acc_rel, bound);
    const V ad = delta.abs();
    const V clipped = bound < ad;  // all-ones lanes where the element would be clipped
    if (clipped.zero_mask() != (1 << L) - 1) {  // some lane is clipped
      vm = at::vec::minimum(vm, V::blendv(one, bound / ad, clipped));
    }
  }
  T lanes[L];
  vm.store(lanes);
  for (int64_t k = 0; k < L; ++k) m = std::min(m, lanes[k]);
  for (; i < d; ++i) m = element_delta_min(w[i], g[i], acc[i], acc + i, dout + i, h, m);
  return m;
}

// Pass B for one row: w - delta * sigma from pass A's delta and, with clip_accumulator_update,
// the accumulator's increment (sigma * g)^2 (otherwise pass A has written the accumulator:
// acc + g^2 needs no sigma).
template <typename T>
void row_update(T* w, const T* g, T* acc, const T* delta, int64_t d, const T sigma,
                const Hyper<T>& h) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const V s(sigma);
  int64_t i = 0;
  for (; i + L <= d; i += L) {
    if (h.clip_acc) {
      const V sg = V::loadu(g + i) * s;
      at::vec::fmadd(sg, sg, V::loadu(acc + i)).store(acc + i);
    }
    at::vec::fmadd(V::loadu(delta + i).neg(), s, V::loadu(w + i)).store(w + i);
  }
  for (; i < d; ++i) {
    if (h.clip_acc) {
      const T sg = g[i] * sigma;
      acc[i] = std::fma(sg, sg, acc[i]);
    }
    w[i] = std::fma(-delta[i], sigma, w[i]);
  }
}

// The touched rows are scattered over tables far larger than the caches: without a prefetch each
// row's first load waits for memory while the long sqrt/div chain of the previous row holds
// the out-of-order window. Ask for the rows PREFETCH_AHEAD slots ahead, every cache line.
constexpr int64_t PREFETCH_AHEAD = 8;

template <typename T, int RW>
inline void prefetch_row(const T* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, RW, 3);
}

template <typename T>
at::Tensor step_impl(at::Tensor& w, at::Tensor& acc, const at::Tensor& ids, const at::Tensor& vals,
                     at::Tensor& slots, at::Tensor& scratch, const Hyper<T>& h) {
  const int64_t n_table = w.size(0);
  const int64_t nnz = ids.numel();
  const int64_t d = nnz == 0 ? 0 : vals.numel() / nnz;
  T* wp = w.data_ptr<T>();
  T* ap = acc.data_ptr<T>();
  const T* vp = vals.data_ptr<T>();
  const int64_t* idp = ids.data_ptr<int64_t>();
  int32_t* slot = slots.data_ptr<int32_t>();

  // Sequential pass over the ids: the slot of each distinct row (in order of first
  // appearance) and of each id, and each row's number of ids.
  std::vector<int64_t> rows, count;
  std::vector<int32_t> slot_of(nnz);
  rows.reserve(std::min<int64_t>(nnz, n_table));
  count.reserve(std::min<int64_t>(nnz, n_table));
  for (int64_t j = 0; j < nnz; ++j) {
    if (j + 16 < nnz) {  // the slot array is scattered too: fetch ahead (a bad id is harmless)
      const int64_t ahead = idp[j + 16];
      if (ahead >= 0 && ahead < n_table) __builtin_prefetch(slot + ahead, 0, 3);
    }
    const int64_t id = idp[j];
    if (id < 0 || id >= n_table) {
      for (const int64_t r : rows) slot[r] = -1;  // leave the slot array as it was given
      TORCH_CHECK(false, "ClippyAdagrad: sparse gradient row index ", id,
                  " is outside the parameter's ", n_table, " rows");
    }
    int32_t s = slot[id];
    // A sparse-set lookup: a slot counts only if it points back at this id, so a slot array
    // left dirty (by anything) can never send us outside this call's rows.
    if (s < 0 || s >= static_cast<int64_t>(rows.size()) || rows[s] != id) {
      s = static_cast<int32_t>(rows.size());
      slot[id] = s;
      rows.push_back(id);
      count.push_back(0);
    }
    count[s] += 1;
    slot_of[j] = s;
  }
  for (const int64_t r : rows) slot[r] = -1;
  const int64_t n_rows = static_cast<int64_t>(rows.size());

  // Each row's ids listed together, in order of appearance: order[start[s] .. start[s + 1]).
  // Known in advance, their gradient rows can be fetched ahead (a chain could not be).
  std::vector<int64_t> start(n_rows + 1, 0);
  for (int64_t s = 0; s < n_rows; ++s) start[s + 1] = start[s] + count[s];
  std::vector<int64_t> order(nnz), cursor(start.begin(), start.end() - 1);
  for (int64_t j = 0; j < nnz; ++j) order[cursor[slot_of[j]]++] = j;

  // Rows hit more than once get their summed gradient in scratch.
  std::vector<int64_t> dup(n_rows, -1);
  int64_t n_dup = 0;
  for (int64_t s = 0; s < n_rows; ++s)
    if (count[s] > 1) dup[s] = n_dup++;
  // scratch: the duplicate rows' sums, then every touched row's delta (pass A -> pass B).
  if (scratch.numel() < (n_dup + n_rows) * d) scratch.resize_({(n_dup + n_rows) * d});
  T* sp = scratch.data_ptr<T>();
  T* dp = sp + n_dup * d;

  // Pass A in one piece per thread, cut so that each piece has the same work: a row costs its
  // ids (the sums) plus about two for its own arithmetic. Frequent ids come first in order of
  // appearance, so equal numbers of rows would leave one thread with most of the sums.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));
  const int64_t pieces = n_rows < grain ? 1 : std::max(1, at::get_num_threads());
  std::vector<int64_t> cut(pieces + 1, n_rows);
  cut[0] = 0;
  {
    const int64_t total = nnz + 2 * n_rows;
    int64_t done = 0, k = 1;
    for (int64_t s = 0; s < n_rows && k < pieces; ++s) {
      done += count[s] + 2;
      while (k < pieces && done * pieces >= total * k) cut[k++] = s + 1;
    }
  }
  std::vector<T> mins(static_cast<size_t>(pieces), T(1));
  at::parallel_for(0, pieces, 1, [&](int64_t first_piece, int64_t end_piece) {
    for (int64_t piece = first_piece; piece < end_piece; ++piece) {
      const int64_t begin = cut[piece], end = cut[piece + 1];
      T m = T(1);
      for (int64_t s = begin; s < end; ++s) {
        if (s + PREFETCH_AHEAD < end) {
          const int64_t ahead = s + PREFETCH_AHEAD;
          prefetch_row<T, 0>(wp + rows[ahead] * d, d);
          prefetch_row<T, 1>(ap + rows[ahead] * d, d);
          prefetch_row<T, 0>(vp + order[start[ahead]] * d, d);
        }
        const int64_t* occ = order.data() + start[s];
        const T* g = vp + occ[0] * d;
        if (dup[s] >= 0) {
          T* sum = sp + dup[s] * d;
          std::copy(g, g + d, sum);
          for (int64_t k = 1; k < count[s]; ++k) {
            if (k + 4 < count[s]) prefetch_row<T, 0>(vp + occ[k + 4] * d, d);
            const T* v = vp + occ[k] * d;
            for (int64_t i = 0; i < d; ++i) sum[i] = sum[i] + v[i];
          }
          g = sum;
        }
        m = row_delta_min(wp + rows[s] * d, g, ap + rows[s] * d, dp + s * d, d, h, m);
      }
      mins[piece] = m;
    }
  });
  T sigma = T(1);
  for (const T m : mins) sigma = std::min(sigma, m);

  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (s + PREFETCH_AHEAD < end) {
        prefetch_row<T, 1>(wp + rows[s + PREFETCH_AHEAD] * d, d);
        if (h.clip_acc) prefetch_row<T, 1>(ap + rows[s + PREFETCH_AHEAD] * d, d);
      }
      const T* g = dup[s] >= 0 ? sp + dup[s] * d : vp + order[start[s]] * d;
      row_update(wp + rows[s] * d, g, ap + rows[s] * d, dp + s * d, d, sigma, h);
    }
  });
  return at::scalar_tensor(sigma, w.options());
}

at::Tensor sparse_step(at::Tensor w, at::Tensor acc, at::Tensor ids, at::Tensor vals,
                       at::Tensor slots, at::Tensor scratch, double lr, double eps, double rel,
                       double acc_rel, double abs_t, bool clip_acc, bool standard) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && acc.is_contiguous() &&
                  vals.is_contiguous() && ids.is_contiguous(),
              "mtl_clippy sparse_step: CPU tensors, contiguous");
  TORCH_CHECK(acc.sizes() == w.sizes() && acc.scalar_type() == w.scalar_type() &&
                  vals.scalar_type() == w.scalar_type() && scratch.scalar_type() == w.scalar_type(),
              "mtl_clippy sparse_step: accumulator, values and scratch must match the weight");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "ids: int64, one dimension");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.numel() >= w.size(0),
              "slots: int32, at least one per row");
  TORCH_CHECK(vals.size(0) == ids.numel() && vals.numel() == ids.numel() * (w.numel() / std::max<int64_t>(w.size(0), 1)),
              "values: one row of the weight's width per id");
  at::Tensor sigma;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "mtl_clippy_sparse_step", [&] {
    const Hyper<scalar_t> h{static_cast<scalar_t>(lr), static_cast<scalar_t>(eps),
                            static_cast<scalar_t>(rel), static_cast<scalar_t>(acc_rel),
                            static_cast<scalar_t>(abs_t), acc_rel != 0.0, clip_acc, standard};
    sigma = step_impl<scalar_t>(w, acc, ids, vals, slots, scratch, h);
  });
  return sigma;
}

}  // namespace

TORCH_LIBRARY(mtl_clippy_sparse, m) {
  m.def(
      "sparse_step(Tensor(a!) w, Tensor(b!) acc, Tensor ids, Tensor vals, Tensor(c!) slots, "
      "Tensor(d!) scratch, float lr, float eps, float rel, float acc_rel, float abs_t, "
      "bool clip_acc, bool standard) -> Tensor");
  m.impl("sparse_step", c10::DispatchKey::CPU, &sparse_step);
}
