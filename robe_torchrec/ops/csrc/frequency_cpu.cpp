// Frequency-aware ROBE, CPU: the per-step bookkeeping of FrequencyAwareRobeEmbeddingBagCollection
// in a few C++ calls instead of hundreds of small torch ops.
//
// * space_saving_update_many: SpaceSavingSketch.update (unweighted) for every table's sketch at
//   once. Bit-identical state to the Python update: same float32 operations in the same order
//   (monitored id: count + batch count; new id: batch count + floor, error 0 + floor, only when the
//   sketch is full and floor > 0), same order of the kept entries (count descending, id
//   ascending), same stale tail, total += n in float64.
// * hot_cold_split: one pass over the batch: per id, is it in its table's sorted hot ids? Cold
//   ids go to (ids, offsets, weights) for ROBE's kernels, hot ids to (slot, bag, weight) lists;
//   MEAN weights computed with the float32 operations of the module's torch path.
// * hot_pooled_add_ / hot_pooled_grad: the pooled gather of hot rows added into the ROBE output
//   in place, and its dense gradient, summed in the order index_add_ sums (id order), without the
//   [n, D] / [F*B, D] temporaries (at batch 2048 each is megabytes of fresh pages per step).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: a good spread for scrambled ids
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Open-addressing map int64 id -> candidate index, reused across sketches of one call.
struct IdMap {
  struct Slot {
    int64_t key;
    int32_t val;  // -1: empty
  };
  std::vector<Slot> slots;  // key and value side by side: one cache line per probe
  uint64_t mask = 0;

  void reset(size_t expected) {
    size_t cap = 16;
    while (cap < 2 * expected) cap <<= 1;
    slots.assign(cap, Slot{0, -1});
    mask = cap - 1;
  }
  // Index of id, inserting `fresh` if absent; sets inserted.
  int32_t find_or_insert(int64_t id, int32_t fresh, bool& inserted) {
    uint64_t h = mix64(static_cast<uint64_t>(id)) & mask;
    while (true) {
      Slot& sl = slots[h];
      if (sl.val < 0) {
        sl.key = id;
        sl.val = fresh;
        inserted = true;
        return fresh;
      }
      if (sl.key == id) {
        inserted = false;
        return sl.val;
      }
      h = (h + 1) & mask;
    }
  }
};

// Index of the last element <= x in sorted a[0:n] (n >= 1; 0 if every element is > x). Branch-free
// halving (compiles to conditional moves): the hot-id search is per id, on mostly random ids.
inline int64_t last_not_above(const int64_t* a, int64_t n, int64_t x) {
  const int64_t* base = a;
  while (n > 1) {
    const int64_t half = n / 2;
    base = (base[half] <= x) ? base + half : base;
    n -= half;
  }
  return base - a;
}

