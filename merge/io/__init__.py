"""Bytes <-> tensors: lazy checkpoint sources and the streaming, atomic safetensors writer."""

from merge.io.sources import Source, TensorInfo, open_checkpoint, read_safetensors_metadata
from merge.io.writer import AtomicOutput, plan_output, write_state_dict

__all__ = ["Source", "TensorInfo", "open_checkpoint", "read_safetensors_metadata", "AtomicOutput",
           "plan_output", "write_state_dict"]
