"""Runs TinyGPT-V: the model, its pre-processing, prompts and generation."""