void check_cpu(const torch::Tensor& t, torch::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

struct Candidate {
  int64_t id;
  float count;
  float error;
};

void update_one(const int64_t* ids, const std::vector<std::pair<int64_t, int64_t>>& segments, int64_t n_batch,
                torch::Tensor& s_ids, torch::Tensor& s_counts, torch::Tensor& s_errors, torch::Tensor& s_size,
                torch::Tensor& s_total, IdMap& map, std::vector<Candidate>& cand, std::vector<int64_t>& batch_count,
                std::vector<uint8_t>& monitored) {
  const int64_t capacity = s_ids.numel();
  int64_t* sid = s_ids.data_ptr<int64_t>();
  float* scount = s_counts.data_ptr<float>();
  float* serr = s_errors.data_ptr<float>();
  const int64_t size = *s_size.data_ptr<int64_t>();
  float floor = 0.f;  // min_count(): the minimum count once the sketch is full
  if (size == capacity && size > 0) {
    floor = scount[0];
    for (int64_t i = 1; i < size; ++i) floor = std::min(floor, scount[i]);
  }
  map.reset(static_cast<size_t>(size + n_batch));
  cand.clear();
  batch_count.clear();
  monitored.clear();
  bool inserted = false;
  for (int64_t i = 0; i < size; ++i) {
    int32_t c = map.find_or_insert(sid[i], static_cast<int32_t>(cand.size()), inserted);
    if (inserted) {
      cand.push_back({sid[i], 0.f + scount[i], 0.f + serr[i]});
      batch_count.push_back(0);
      monitored.push_back(1);
    } else {  // a duplicate id would be summed by the Python path's index_add_
      cand[c].count += scount[i];
      cand[c].error += serr[i];
    }
  }
  for (const auto& seg : segments) {
    for (int64_t j = seg.first; j < seg.second; ++j) {
      int32_t c = map.find_or_insert(ids[j], static_cast<int32_t>(cand.size()), inserted);
      if (inserted) {
        cand.push_back({ids[j], 0.f, 0.f});
        batch_count.push_back(0);
        monitored.push_back(0);
      }
      ++batch_count[c];
    }
  }
  const size_t m = cand.size();
  for (size_t c = 0; c < m; ++c) {
    if (batch_count[c] > 0) cand[c].count += static_cast<float>(batch_count[c]);
    if (!monitored[c] && floor > 0.f) {
      cand[c].count += floor;
      cand[c].error += floor;
    }
  }
  auto before = [](const Candidate& a, const Candidate& b) {
    return a.count > b.count || (a.count == b.count && a.id < b.id);
  };
  const size_t k = std::min<size_t>(m, static_cast<size_t>(capacity));
  if (k < m) std::nth_element(cand.begin(), cand.begin() + k, cand.end(), before);
  std::sort(cand.begin(), cand.begin() + k, before);
  for (size_t i = 0; i < k; ++i) {
    sid[i] = cand[i].id;
    scount[i] = cand[i].count;
    serr[i] = cand[i].error;
  }
  *s_size.data_ptr<int64_t>() = static_cast<int64_t>(k);
  *s_total.data_ptr<double>() += static_cast<double>(n_batch);
}

}  // namespace

// ids [N] int64; bounds [F+1] int64 (feature f's ids are ids[bounds[f]:bounds[f+1]]);
// feature_sketch [F] int64 (index into the sketch lists, -1: not counted). Each sketch i is
// (ids [c] int64, counts [c] f32, errors [c] f32, size 0-dim int64, total 0-dim f64), updated in place.
void space_saving_update_many(const torch::Tensor& ids, const torch::Tensor& bounds, const torch::Tensor& feature_sketch,
                              std::vector<torch::Tensor> s_ids, std::vector<torch::Tensor> s_counts,
                              std::vector<torch::Tensor> s_errors, std::vector<torch::Tensor> s_size,
                              std::vector<torch::Tensor> s_total) {
  check_cpu(ids, torch::kInt64, "ids");
  check_cpu(bounds, torch::kInt64, "bounds");
  check_cpu(feature_sketch, torch::kInt64, "feature_sketch");
  const int64_t F = feature_sketch.numel();
  TORCH_CHECK(bounds.numel() == F + 1, "bounds must have ", F + 1, " entries, got ", bounds.numel());
  const size_t S = s_ids.size();
  TORCH_CHECK(s_counts.size() == S && s_errors.size() == S && s_size.size() == S && s_total.size() == S,
              "space_saving_update_many: sketch lists of different lengths");
  for (size_t i = 0; i < S; ++i) {
    check_cpu(s_ids[i], torch::kInt64, "sketch ids");
    check_cpu(s_counts[i], torch::kFloat32, "sketch counts");
    check_cpu(s_errors[i], torch::kFloat32, "sketch errors");
    check_cpu(s_size[i], torch::kInt64, "sketch size");
    check_cpu(s_total[i], torch::kFloat64, "sketch total");
    const int64_t c = s_ids[i].numel();
    TORCH_CHECK(c >= 1 && s_counts[i].numel() == c && s_errors[i].numel() == c && s_size[i].numel() == 1 &&
                    s_total[i].numel() == 1, "sketch ", i, ": inconsistent buffer shapes");
    const int64_t size = *s_size[i].data_ptr<int64_t>();
    TORCH_CHECK(size >= 0 && size <= c, "sketch ", i, ": size ", size, " outside [0, ", c, "]");
  }
  const int64_t* b = bounds.data_ptr<int64_t>();
  const int64_t* fs = feature_sketch.data_ptr<int64_t>();
  const int64_t N = ids.numel();
  std::vector<std::vector<std::pair<int64_t, int64_t>>> segments(S);
  std::vector<int64_t> n_batch(S, 0);
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(b[f] >= 0 && b[f] <= b[f + 1] && b[f + 1] <= N, "bounds must be non-decreasing within [0, ", N, "]");
    if (fs[f] < 0) continue;
    TORCH_CHECK(fs[f] < static_cast<int64_t>(S), "feature_sketch[", f, "] = ", fs[f], " but there are ", S, " sketches");
    segments[fs[f]].push_back({b[f], b[f + 1]});
    n_batch[fs[f]] += b[f + 1] - b[f];
  }
  const int64_t* id = ids.data_ptr<int64_t>();
