"""Shared constants of the kernel tests (a plain module: `conftest` names clash across tests/ and bench/)."""
import torch

# Kernel tests run the Triton path on the GPU when there is one, else under the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter mishandles bfloat16: it is checked on a GPU only.
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
