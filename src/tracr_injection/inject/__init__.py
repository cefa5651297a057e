"""Inject stage: train a Hugging Face causal LM on a task while aligning its hidden states to the teacher.

In: a `TrainConfig` (task, model, teacher, loss settings).  Out: `train`, which trains, saves the run folder
`config.out` (the trained model, the alignment map, checkpoints) and returns its manifest; and `TrainConfig`.

lm.py (find blocks and hidden states of any causal LM, layer mapping) -> natural_text.py (where the
KL term's text windows come from) -> kl_cache.py (the original model's top-k distributions on them,
computed once) -> data.py (bridged batches with stored teacher targets) -> answers.py (answer positions,
exact match) -> alignment_map.py (the map A) -> run.py (the run folder's layout, its manifest, saving and
loading a finished run) -> objective.py (the loss: task CE, cosine alignment, KL, detach-and-roll;
levers.py and probing.py supply its levers and per-term gradient norms) -> trainer.py (Accelerate loop,
checkpoints, resume).  config.py holds `TrainConfig`.
"""

from tracr_injection.inject.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(*args, **kwargs):
    """See `tracr_injection.inject.trainer.train` (imported lazily: it pulls in transformers)."""
    from tracr_injection.inject.trainer import train as _train

    return _train(*args, **kwargs)
