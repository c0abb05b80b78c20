"""The precisions a trainer offers, as plain data (no torch here: the stage specifications read it).

fp32 trains in float32 throughout. bf16 runs the training step under bf16 autocast, with fp32
master weights and an fp32 loss; evaluations stay fp32 (polyrot.core.device.autocast).
"""

PRECISIONS = ("fp32", "bf16")
