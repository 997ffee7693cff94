"""CPU reference backend: executes compiled graphs op by op with torch (the oracle for the real runtime)."""

from surogate.runtime.reference.interpreter import KERNELS, batch_inputs, gradients, run_graph
from surogate.runtime.reference.weights import load_weights

__all__ = ["KERNELS", "batch_inputs", "gradients", "load_weights", "run_graph"]
