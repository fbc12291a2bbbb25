"""Trained models leaving the framework: a run's consolidated weights (run.py), export to safetensors and Hugging
Face (export.py, hf_tokenizer.py), text generation (generate.py) and evaluation (evaluate.py)."""
