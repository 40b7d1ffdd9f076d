// safetensors (docs/interop.md): an 8-byte little-endian header length N, N bytes of JSON
// (padded with spaces to a multiple of 8), then the tensors' bytes. The reader applies the
// reference implementation's checks (header at most 100,000,000 bytes, offsets that tile the
// data section exactly, sizes consistent with dtype and shape) and refuses duplicate names and
// unknown fields as well. The writer lays files out as the reference writer does: tensors by
// descending dtype (in the reference's dtype order), then by name; __metadata__ first in the
// header.
#include <algorithm>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "io/file.h"
#include "io/formats.h"

namespace dpt {

namespace {

constexpr uint64_t kMaxHeader = 100000000;

// The reference's dtypes in its declaration order (the writer sorts by this, descending), with
// their sizes.
struct StDtype {
  const char* name;
  size_t size;
};
constexpr StDtype kDtypes[] = {{"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
                               {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
                               {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};

int dtype_rank(const std::string& name) {
  for (size_t i = 0; i < std::size(kDtypes); ++i)
    if (name == kDtypes[i].name) return int(i);
  return -1;
}

const char* st_name(DType t) {
  switch (t) {
    case DType::F32:
      return "F32";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::I64:
      return "I64";
  }
  DPT_THROW(InternalError, "unknown dtype");
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}

struct Entry {
  std::string name;
  int rank;
  Shape shape;
  uint64_t begin, end;
};

uint64_t non_negative(const nlohmann::json& v, const std::string& what, const std::string& path) {
  DPT_CHECK(v.is_number_unsigned(), FileError, path, ": ", what, " is not a non-negative integer");
  return v.get<uint64_t>();
}

}  // namespace

Checkpoint read_safetensors(const std::string& path) {
  ReadFile f(path);
  DPT_CHECK(f.size() >= 8, FileError, path, " is too small to be a safetensors file");
  unsigned char len[8];
  f.read(0, len, 8, "the header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
  DPT_CHECK(n <= kMaxHeader, FileError, path, ": the header claims ", n,
            " bytes, over safetensors' limit of ", kMaxHeader);
  DPT_CHECK(n <= uint64_t(f.size()) - 8, FileError, path, ": the header (", n,
            " bytes) runs past the end of the file (", f.size(), " bytes): truncated?");
  std::string header(n, '\0');
  f.read(8, header.data(), n, "the header");
  DPT_CHECK(valid_utf8(header), FileError, path, ": the header is not UTF-8");
  DPT_CHECK(!header.empty() && header[0] == '{', FileError, path,
            ": the header does not start with '{'");
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto cb = [&](int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (ev == E::object_start) open_objects.emplace_back();
    if (ev == E::object_end && !open_objects.empty()) open_objects.pop_back();
    if (ev == E::key && !open_objects.empty() &&
        !open_objects.back().insert(parsed.get<std::string>()).second && duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  const nlohmann::json j = nlohmann::json::parse(header, cb, false);
  DPT_CHECK(!j.is_discarded() && j.is_object(), FileError, path,
            ": the header is not a JSON object");
  DPT_CHECK(duplicate.empty(), FileError, path, ": name '", duplicate,
            "' appears twice in the header");
  std::map<std::string, std::string> meta;
  std::vector<Entry> entries;
  for (auto& [name, v] : j.items()) {
    if (name == "__metadata__") {
      DPT_CHECK(v.is_object(), FileError, path, ": __metadata__ is not an object");
      for (auto& [k, s] : v.items()) {
        DPT_CHECK(s.is_string(), FileError, path, ": __metadata__ value '", k, "' is not a string");
        meta[k] = s.get<std::string>();
      }
      continue;
    }
    DPT_CHECK(v.is_object() && v.size() == 3 && v.contains("dtype") && v.contains("shape") &&
                  v.contains("data_offsets"),
              FileError, path, ": tensor '", name,
              "' must have exactly dtype, shape and data_offsets");
    const nlohmann::json &dt = v["dtype"], &shape = v["shape"], &off = v["data_offsets"];
    DPT_CHECK(dt.is_string() && dtype_rank(dt.get<std::string>()) >= 0, FileError, path,
              ": tensor '", name, "' has unknown dtype ", dt.dump());
    DPT_CHECK(shape.is_array() && off.is_array() && off.size() == 2, FileError, path, ": tensor '",
              name, "' has a malformed shape or data_offsets");
    Entry e{name, dtype_rank(dt.get<std::string>()), {}, 0, 0};
    uint64_t bytes = kDtypes[e.rank].size;
    for (const auto& d : shape) {
      const uint64_t dim = non_negative(d, "a dimension of '" + name + "'", path);
      DPT_CHECK(!__builtin_mul_overflow(bytes, dim, &bytes) && bytes <= (uint64_t(1) << 62),
                FileError, path, ": tensor '", name, "' has an impossible shape ", shape.dump());
      e.shape.push_back(int64_t(dim));
    }
    e.begin = non_negative(off[0], "an offset of '" + name + "'", path);
    e.end = non_negative(off[1], "an offset of '" + name + "'", path);
    DPT_CHECK(e.end >= e.begin && e.end - e.begin == bytes, FileError, path, ": tensor '", name,
              "' spans ", e.end - std::min(e.begin, e.end), " bytes but its dtype and shape need ",
              bytes);
    entries.push_back(std::move(e));
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t at = 0;
  for (const Entry& e : entries) {
    DPT_CHECK(e.begin == at, FileError, path, ": tensor '", e.name, "' starts at byte ", e.begin,
              " of the data, where ", at, " was expected (a gap or an overlap)");
    at = e.end;
  }
  const uint64_t data_bytes = uint64_t(f.size()) - 8 - n;
  DPT_CHECK(at == data_bytes, FileError, path, ": the tensors cover ", at,
            " bytes but the data section has ", data_bytes);
  Checkpoint c;
  c.format = FileFormat::Safetensors;
  c.kind = CheckpointKind::Weights;
  c.file_bytes = f.size();
  c.version = meta.count("dptrain.version") ? meta["dptrain.version"] : "";
  c.saved_at = meta.count("dptrain.saved_at") ? meta["dptrain.saved_at"] : "";
  if (meta.count("dptrain.saved_from")) c.saved_from = split_commas(meta["dptrain.saved_from"]);
  if (meta.count("dptrain.architecture")) {
    try {
      c.arch = ArchSpec::from_json(nlohmann::json::parse(meta["dptrain.architecture"]));
    } catch (const std::exception& e) {
      DPT_THROW(FileError, path, ": bad architecture description in __metadata__: ", e.what());
    }
    c.kind = CheckpointKind::Full;
  }
  for (const Entry& e : entries) {
    const std::string dt = kDtypes[e.rank].name;
    DPT_CHECK(dt == "F32" || dt == "F64" || dt == "F16" || dt == "BF16" || dt == "I64", FileError,
              path, ": tensor '", e.name, "' is ", dt,
              ", which dptrain does not load (F32, F64, F16, BF16 and I64 only)");
    const DType t = dt == "F16"    ? DType::F16
                    : dt == "BF16" ? DType::BF16
                    : dt == "I64"  ? DType::I64
                                   : DType::F32;
    c.state.entries.emplace_back(e.name, Tensor(e.shape, t));
  }
  parallel_for(entries.size(), [&](size_t i) {
    const Entry& e = entries[i];
    Tensor& out = c.state.entries[i].second;
    const int64_t from = int64_t(8 + n + e.begin);
    if (std::string(kDtypes[e.rank].name) == "F64") {
      std::vector<double> tmp(size_t(out.numel()));
      f.read(from, tmp.data(), e.end - e.begin, "tensor " + e.name);
      for (size_t k = 0; k < tmp.size(); ++k) out.data<float>()[k] = float(tmp[k]);
    } else {
      f.read(from, out.raw(), e.end - e.begin, "tensor " + e.name);
    }
  });
  c.prefix = wrapper_prefix(keys_of(c.state));
  return c;
}

void write_safetensors(const Checkpoint& c, const std::string& path) {
  struct Item {
    const std::string* name;
    Tensor host;
    int rank;
  };
  std::vector<Item> items;
  std::set<std::string> names;
  for (auto& [k, t] : c.state.entries) {
    DPT_CHECK(names.insert(k).second, ConfigError, "cannot save ", path, ": key ", k,
              " appears twice");
    items.push_back({&k, t.device().is_cpu() ? t.share() : t.to(Device::cpu()),
                     dtype_rank(st_name(t.dtype()))});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.rank != b.rank ? a.rank > b.rank : *a.name < *b.name;
  });
  const bool full = c.kind == CheckpointKind::Full && c.arch;
  std::map<std::string, std::string> meta{{"format", "pt"},
                                          {"dptrain.format_version", "1"},
                                          {"dptrain.kind", full ? "full" : "weights"},
                                          {"dptrain.world_size", std::to_string(c.world_size)}};
  if (full) meta["dptrain.architecture"] = c.arch->to_json().dump();
  std::string from;
  for (auto& d : c.saved_from) from += (from.empty() ? "" : ",") + d;
  meta["dptrain.saved_from"] = from;
  if (!c.version.empty()) meta["dptrain.version"] = c.version;
  if (!c.saved_at.empty()) meta["dptrain.saved_at"] = c.saved_at;
  auto quote = [](const std::string& s) {
    return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  };
  std::string h = "{\"__metadata__\":{";
  for (auto& [k, v] : meta)
    h.append(h.back() == '{' ? "" : ",").append(quote(k)).append(":").append(quote(v));
  h += "}";
  uint64_t offset = 0;
  for (const Item& it : items) {
    h.append(",").append(quote(*it.name)).append(":{\"dtype\":\"").append(kDtypes[it.rank].name);
    h += "\",\"shape\":[";
    for (size_t d = 0; d < it.host.shape().size(); ++d)
      h.append(d ? "," : "").append(std::to_string(it.host.shape()[d]));
    h.append("],\"data_offsets\":[").append(std::to_string(offset)).append(",");
    offset += it.host.nbytes();
    h.append(std::to_string(offset)).append("]}");
  }
  h += "}";
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string len;
  for (int i = 0; i < 8; ++i) len += char((uint64_t(h.size()) >> (8 * i)) & 0xff);
  atomic_save(path, 8 + h.size() + offset, [&](const std::string& tmp) {
    Fd f = create_file(tmp, path);
    const std::string head = len + h;
    preallocate(f.fd, head.size() + offset);
    write_at(f.fd, head.data(), head.size(), 0, path);
    std::vector<int64_t> at(items.size(), int64_t(head.size()));
    for (size_t i = 1; i < items.size(); ++i)
      at[i] = at[i - 1] + int64_t(items[i - 1].host.nbytes());
    parallel_for(items.size(), [&](size_t i) {
      write_at(f.fd, items[i].host.raw(), items[i].host.nbytes(), at[i], path);
    });
    sync_file(f.fd, path);
  });
}

}  // namespace dpt
