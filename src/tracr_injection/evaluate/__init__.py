"""Evaluate stage: task accuracy in and out of distribution, kept language ability, decoding the
program's variables from the LM, causal tests on the injected subspace, reports and comparisons.

In: a trained run folder (or a plain model name) and its task.  Out: metrics, report and plots.
"""
