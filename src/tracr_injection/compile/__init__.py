"""Compile stage: RASP program -> tracr -> verified, cached PyTorch teacher."""
