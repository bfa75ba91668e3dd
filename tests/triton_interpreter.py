"""A private copy of a kernels/ module whose kernels run in Triton's interpreter.

``TRITON_INTERPRET`` is read when a kernel is decorated, not when triton is imported, so
instead of setting it for the whole pytest process (which would also turn every other test's
kernels into interpreted ones on a GPU machine) the module is loaded again under another name
with the variable set just for that import. That works whether or not another test imported
triton or the real module first. Note that the interpreter accepts things compiled Triton
refuses (a plain module-level global read in a kernel): only the GPU tests catch those.
"""
import importlib.util
import os


def interpreted_copy(module):
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(f"_{module.__name__.rsplit('.', 1)[-1]}_interpreted",
                                                      module.__file__)
        copy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return copy
