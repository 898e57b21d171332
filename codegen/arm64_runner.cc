// Run a sparsecc artifact's Relax VM library without Python: only the TVM runtime (libtvm_runtime.so,
// libtvm_ffi.so) is needed on the board.
//
//   runner MODEL.so [--repeat N] [--out DIR] IN0.npy IN1.npy ...
//
// Inputs and outputs are .npy files (C order, little endian), inputs in the model's input order; outputs are
// written as DIR/out0.npy, DIR/out1.npy, ... (default DIR: the current directory) in the model's output
// order. `--repeat N` calls `main` N times (the last call's outputs are written) and prints the mean time per
// call to stderr. Built against the tvm-ffi headers only.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr size_t kAlignment = 64;  // what TVM's own allocator guarantees to kernels

struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t size = (ffi::GetDataSize(*t) + kAlignment - 1) / kAlignment * kAlignment;
    t->data = std::aligned_alloc(kAlignment, size ? size : kAlignment);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

[[noreturn]] void Fail(const std::string& msg) {
  std::cerr << "runner: " << msg << std::endl;
  std::exit(1);
}

struct DType {
  const char* descr;
  DLDataType dl;
};

const DType kDTypes[] = {
    {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<f2", {kDLFloat, 16, 1}},
    {"<i8", {kDLInt, 64, 1}},   {"<i4", {kDLInt, 32, 1}},   {"<i2", {kDLInt, 16, 1}},
    {"|i1", {kDLInt, 8, 1}},    {"|u1", {kDLUInt, 8, 1}},   {"<u2", {kDLUInt, 16, 1}},
    {"<u4", {kDLUInt, 32, 1}},  {"<u8", {kDLUInt, 64, 1}},  {"|b1", {kDLBool, 8, 1}},
};

DLDataType ParseDescr(const std::string& descr, const std::string& path) {
  for (const DType& d : kDTypes) {
    if (descr == d.descr) return d.dl;
  }
  Fail(path + ": unsupported .npy dtype '" + descr + "'");
}

const char* Descr(DLDataType dl) {
  for (const DType& d : kDTypes) {
    if (d.dl.code == dl.code && d.dl.bits == dl.bits && dl.lanes == 1) return d.descr;
  }
  Fail("unsupported output dtype code " + std::to_string(dl.code) + " bits " + std::to_string(dl.bits));
}

// The value of `key` in a .npy header dict, e.g. 'descr': '<f4' -> <f4, 'shape': (1, 64) -> 1, 64
std::string HeaderField(const std::string& header, const std::string& key) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) return "";
  pos = header.find(':', pos) + 1;
  while (header[pos] == ' ') ++pos;
  char open = header[pos];
  char close = open == '(' ? ')' : open == '\'' ? '\'' : ',';
  size_t start = (open == '(' || open == '\'') ? pos + 1 : pos;
  return header.substr(start, header.find(close, start) - start);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot read " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) Fail(path + ": not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    in.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  in.read(header.data(), header_len);
  if (HeaderField(header, "fortran_order").find("True") != std::string::npos) Fail(path + ": Fortran order");
  DLDataType dtype = ParseDescr(HeaderField(header, "descr"), path);
  std::vector<int64_t> shape;
  std::stringstream dims(HeaderField(header, "shape"));
  for (std::string d; std::getline(dims, d, ',');) {
    if (d.find_first_of("0123456789") != std::string::npos) shape.push_back(std::stoll(d));
  }
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype,
                                           DLDevice{kDLCPU, 0});
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(ffi::GetDataSize(t)));
  if (!in) Fail(path + ": truncated data");
  return t;
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  std::string shape;
  int ndim = t.ndim();
  for (int i = 0; i < ndim; ++i) shape += std::to_string(t.shape()[i]) + (ndim == 1 || i + 1 < ndim ? "," : "");
  std::string header = std::string("{'descr': '") + Descr(t.dtype()) + "', 'fortran_order': False, 'shape': (" +
                       shape + "), }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  uint16_t len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&len), 2);
  out << header;
  out.write(static_cast<const char*>(t.data_ptr()) + t.byte_offset(),
            static_cast<std::streamsize>(ffi::GetDataSize(t)));
  if (!out) Fail("cannot write " + path);
}

// A VM result is a tensor or a (nested) tuple of tensors.
void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.try_cast<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *arr) Flatten(v, out);
  } else {
    Fail("unexpected output type " + value.GetTypeKey());
  }
}

ffi::Function Get(const ffi::Module& mod, const char* name) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name);
  if (!f.has_value()) Fail(std::string("function '") + name + "' not found");
  return *f;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) Fail("usage: runner MODEL.so [--repeat N] [--out DIR] IN0.npy ...");
  std::string out_dir = ".";
  int repeat = 1;
  std::vector<std::string> inputs;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--out" && i + 1 < argc) {
      out_dir = argv[++i];
    } else if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else {
      inputs.push_back(arg);
    }
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = Get(lib, "vm_load_executable")().cast<ffi::Module>();
    Get(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, 2);  // device 0, pooled allocator
    ffi::Function main_fn = Get(vm, "main");
    std::vector<ffi::Tensor> args;
    for (const std::string& path : inputs) args.push_back(ReadNpy(path));
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < repeat; ++r) main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
    if (repeat > 1) std::cerr << "mean " << us / repeat << " us per call over " << repeat << " calls" << std::endl;
    std::vector<ffi::Tensor> outputs;
    Flatten(result, &outputs);
    for (size_t i = 0; i < outputs.size(); ++i) WriteNpy(out_dir + "/out" + std::to_string(i) + ".npy", outputs[i]);
  } catch (const ffi::Error& e) {
    Fail(e.kind() + ": " + e.message());
  }
  return 0;
}
