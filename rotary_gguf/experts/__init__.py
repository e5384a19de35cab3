"""Host experts on the accelerator: `policies` (which experts keep a slot: replacement policies,
routing traces and their replay) and `cache` (the live cache and split compute, over the C hot
path in ../csrc)."""
