"""tracr-injection: distil compiled RASP programs into pre-trained causal LMs."""
