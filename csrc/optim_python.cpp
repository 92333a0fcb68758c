// The checks that let the eager optimizer step reuse a cached plan (fusedtrain/optim/_base.py):
// each answers in one C loop what Python would answer with an operation per tensor.
#include "optim_python.h"

#include <algorithm>

namespace py = pybind11;

namespace fusedtrain {
namespace {

// A sequence's items as an array, valid while the returned object lives (a list or tuple itself,
// anything else copied into a list).
py::object fast_sequence(py::handle sequence, const char* name) {
  PyObject* items = PySequence_Fast(sequence.ptr(), name);
  if (!items) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(items);
}

// Whether sequences `a` and `b` hold the same objects in the same order. By identity: Python's ==
// compares two tensors element by element (and finds two one-element tensors of equal value the
// same tensor).
bool same_objects(py::handle a, py::handle b) {
  const py::object left = fast_sequence(a, "a must be a sequence");
  const py::object right = fast_sequence(b, "b must be a sequence");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(left.ptr());
  if (PySequence_Fast_GET_SIZE(right.ptr()) != n) return false;
  PyObject** x = PySequence_Fast_ITEMS(left.ptr());
  PyObject** y = PySequence_Fast_ITEMS(right.ptr());
  return std::equal(x, x + n, y);
}

// Whether dict `d` holds keys[i]: values[i] for every i, in that order, and nothing else (by
// identity, as same_objects).
bool same_items(py::handle d, py::handle keys, py::handle values) {
  if (!PyDict_Check(d.ptr())) return false;
  const py::object k = fast_sequence(keys, "keys must be a sequence");
  const py::object v = fast_sequence(values, "values must be a sequence");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(k.ptr());
  if (PyDict_Size(d.ptr()) != n || PySequence_Fast_GET_SIZE(v.ptr()) != n) return false;
  PyObject** key_items = PySequence_Fast_ITEMS(k.ptr());
  PyObject** value_items = PySequence_Fast_ITEMS(v.ptr());
  Py_ssize_t position = 0, i = 0;
  PyObject *key, *value;  // borrowed
  while (PyDict_Next(d.ptr(), &position, &key, &value)) {
    if (key != key_items[i] || value != value_items[i]) return false;
    ++i;
  }
  return true;
}

// Whether dicts[i][keys[k]] is expected[i * len(keys) + k] for every i and k. An entry that is not
// a dict, or lacks a key, makes it False.
bool entries_are(py::handle dicts, py::handle keys, py::handle expected) {
  const py::object d = fast_sequence(dicts, "dicts must be a sequence");
  const py::object k = fast_sequence(keys, "keys must be a sequence");
  const py::object e = fast_sequence(expected, "expected must be a sequence");
  const Py_ssize_t n_dicts = PySequence_Fast_GET_SIZE(d.ptr());
  const Py_ssize_t n_keys = PySequence_Fast_GET_SIZE(k.ptr());
  if (PySequence_Fast_GET_SIZE(e.ptr()) != n_dicts * n_keys) return false;
  PyObject** dict_items = PySequence_Fast_ITEMS(d.ptr());
  PyObject** key_items = PySequence_Fast_ITEMS(k.ptr());
  PyObject** expected_items = PySequence_Fast_ITEMS(e.ptr());
  for (Py_ssize_t i = 0; i < n_dicts; ++i) {
    if (!PyDict_Check(dict_items[i])) return false;
    for (Py_ssize_t j = 0; j < n_keys; ++j) {
      PyObject* value = PyDict_GetItemWithError(dict_items[i], key_items[j]);  // borrowed
      if (!value && PyErr_Occurred()) throw py::error_already_set();
      if (value != expected_items[i * n_keys + j]) return false;
    }
  }
  return true;
}

// param.grad, as Python reads it. For a torch.Tensor or nn.Parameter (no __torch_function__ of
// their own) that is the autograd gradient's Python object, read here without the attribute
// lookup.
py::object grad_of(PyObject* param) {
  if (THPVariable_CheckExact(param)) {
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(THPVariable_Unpack(param).grad()));
  }
  return py::reinterpret_borrow<py::object>(param).attr("grad");
}

// A gradient that the kernels take for `param` as it is: a dense tensor of the param's shape,
// dtype and device, plain beside a plain param (a Tensor or Parameter) and of the param's own
// type beside a tensor subclass (a DTensor's gradient is a DTensor).
bool fits(PyObject* param, PyObject* grad) {
  const bool plain_param = THPVariable_CheckExact(param);
  if (plain_param ? !THPVariable_CheckExact(grad) : Py_TYPE(grad) != Py_TYPE(param)) return false;
  const at::Tensor& p = THPVariable_Unpack(param);
  const at::Tensor& g = THPVariable_Unpack(grad);
  return g.layout() == at::kStrided && g.scalar_type() == p.scalar_type() &&
         g.device() == p.device() && g.sizes().equals(p.sizes());
}

// [p.grad for p in with_grad] when each of those gradients fits its param (see fits) and no
// param of without_grad has a gradient; None otherwise, and the caller takes its full path,
// which says what is wrong or builds a new plan.
py::object step_grads(py::handle with_grad, py::handle without_grad) {
  const py::object params = fast_sequence(with_grad, "with_grad must be a sequence of tensors");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(params.ptr());
  PyObject** param_items = PySequence_Fast_ITEMS(params.ptr());
  py::list grads(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(param_items[i])) return py::none();
    py::object grad = grad_of(param_items[i]);
    if (grad.is_none() || !fits(param_items[i], grad.ptr())) return py::none();
    PyList_SET_ITEM(grads.ptr(), i, grad.release().ptr());
  }
  const py::object others = fast_sequence(without_grad, "without_grad must be a sequence of tensors");
  PyObject** other_items = PySequence_Fast_ITEMS(others.ptr());
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(others.ptr()); ++i) {
    if (!grad_of(other_items[i]).is_none()) return py::none();
  }
  return std::move(grads);
}

}  // namespace

void bind_step_plan_checks(py::module_& m) {
  m.def("same_objects", &same_objects, py::arg("a"), py::arg("b"),
        "Whether sequences a and b hold the same objects (by identity) in the same order.");
  m.def("same_items", &same_items, py::arg("d"), py::arg("keys"), py::arg("values"),
        "Whether dict d holds exactly keys[i]: values[i] (by identity), in that order.");
  m.def("entries_are", &entries_are, py::arg("dicts"), py::arg("keys"), py::arg("expected"),
        "Whether dicts[i][keys[k]] is expected[i * len(keys) + k] for every i and k.");
  m.def("step_grads", &step_grads, py::arg("with_grad"), py::arg("without_grad"),
        "[p.grad for p in with_grad] if each is a dense gradient of its param's shape, dtype, "
        "device and kind (plain or the param's tensor subclass) and no param of without_grad "
        "has a gradient; else None.");
}

}  // namespace fusedtrain