#pragma omp parallel
  {
    IdMap map;
    std::vector<Candidate> cand;
    std::vector<int64_t> batch_count;
    std::vector<uint8_t> monitored;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(S); ++i) {
      if (n_batch[i] == 0) continue;  // an empty batch leaves the sketch (and its total) alone
      update_one(id, segments[i], n_batch[i], s_ids[i], s_counts[i], s_errors[i], s_size[i], s_total[i], map, cand,
                 batch_count, monitored);
    }
  }
}

// ids [N] int64, offsets [F*B+1] int64 (offsets[0] = 0, offsets[-1] = N), batch B;
// feature_table [F] int64 (hot table of feature f, -1: none); hot_ids [S] int64 (table t's sorted
// ids at [base[t], base[t] + size[t])), hot_slots [S] int32; feature_mean [F] bool;
// weights: [N] float32 or None (unweighted). Returns (cold_ids, cold_offsets, cold_weights,
// hot_slots [H] int64, hot_bags [H] int64, hot_weights [H] f32); cold_weights is None when
// there are no weights and no MEAN feature (as the torch path).
std::vector<torch::Tensor> hot_cold_split(const torch::Tensor& ids, const torch::Tensor& offsets, int64_t batch,
                                          const torch::Tensor& feature_table, const torch::Tensor& hot_ids,
                                          const torch::Tensor& hot_slots, const torch::Tensor& base,
                                          const torch::Tensor& size, const torch::Tensor& feature_mean,
                                          const c10::optional<torch::Tensor>& weights) {
  check_cpu(ids, torch::kInt64, "ids");
  check_cpu(offsets, torch::kInt64, "offsets");
  check_cpu(feature_table, torch::kInt64, "feature_table");
  check_cpu(hot_ids, torch::kInt64, "hot_ids");
  check_cpu(hot_slots, torch::kInt32, "hot_slots");
  check_cpu(base, torch::kInt64, "base");
  check_cpu(size, torch::kInt64, "size");
  check_cpu(feature_mean, torch::kBool, "feature_mean");
  const int64_t F = feature_table.numel();
  const int64_t N = ids.numel();
  TORCH_CHECK(batch >= 0, "batch must be >= 0");
  TORCH_CHECK(offsets.numel() == F * batch + 1, "offsets must have F*B+1 = ", F * batch + 1, " entries, got ",
              offsets.numel());
  TORCH_CHECK(feature_mean.numel() == F, "feature_mean must have ", F, " entries");
  TORCH_CHECK(hot_slots.numel() == hot_ids.numel(), "hot_slots and hot_ids differ in length");
  const int64_t T = base.numel();
  TORCH_CHECK(size.numel() == T, "base and size differ in length");
  const bool weighted = weights.has_value() && weights->defined();
  if (weighted) {
    check_cpu(*weights, torch::kFloat32, "weights");
    TORCH_CHECK(weights->numel() == N, "weights must have ", N, " entries");
  }
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[F * batch] == N, "offsets must run from 0 to the number of ids ", N);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* ft = feature_table.data_ptr<int64_t>();
  const int64_t* hid = hot_ids.data_ptr<int64_t>();
  const int32_t* hsl = hot_slots.data_ptr<int32_t>();
  const int64_t* tb = base.data_ptr<int64_t>();
  const int64_t* ts = size.data_ptr<int64_t>();
  const bool* fm = feature_mean.data_ptr<bool>();
  const float* w = weighted ? weights->data_ptr<float>() : nullptr;
  bool any_mean = false;
  for (int64_t f = 0; f < F; ++f) {
    any_mean = any_mean || fm[f];
    TORCH_CHECK(ft[f] < T, "feature_table[", f, "] = ", ft[f], " but there are ", T, " hot tables");
    if (ft[f] >= 0) {
      TORCH_CHECK(tb[ft[f]] >= 0 && ts[ft[f]] >= 0 && tb[ft[f]] + ts[ft[f]] <= hot_ids.numel(),
                  "hot table ", ft[f], " runs outside hot_ids");
    }
  }
  const bool cold_weighted = weighted || any_mean;
  auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  // written in place and narrowed at the end: no second copy of per-id lists
  torch::Tensor cold_ids = torch::empty({N}, i64), hot_slot = torch::empty({N}, i64), hot_bag = torch::empty({N}, i64);
  torch::Tensor hot_w = torch::empty({N}, f32);
  torch::Tensor cold_w = cold_weighted ? torch::empty({N}, f32) : torch::Tensor();
  int64_t* c_ids = cold_ids.data_ptr<int64_t>();
  int64_t* h_slot = hot_slot.data_ptr<int64_t>();
  int64_t* h_bag = hot_bag.data_ptr<int64_t>();
  float* h_w = hot_w.data_ptr<float>();
  float* c_w = cold_weighted ? cold_w.data_ptr<float>() : nullptr;
  int64_t nc = 0, nh = 0;
  torch::Tensor cold_offsets = torch::empty({F * batch + 1}, i64);
  int64_t* co = cold_offsets.data_ptr<int64_t>();
  co[0] = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t t = ft[f];
    const int64_t n_hot = t >= 0 ? ts[t] : 0;
    const int64_t* tid = n_hot ? hid + tb[t] : nullptr;
    const int32_t* tsl = n_hot ? hsl + tb[t] : nullptr;
    for (int64_t bb = f * batch; bb < (f + 1) * batch; ++bb) {
      const int64_t lo = off[bb], hi = off[bb + 1];
      TORCH_CHECK(lo <= hi, "offsets must be non-decreasing");
      const int64_t len = hi - lo;
      const int64_t c0 = nc, h0 = nh;
      // cold ids are written as found (weights below, once the bag's cold length is known)
      for (int64_t j = lo; j < hi; ++j) {
        if (n_hot) {
          const int64_t p = last_not_above(tid, n_hot, id[j]);
          if (tid[p] == id[j]) {
            h_slot[nh] = static_cast<int64_t>(tsl[p]);
            h_bag[nh] = bb;
            h_w[nh++] = w ? w[j] : 1.0f;
            continue;
          }
        }
        if (cold_weighted) c_w[nc] = w ? w[j] : 1.0f;
        c_ids[nc++] = id[j];
      }
      const int64_t cold_len = nc - c0;
      if (fm[f]) {  // MEAN bags keep dividing by their full length: cold ids weigh cold_len / len
        const float scale = static_cast<float>(cold_len) / static_cast<float>(std::max<int64_t>(len, 1));
        for (int64_t k = c0; k < nc; ++k) c_w[k] = w ? c_w[k] * scale : scale;
        const float inv = 1.0f / static_cast<float>(len);  // torch: h_w * reciprocal(len)
        for (int64_t k = h0; k < nh; ++k) h_w[k] = h_w[k] * inv;
      }
      co[bb + 1] = co[bb] + cold_len;
    }
  }
  return {cold_ids.narrow(0, 0, nc), cold_offsets, cold_weighted ? cold_w.narrow(0, 0, nc) : torch::Tensor(),
          hot_slot.narrow(0, 0, nh), hot_bag.narrow(0, 0, nh), hot_w.narrow(0, 0, nh)};
}

