// fastattn_icl._C: the operator schemas of the `fastattn_icl` namespace, and the module init.
//
// Kernels register per backend in their own files (TORCH_LIBRARY_IMPL(fastattn_icl, CPU / CUDA, m));
// fake (meta) kernels and autograd formulas are registered from Python, in the module named by the
// m.set_python_module call before each op's schema (torch checks that the fake kernel was registered
// from that very module, so each op names its own), which torch imports by itself when it first needs
// them (for example under torch.compile when only fastattn_icl._C was imported).
//
// On TORCH_LIBRARY next to the Python ops: fastattn_icl/ops/attention.py defines more ops of this
// namespace with torch.library.custom_op, which always opens a FRAGMENT library. The dispatcher
// allows exactly one DEF library (TORCH_LIBRARY) per namespace and any number of fragments, in any
// order, so this block coexists with those ops whichever is imported first (tests/csrc checks both
// orders). Nobody may open a Python torch.library.Library("fastattn_icl", "DEF"): that would clash
// with this block. Schemas of further C++ ops go in this block; if one ever has to live elsewhere,
// use TORCH_LIBRARY_FRAGMENT(fastattn_icl, m) there (a second TORCH_LIBRARY would fail at load).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastattn_icl, m) {
  m.set_python_module("fastattn_icl.ops.gather");
  // keys[l], values[l]: [B, Hkv, T, D]; index: int64 [B, M] -> K, V: [L, B, Hkv, M, D] (contiguous),
  // K[l, b, h, m] = keys[l][b, h, index[b, m]].
  m.def("gather_kv(Tensor[] keys, Tensor[] values, Tensor index) -> (Tensor, Tensor)");

  m.set_python_module("fastattn_icl.ops.deep_thinking");
  // work: [R, 2, C] fp32/fp16/bf16 (work[:, 0] the state X̂, updated; work[:, 1] X_new, read); m: float32 [R, C].
  // One Deep-Thinking step in place: g = X_new - X̂, m = g (first) else β·m + g, X̂ <- X̂ + η·m (docs/methods.md §7).
  // Not named deep_thinking_update_: fastattn_icl/ops/deep_thinking.py defines that op (the backend dispatch).
  m.def("fused_deep_thinking_update_(Tensor(a!) work, Tensor(b!) m, float eta, float beta, bool first) -> ()");

  m.set_python_module("fastattn_icl.ops._cpu_kernels");
  // The method features of the CPU attention path, per query row, on top of PyTorch's CPU flash kernel; shapes and
  // semantics in csrc/cpu_features.cpp (q, o, do, dq grouped [B, Hkv, G, Tq, D]; k, v, dk, dv [B, Hkv, Tk, D]).
  m.def("anchor_correction_(Tensor(a!) o, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor? key_padding_mask, "
        "Tensor key_log_weights, Tensor reweight_from, Tensor columns, bool causal, float scale) -> ()");
  m.def("anchor_backward_(Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor(d!) dlogw, Tensor q, Tensor k, "
        "Tensor v, Tensor grad_out, Tensor lse, Tensor? key_padding_mask, Tensor key_log_weights, "
        "Tensor reweight_from, Tensor? isolation_limit, Tensor columns, bool causal, float scale) -> ()");
  m.def("isolation_window_ok(Tensor q, Tensor k, Tensor? key_padding_mask, Tensor isolation_limit, float scale) "
        "-> Tensor");
  m.def("isolation_window_fwd_(Tensor(a!) o, Tensor(b!) lse, Tensor q, Tensor k, Tensor v, "
        "Tensor? key_padding_mask, Tensor isolation_limit, float scale) -> Tensor");
  m.def("isolation_window_bwd_(Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor q, Tensor k, Tensor v, "
        "Tensor grad_out, Tensor o, Tensor lse, Tensor? key_padding_mask, Tensor isolation_limit, float scale) -> ()");
  // x: [R, T, D] float32/float64 -> y, y[r, t] = Σ_{i<t} η^(t−i) x[r, i] (reverse: over i > t); docs/methods.md §6.
  m.def("momentum_scan(Tensor x, float eta, bool reverse) -> Tensor");
  // o: [B, Hkv, G, Tq, D] += M of v [B, Hkv, Tk, D] at the last Tq positions (padded keys count as zero values), in
  // place; returns the state after the last key [B, Hkv, D] (csrc/cpu_features.cpp; docs/methods.md §6).
  m.def("momentum_add_(Tensor(a!) o, Tensor v, Tensor? key_padding_mask, float eta) -> Tensor");
  // One chunk of query rows of the saliency pass after its two matmuls (csrc/cpu_saliency.cpp; docs/methods.md §4):
  // p, dp [B, H, n, Tc] -> float64 [B, 1 + H·per_head, 3] sums; writes the chunk's rows of I into rows.
  // Plain attention without a key mask (csrc/cpu_flash.cpp), q [B, H, Tq, D], k, v [B, Hkv, Tk, D], one dtype
  // (float32 or float64): the forward -> out (laid out as q when q is contiguous, else as [B, Tq, H, D] memory), lse
  // [B, H, Tq]; the backward from grad_out, out [B, H, Tq, D] and lse -> dq, dk, dv (contiguous).
  // The forward's key_weights [B, H, Tk] (q's dtype) scale P's columns in P v, not in its sum: out = (P ⊙ w) v.
  m.def("flash_attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, Tensor? key_weights=None) -> "
        "(Tensor, Tensor)");
  m.def("flash_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("saliency_reduce(Tensor p, Tensor dp, Tensor? key_padding_mask, Tensor label, Tensor target, int row0, "
        "bool causal, bool per_head, Tensor? row_slot, Tensor(a!)? rows, float p_min) -> Tensor");
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastattn_icl's compiled ops (registered in torch.ops.fastattn_icl)",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef FASTATTN_ICL_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // Whether this build compiled the CUDA kernels (csrc/cuda/*.cu); read by fastattn_icl._ext.
  if (PyModule_AddObject(module, "WITH_CUDA", PyBool_FromLong(with_cuda)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
