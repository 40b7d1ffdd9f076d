// The part of Python's pickle protocol that torch.save uses for state dicts, read without
// executing anything and written so that torch.load(weights_only=True) accepts it.
//
// Reading builds only dicts (OrderedDict included), lists, tuples, strings, bytes, numbers,
// booleans, None, storage references and tensors. The only callables a file may name are
// collections.OrderedDict, torch._utils._rebuild_tensor_v2 and torch._utils._rebuild_parameter,
// and they are never called: each has a fixed meaning here. Any other global, and any opcode
// outside the set a state dict needs (INST, OBJ, NEWOBJ, EXT*, PERSID, ...), is refused with an
// error naming it. Objects live in an arena owned by the result, so cycles and deep nesting cost
// nothing at destruction.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace dpt {

struct PyObj {
  enum class Kind {
    None,
    Bool,
    Int,
    Float,
    Str,
    Bytes,
    Tuple,
    List,
    Dict,
    Global,
    Storage,
    Tensor
  };
  Kind kind = Kind::None;
  int64_t i = 0;  // Bool, Int; Storage: element count; Tensor: storage offset (elements)
  double f = 0;   // Float
  std::string s;  // Str, Bytes; Global: "module.name"; Storage: its key in the archive
  std::string storage_type, location;           // Storage: "FloatStorage", "cuda:3"
  std::vector<PyObj*> items;                    // Tuple, List; Tensor: {its Storage}
  std::vector<std::pair<PyObj*, PyObj*>> dict;  // Dict, in insertion order
  Shape size, stride;                           // Tensor
};
const char* kind_name(PyObj::Kind k);  // "dict", "tensor", ...

struct Pickle {
  std::vector<std::unique_ptr<PyObj>> arena;
  PyObj* root = nullptr;
};

// Parses `bytes` (the data.pkl of `where`). FileError on anything refused or malformed.
Pickle unpickle(const std::string& bytes, const std::string& where);

// Bytes per element of a torch storage type ("FloatStorage" -> 4); 0 when unknown.
size_t storage_element_size(const std::string& storage_type);
// The storage type for a dtype ("FloatStorage" for F32).
const char* storage_type_of(DType t);

// A state dict for torch.save's data.pkl: an OrderedDict of contiguous tensors, the i-th over
// the whole of storage key `storage`, located on "cpu".
struct PickledTensor {
  std::string key;
  DType dtype;
  Shape shape;
  std::string storage;
};
std::string pickle_state_dict(const std::vector<PickledTensor>& tensors);

}  // namespace dpt
