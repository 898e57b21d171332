/* What TVM's generated wasm kernels import from a runtime, for a single-threaded static executor:
 * workspace allocation (a LIFO bump heap above the static data, growing memory when needed), a parallel
 * launcher that runs the one task inline, and the error hook whose message `sparsecc_error` returns. */
#include "runtime.h"

#include <stddef.h>

extern unsigned char __heap_base;

static uintptr_t heap_top = 0;
static char error_message[512];

static void set_error(const char* a, const char* b) {
  size_t n = 0;
  for (const char* p = a; p && *p && n + 1 < sizeof(error_message); ++p) error_message[n++] = *p;
  for (const char* p = b; p && *p && n + 1 < sizeof(error_message); ++p) error_message[n++] = *p;
  error_message[n] = 0;
}

/* Workspaces are allocated and freed in nested (stack) order by the kernels; each block keeps the
 * previous top in its 64-byte header so that a free pops it. */
static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code, int bits) {
  (void)device_type; (void)device_id; (void)code; (void)bits;
  if (heap_top == 0) heap_top = ((uintptr_t)&__heap_base + 63) & ~(uintptr_t)63;
  uintptr_t block = heap_top;
  uintptr_t end = block + 64 + ((nbytes + 63) & ~(uint64_t)63);
  uintptr_t have = __builtin_wasm_memory_size(0) * 65536u;
  if (end > have && __builtin_wasm_memory_grow(0, (end - have + 65535) / 65536) == (size_t)-1) {
    set_error("out of memory allocating a kernel workspace", "");
    return 0;
  }
  *(uintptr_t*)block = heap_top;
  heap_top = end;
  return (void*)(block + 64);
}

static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type; (void)device_id;
  uintptr_t block = (uintptr_t)ptr - 64;
  heap_top = block;
  return 0;
}

typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static int parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  (void)num_task;
  TVMParallelGroupEnv env = {0, 1};
  return flambda(0, &env, cdata);
}

/* TVM's LLVM backend calls these through function-pointer variables. */
void* __TVMBackendAllocWorkspace = (void*)alloc_workspace;
void* __TVMBackendFreeWorkspace = (void*)free_workspace;
void* __TVMBackendParallelLaunch = (void*)parallel_launch;

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  set_error(kind, ": ");
  size_t n = 0;
  while (error_message[n]) ++n;
  for (const char* p = message; p && *p && n + 1 < sizeof(error_message); ++p) error_message[n++] = *p;
  error_message[n] = 0;
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  set_error(kind, ": ");
  size_t n = 0;
  while (error_message[n]) ++n;
  for (int32_t i = 0; i < num_parts; ++i)
    for (const char* p = parts[i]; p && *p && n + 1 < sizeof(error_message); ++p) error_message[n++] = *p;
  error_message[n] = 0;
}

int32_t sparsecc_failed(const char* kernel, int32_t status) {
  if (!error_message[0]) set_error("kernel failed: ", kernel);
  return status ? status : -1;
}

SPARSECC_EXPORT("sparsecc_error") const char* sparsecc_error(void) { return error_message; }

SPARSECC_EXPORT("sparsecc_clear_error") void sparsecc_clear_error(void) {
  error_message[0] = 0;
  heap_top = 0;
}
