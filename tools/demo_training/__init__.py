"""The demo model's trainer, one concept per module: corpus -> tokenizer -> the qwen3moe and qwen35moe
torch models -> training -> GGUF export -> report; ``tools/train_demo_model.py`` is its command line
and puts ``tools/`` on ``sys.path`` for the ``synthetic_models`` helpers the modules import."""
