"""The features: what a model can be besides plain (text.py: captions; superres.py:
super-resolution; augment.py: non-leaking augmentation; each a model kind of the
run.trainer.ModelKind interface) and what can be done with a trained one (edit.py: image to
image, inpainting, interpolation; prompts.py; evaluate.py and tags.py: FID / KID, the copy rate,
the colour classifier). Those that draw are given a run.drawing.Drawer and never see the run.

A feature may import the core, unet.py, data.py, ui.py and other features; never run/, the
command line (ddpm.py, config.py, validation.py) or tools/.
"""
