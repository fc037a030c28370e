"""The run machinery: one optimizer step and the networks of a run (trainer.py), the training
images as batches (dataset.py), checkpoints, the run folder and its lock (checkpoint.py), the
pictures drawn with a run's weights (drawing.py) and what a run reports (monitor.py).

It may import the core, unet.py, data.py, ui.py and the features (a run trains a model kind);
never the command line (ddpm.py, config.py, validation.py) or tools/.
"""
