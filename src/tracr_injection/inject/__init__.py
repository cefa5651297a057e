"""Inject stage: train a Hugging Face causal LM on a task while aligning its hidden states to the teacher.

lm.py (find blocks and hidden states of any causal LM, layer mapping) -> natural_text.py (KL
data and the original model's top-k distributions, computed once) -> data.py (bridged
batches with stored teacher targets) -> losses.py (task CE, cosine alignment, detach-and-roll)
-> run.py (the run folder's layout, its manifest, saving and loading a finished run) -> trainer.py
(Accelerate loop, checkpoints, resume).  config.py holds `TrainConfig`.
"""

from tracr_injection.inject.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(*args, **kwargs):
    """See `tracr_injection.inject.trainer.train` (imported lazily: it pulls in transformers)."""
    from tracr_injection.inject.trainer import train as _train

    return _train(*args, **kwargs)
