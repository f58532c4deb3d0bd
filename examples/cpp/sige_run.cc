// Minimal C++ host for a compiled SIGE artifact (x86 host target): prime once, then edit.
//
// The artifact (an uncompressed tar, see sige_export/artifact.py) holds prime.so and edit.so
// (Relax VM executables exported by TVM), weights.bin (every weight once) and manifest.json.
// prepare.py unpacks it and writes plan.txt, the argument list of each pass in call order:
//
//   weights weights.bin
//   pass <prime|edit> <library.so> <n_args> <n_outputs>
//   file <dtype> <ndim> <dims...> <file.bin> <name>     an input read from a raw file
//   weight <dtype> <ndim> <dims...> <offset> <name>     a view into weights.bin
//   from_prime <k> <name>                               output k of the prime pass (a cache)
//   copy_of_prime <k> <name>                            a copy of it: a working copy the edit writes into
//                                                       (a host editing again calls vm["restore"] after
//                                                       each edit; see the artifact's manifest)
//   output <pass> <k> <expected.bin>                    compare output k with a reference
//
// Each pass: vm = lib["vm_load_executable"](); vm["vm_initialization"](kDLCPU, 0, 2 /*pooled*/);
// outputs = vm["main"](inputs..., weights...)  -> a tuple (Array) of tensors.
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct AlignedAlloc {  // 64-byte aligned CPU buffers (TVM kernels assume aligned tensors)
  void AllocData(DLTensor* t) {
    size_t n = 1;
    for (int i = 0; i < t->ndim; ++i) n *= static_cast<size_t>(t->shape[i]);
    size_t bytes = (n * t->dtype.bits * t->dtype.lanes + 7) / 8;
    t->data = std::aligned_alloc(64, ((bytes + 63) / 64) * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static DLDataType ParseDType(const std::string& s) {
  if (s == "float32") return DLDataType{kDLFloat, 32, 1};
  if (s == "int32") return DLDataType{kDLInt, 32, 1};
  if (s == "int64") return DLDataType{kDLInt, 64, 1};
  throw std::runtime_error("unsupported dtype " + s);
}

static size_t NBytes(const ffi::Tensor& t) {
  size_t n = 1;
  for (int64_t d : t.shape()) n *= static_cast<size_t>(d);
  return n * t.dtype().bits / 8;
}

static ffi::Tensor NewTensor(const std::vector<int64_t>& shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dtype, DLDevice{kDLCPU, 0});
}

static std::vector<char> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

struct Pass {
  std::string name, library;
  std::vector<std::string> args;  // plan lines
  ffi::Optional<ffi::Module> vm;
  ffi::Optional<ffi::Function> main;
};

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: sige_run WORK_DIR [repeats]\n";
    return 2;
  }
  std::string dir = argv[1];
  int repeats = argc > 2 ? std::atoi(argv[2]) : 10;
  std::ifstream plan(dir + "/plan.txt");
  if (!plan) {
    std::cerr << "no plan.txt in " << dir << " (run prepare.py)\n";
    return 2;
  }
  std::vector<char> weights;
  std::map<std::string, Pass> passes;
  std::vector<std::tuple<std::string, int, std::string>> checks;
  std::string line, current;
  while (std::getline(plan, line)) {
    std::istringstream is(line);
    std::string kind;
    is >> kind;
    if (kind == "weights") {
      std::string f;
      is >> f;
      weights = ReadFile(dir + "/" + f);
    } else if (kind == "pass") {
      Pass p;
      is >> p.name >> p.library;
      current = p.name;
      passes[p.name] = p;
    } else if (kind == "output") {
      std::string pass, file;
      int k;
      is >> pass >> k >> file;
      checks.emplace_back(pass, k, file);
    } else if (!kind.empty()) {
      passes[current].args.push_back(line);
    }
  }
  for (auto& [name, p] : passes) {
    ffi::Module lib = ffi::Module::LoadFromFile(dir + "/" + p.library);
    p.vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    p.vm.value()->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    p.main = p.vm.value()->GetFunction("main").value();
  }

  auto build_args = [&](Pass& p, const ffi::Array<ffi::Tensor>* prime_out) {
    std::vector<ffi::Tensor> out;
    for (const std::string& l : p.args) {
      std::istringstream is(l);
      std::string kind;
      is >> kind;
      if (kind == "from_prime") {
        int k;
        is >> k;
        out.push_back((*prime_out)[k]);
        continue;
      }
      if (kind == "copy_of_prime") {  // a working copy: the edit scatters into it in place
        int k;
        is >> k;
        const ffi::Tensor& src = (*prime_out)[k];
        ffi::Tensor t = NewTensor(std::vector<int64_t>(src.shape().begin(), src.shape().end()), src.dtype());
        std::memcpy(t.data_ptr(), src.data_ptr(), NBytes(t));
        out.push_back(t);
        continue;
      }
      std::string dtype;
      int ndim;
      is >> dtype >> ndim;
      std::vector<int64_t> shape(ndim);
      for (auto& d : shape) is >> d;
      ffi::Tensor t = NewTensor(shape, ParseDType(dtype));
      if (kind == "file") {
        std::string file;
        is >> file;
        std::vector<char> data = ReadFile(dir + "/" + file);
        if (data.size() != NBytes(t)) throw std::runtime_error(file + ": wrong size");
        if (!data.empty()) std::memcpy(t.data_ptr(), data.data(), data.size());
      } else {  // weight: copied into an aligned tensor (a real host would map weights.bin once)
        size_t offset;
        is >> offset;
        std::memcpy(t.data_ptr(), weights.data() + offset, NBytes(t));
      }
      out.push_back(t);
    }
    return out;
  };
  auto call = [](Pass& p, const std::vector<ffi::Tensor>& args) {
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any rv;
    p.main.value().CallPacked(views.data(), static_cast<int32_t>(views.size()), &rv);
    if (auto one = rv.try_cast<ffi::Tensor>()) return ffi::Array<ffi::Tensor>{*one};  // a single output
    return rv.cast<ffi::Array<ffi::Tensor>>();
  };

  Pass& prime = passes.at("prime");
  Pass& edit = passes.at("edit");
  std::vector<ffi::Tensor> prime_args = build_args(prime, nullptr);
  ffi::Array<ffi::Tensor> primed = call(prime, prime_args);  // keeps the caches alive
  std::vector<ffi::Tensor> edit_args = build_args(edit, &primed);
  ffi::Array<ffi::Tensor> edited = call(edit, edit_args);

  auto time_ms = [&](Pass& p, const std::vector<ffi::Tensor>& args) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < repeats; ++i) call(p, args);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / repeats;
  };
  std::cout << "prime (dense + caches): " << time_ms(prime, prime_args) << " ms, edit: "
            << time_ms(edit, edit_args) << " ms (mean of " << repeats << ")\n";

  int status = 0;
  for (auto& [pass, k, file] : checks) {
    const ffi::Tensor& t = (pass == "prime" ? primed : edited)[k];
    std::vector<char> ref = ReadFile(dir + "/" + file);
    const float* a = static_cast<const float*>(t.data_ptr());
    const float* b = reinterpret_cast<const float*>(ref.data());
    size_t n = ref.size() / 4;
    if (NBytes(t) != ref.size()) {
      std::cout << pass << " output " << k << ": size mismatch\n";
      status = 1;
      continue;
    }
    double err = 0, scale = 1e-12;
    for (size_t i = 0; i < n; ++i) {
      err = std::max(err, static_cast<double>(std::fabs(a[i] - b[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(b[i])));
    }
    bool ok = err <= 1e-4 * scale;
    std::cout << pass << " output vs Python runtime: max abs err " << err << (ok ? " OK" : " MISMATCH") << "\n";
    status |= ok ? 0 : 1;
  }
  return status;
}