namespace {
void check_hot_lists(const torch::Tensor& slots, const torch::Tensor& bags, const torch::Tensor& weights) {
  check_cpu(slots, torch::kInt64, "slots");
  check_cpu(bags, torch::kInt64, "bags");
  check_cpu(weights, torch::kFloat32, "weights");
  TORCH_CHECK(bags.numel() == slots.numel() && weights.numel() == slots.numel(), "slots, bags, weights differ in length");
}
}  // namespace

// out [B, F*D] (the KeyedTensor layout; bag f*B + b is out[b, f*D:(f+1)*D]), in place:
// out[bag] += sum over i with bags[i] == bag, in i order, of rows[slots[i]] * weights[i] (the sum
// starts at 0, as index_add_ into zeros, and is added to out once). bags must be non-decreasing.
void hot_pooled_add_(torch::Tensor out, const torch::Tensor& rows, const torch::Tensor& slots, const torch::Tensor& bags,
                     const torch::Tensor& weights, int64_t batch) {
  check_cpu(rows, torch::kFloat32, "rows");
  check_cpu(out, torch::kFloat32, "out");
  TORCH_CHECK(rows.dim() == 2 && out.dim() == 2, "rows must be [slots, D] and out [B, F*D]");
  check_hot_lists(slots, bags, weights);
  const int64_t D = rows.size(1), R = rows.size(0), n = slots.numel();
  TORCH_CHECK(batch >= 1 || n == 0, "batch must be >= 1");
  TORCH_CHECK(n == 0 || (out.size(0) == batch && out.size(1) % D == 0), "out must be [batch, F*D]");
  const int64_t num_bags = n ? batch * (out.size(1) / D) : 0;
  const float* r = rows.data_ptr<float>();
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t* b = bags.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<float> acc(static_cast<size_t>(D));
  int64_t i = 0;
  while (i < n) {
    const int64_t bag = b[i];
    TORCH_CHECK(bag >= 0 && bag < num_bags, "hot bag ", bag, " out of range");
    TORCH_CHECK(i == 0 || bag > b[i - 1], "hot bags must be non-decreasing");
    std::fill(acc.begin(), acc.end(), 0.f);
    for (; i < n && b[i] == bag; ++i) {
      TORCH_CHECK(s[i] >= 0 && s[i] < R, "hot slot ", s[i], " out of range");
      const float* src = r + s[i] * D;
      const float wi = w[i];
      for (int64_t d = 0; d < D; ++d) acc[d] += src[d] * wi;
    }
    float* dst = o + (bag % batch) * out.size(1) + (bag / batch) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] += acc[d];
  }
}

