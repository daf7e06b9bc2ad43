import os

# The test suite is CPU-only: Triton kernels run in its interpreter, which must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
