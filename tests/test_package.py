"""The package around the kernels: `python -m fusedtrain info`, the reference backend, and
life without the compiled extension."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import fusedtrain
from helpers import clone_params, make_params, train_side_by_side


# Subprocesses start outside the checkout, so they import the installed fusedtrain (with its
# compiled extension) rather than the source tree.
OUTSIDE_CHECKOUT = tempfile.gettempdir()


def run_python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          cwd=OUTSIDE_CHECKOUT, env=env)


def test_info_reports_versions_backends_and_isa():
    result = run_python("-m", "fusedtrain", "info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"fusedtrain {fusedtrain.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "triton:" in out and "CUDA device:" in out
    if fusedtrain._extension.native_available():
        assert f"instruction set {fusedtrain._extension._C.cpu_isa()}" in out
        assert "backend 'auto' picks: cpu -> native" in out


def test_cpu_isa_environment_variable_selects_the_loops():
    if not fusedtrain._extension.native_available():
        pytest.skip("native extension not built")
    result = run_python("-m", "fusedtrain", "info", env={**os.environ, "FUSEDTRAIN_CPU_ISA": "baseline"})
    assert "instruction set baseline" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("name,kwargs", [("Adam", {"amsgrad": True, "weight_decay": 0.1}),
                                         ("AdamW", {}),
                                         ("SGD", {"lr": 0.01, "momentum": 0.9, "nesterov": True})])
def test_reference_backend_agrees_with_torch(name, kwargs):
    torch_params = make_params(torch.float32, seed=50)
    fused_params = clone_params(torch_params)
    torch_opt = getattr(torch.optim, name)(torch_params, foreach=False, **kwargs)
    fused_opt = getattr(fusedtrain.optim, name)(fused_params, backend="reference", **kwargs)
    train_side_by_side(torch_opt, fused_opt, torch_params, fused_params, 100, seed=51)
    for a, b in zip(torch_params, fused_params):
        torch.testing.assert_close(b, a)


def test_without_the_extension_import_warns_once_and_uses_the_reference():
    result = run_python("-c", textwrap.dedent("""
        import sys, warnings
        import importlib.abc

        class HideExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fusedtrain._C":
                    raise ImportError("hidden for the test")

        sys.meta_path.insert(0, HideExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fusedtrain, fusedtrain.optim
            import fusedtrain  # a second import must not warn again
        import torch
        from fusedtrain import _dispatch
        p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
        fusedtrain.optim.Adam([p], lr=0.1).step()
        print(len([w for w in caught if "compiled extension" in str(w.message)]),
              _dispatch.resolve("auto", torch.device("cpu")), round(p[0].item(), 4))
        try:
            fusedtrain.optim.Adam([p], backend="native").step()
        except RuntimeError as e:
            print("native refused:", e)
    """))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1 reference 0.9"
    assert lines[1].startswith("native refused: backend='native' cannot run on cpu")


def test_triton_backend_needs_the_interpreter_on_cpu():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = fusedtrain.optim.Adam([p], backend="triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the Triton interpreter")
    with pytest.raises(RuntimeError, match="triton runs CPU tensors only under TRITON_INTERPRET=1|triton is not installed"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_backend_environment_variable():
    """FUSEDTRAIN_BACKEND picks what "auto" means: here the Triton kernels under the interpreter,
    which then agree with torch.optim; a bad value is a clear error."""
    if not fusedtrain._dispatch.TRITON_INSTALLED:
        pytest.skip("triton not installed")
    check = textwrap.dedent("""
        import torch, fusedtrain.optim
        from fusedtrain import _dispatch
        print(_dispatch.resolve("auto", torch.device("cpu")))
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(50)) for _ in range(3)]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        ours, theirs = fusedtrain.optim.Adam(a, lr=0.1, weight_decay=0.1), torch.optim.Adam(b, lr=0.1, weight_decay=0.1)
        for _ in range(5):
            for p, q in zip(a, b):
                p.grad = torch.randn(50); q.grad = p.grad.clone()
            ours.step(); theirs.step()
        print(all(torch.allclose(p, q) for p, q in zip(a, b)))
    """)
    env = {**os.environ, "FUSEDTRAIN_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    result = run_python("-c", check, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["triton", "True"]
    bad = run_python("-c", "import torch, fusedtrain._dispatch as d; d.resolve('auto', torch.device('cpu'))",
                     env={**os.environ, "FUSEDTRAIN_BACKEND": "gpu-magic"})
    assert "FUSEDTRAIN_BACKEND must be one of" in bad.stderr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE_CHECK = ("import fusedtrain, os; from fusedtrain import _extension as e; "
                "print(os.path.dirname(fusedtrain.__file__), e.native_available())")


def test_repo_root_runs_the_native_kernels():
    """From the repository root `import fusedtrain` finds the source package first; it must still
    run the native kernels (its own in-place build, or the installed one built from these
    sources), as `python -m fusedtrain` and `python -m pytest` from there do."""
    if not fusedtrain._extension.native_available():
        pytest.skip("native extension not built")
    result = subprocess.run([sys.executable, "-c", NATIVE_CHECK], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [os.path.join(ROOT, "fusedtrain"), "True"], result.stderr
    info = subprocess.run([sys.executable, "-m", "fusedtrain", "info"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert "native extension: built" in info.stdout, info.stdout + info.stderr


def test_a_checkout_uses_the_installed_build_of_its_own_sources_only(tmp_path):
    """A checkout without a build of its own (a copy of the package and csrc/) loads the _C of an
    installed fusedtrain (here a copy in a directory on PYTHONPATH, ahead of site-packages) when it
    was built from the same sources, and otherwise warns with the command that rebuilds it and
    runs the reference."""
    if not fusedtrain._extension.native_available():
        pytest.skip("native extension not built")
    from fusedtrain._sources import source_digest

    c = fusedtrain._extension._C
    assert c.source_digest() == source_digest(Path(ROOT) / "csrc"), (
        "the loaded fusedtrain._C was built from other sources than this checkout's csrc/: rebuild it "
        "(python setup.py build_ext --inplace, or pip install --no-build-isolation .)")
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(ROOT) / "csrc", checkout / "csrc")
    shutil.copytree(Path(fusedtrain.__file__).parent, checkout / "fusedtrain",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    installed = tmp_path / "site" / "fusedtrain"
    installed.mkdir(parents=True)

    # An editable install of the real checkout maps fusedtrain._C to its build through an import
    # hook: the copy must not see it.
    without_editable_hook = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                             "if '__editable__' not in getattr(f, '__module__', '')]; ")

    def run_in_checkout():
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
        return subprocess.run([sys.executable, "-c", without_editable_hook + NATIVE_CHECK], capture_output=True,
                              text=True, timeout=120, cwd=checkout, env=env)

    shutil.copy(c.__file__, installed)
    same_sources = run_in_checkout()
    assert same_sources.stdout.split() == [str(checkout / "fusedtrain"), "True"], same_sources.stderr

    with open(checkout / "csrc" / "ops.cpp", "a") as source:
        source.write("// edited after the build\n")
    edited = run_in_checkout()
    assert edited.stdout.split() == [str(checkout / "fusedtrain"), "False"], edited.stderr
    assert "built from other C++ sources" in edited.stderr and "build_ext --inplace" in edited.stderr
