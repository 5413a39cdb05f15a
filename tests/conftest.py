import os

# The Triton kernels run on CPU tensors under Triton's interpreter; it must be on before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
