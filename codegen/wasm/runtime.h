/* The C side of a sparsecc wasm artifact: DLPack/TVM-FFI types for calling TVM's packed kernels. */
#ifndef SPARSECC_WASM_RUNTIME_H_
#define SPARSECC_WASM_RUNTIME_H_

#include <stdint.h>

#define SPARSECC_EXPORT(name) __attribute__((export_name(name)))

typedef struct { int32_t device_type, device_id; } DLDevice;
typedef struct { uint8_t code, bits; uint16_t lanes; } DLDataType;
typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
} DLTensor;

typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
  };
} TVMFFIAny;

enum { kTVMFFINone = 0, kTVMFFIInt = 1, kTVMFFIFloat = 3, kTVMFFIDLTensorPtr = 7 };

/* The packed ABI of every kernel TVM compiles: `__tvm_ffi_<name>`. */
typedef int32_t (*TVMFFISafeCall)(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

/* Records a kernel's failure (its packed call returned non-zero) for `sparsecc_error`. */
int32_t sparsecc_failed(const char* kernel, int32_t status);

#endif