// grad [num_slots, D]: grad[slots[i]] += grad_out[bag i] * weights[i], in i order (as index_add_),
// grad_out [B, F*D] in the KeyedTensor layout of hot_pooled_add_.
torch::Tensor hot_pooled_grad(const torch::Tensor& grad_out, const torch::Tensor& slots, const torch::Tensor& bags,
                              const torch::Tensor& weights, int64_t num_slots, int64_t dim, int64_t batch) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == torch::kFloat32 && grad_out.dim() == 2,
              "grad_out must be a CPU float32 [B, F*D] tensor");
  check_hot_lists(slots, bags, weights);
  const int64_t n = slots.numel();
  TORCH_CHECK(dim >= 1 && grad_out.size(1) % dim == 0, "grad_out's width must be a multiple of dim");
  TORCH_CHECK(n == 0 || grad_out.size(0) == batch, "grad_out must have batch rows");
  const int64_t num_bags = batch * (grad_out.size(1) / dim);
  torch::Tensor g = torch::zeros({num_slots, dim}, grad_out.options());
  const float* go = grad_out.data_ptr<float>();
  const int64_t rs = grad_out.stride(0), cs = grad_out.stride(1);
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t* b = bags.data_ptr<int64_t>();
  const float* w = weights.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < num_slots && b[i] >= 0 && b[i] < num_bags, "hot slot or bag out of range");
    const float* src = go + (b[i] % batch) * rs + (b[i] / batch) * dim * cs;
    float* dst = gp + s[i] * dim;
    const float wi = w[i];
    for (int64_t d = 0; d < dim; ++d) dst[d] += src[d * cs] * wi;
  }
  return g;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("space_saving_update_many", &space_saving_update_many, "SpaceSavingSketch.update of many sketches");
  m.def("hot_cold_split", &hot_cold_split, "split a batch into cold (ROBE) and hot (row) lookups");
  m.def("hot_pooled_add_", &hot_pooled_add_, "add the pooled hot rows into the output, in place");
  m.def("hot_pooled_grad", &hot_pooled_grad, "dense gradient of the hot rows");
}
