// What the eager optimizer step needs from Python at C speed: the tensor lists of a kernel call
// without per-tensor reference counting, and the checks that a cached step plan (see
// fusedtrain/optim/_base.py) still describes the optimizer. A step over 100 tensors of 1e3
// elements updates them in tens of microseconds; a Python-level operation per tensor costs
// about as much again for every one of them.
#pragma once

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <vector>

namespace fusedtrain {

// The tensors of a Python sequence, for one call of a kernel. pybind11's list conversion copies
// each at::Tensor, and copying or releasing a tensor that has a Python object touches that
// object's reference count through torch's PyObject preservation, which takes the GIL's thread
// state every time: more than the update of a 1e3-element tensor costs. Here the Python objects
// are held instead (so the tensors stay alive while the kernel runs without the GIL) and each
// at::Tensor is borrowed from its object. Construct and destroy with the GIL held.
class BorrowedTensors {
 public:
  BorrowedTensors(pybind11::handle sequence, const char* function, const char* name) {
    PyObject* items = PySequence_Fast(sequence.ptr(), "");
    if (!items) {
      PyErr_Clear();
      throw pybind11::type_error(std::string(function) + "(): " + name +
                                 " must be a sequence of tensors");
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    PyObject** objects = PySequence_Fast_ITEMS(items);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(objects[i])) {
        const std::string type = Py_TYPE(objects[i])->tp_name;
        Py_DECREF(items);
        throw pybind11::type_error(std::string(function) + "(): " + name + "[" +
                                   std::to_string(i) + "] is " + type + ", expected a Tensor");
      }
    }
    // Nothing below throws (but allocation), so the destructor always runs on what was borrowed.
    owners_.assign(objects, objects + n);
    tensors_.reserve(n);
    for (PyObject* object : owners_) {
      Py_INCREF(object);  // `sequence` may be changed by another thread while the kernel runs
      tensors_.push_back(
          c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(object)));
    }
    Py_DECREF(items);
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    for (PyObject* object : owners_) Py_DECREF(object);
  }

  at::TensorList list() const { return tensors_; }

 private:
  std::vector<PyObject*> owners_;  // one reference each, released by the destructor
  std::vector<at::Tensor> tensors_;
};

// Binds same_objects, same_items, entries_are and step_grads to `m` (see optim_python.cpp).
void bind_step_plan_checks(pybind11::module_& m);

}  // namespace fusedtrain
