"""rotary-gguf: run big Mixture-of-Experts GGUF models on a small GPU.

Data flow, one module per stage: inventory -> convert -> plan -> engine -> serve / chat / dashboard.
"""

__version__ = "0.1.0"
