"""The core: the diffusion maths and samplers (diffusion.py), a distilled student's targets and
loss (distill.py), what a model is (spec.py: the
ModelSpec a checkpoint stores, one reader per schema) and the caption tokens the network reads
(tokens.py). The network itself is unet.py at the repository root, and belongs to this layer.

The core reads like the papers and does no I/O: it imports torch and the core only (unet.py
included), never the files, the console or the command line.
"""
